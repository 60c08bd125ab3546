"""Megatron-Core as a conversion target: what it can hold, and the writer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from reference.converters.megatron.args import refuses
from reference.converters.megatron.layout import MegatronLayout
from reference.families.spec import DEFAULT_FEATURES, ModelSpec

if TYPE_CHECKING:  # the writer needs torch; `reference families` asks express and refuses only
    import torch

    from reference.converters.plan import Lazy
    from reference.converters.safetensors_io import Progress

# Features Megatron-Core computes exactly as the HF families do. Every other feature is held at
# Llama's value, so a new feature in ModelSpec is refused by name until it is listed here.
# fp32_rope (DeepSeek-V2) is held as the family has it, as the routing weights' dtype is: in fp32
# megatron-core's rope computes the same; its args have no such setting (read.py restores it).
SUPPORTED = ("qkv_bias", "o_bias", "mlp_bias", "qk_norm", "rotary_fraction", "num_experts", "moe",
             "latent_attention", "mla", "interleaved_rope", "fp32_rope")


@dataclass(frozen=True)
class MegatronTarget:
    """A Megatron-LM checkpoint of `layout` (rank files, or `torch_dist` as `layout.ckpt_format`
    says), recording the HF `family` it came from."""

    family: str
    layout: MegatronLayout
    name: ClassVar[str] = "megatron"

    def express(self, spec: ModelSpec) -> ModelSpec:
        held = dict(DEFAULT_FEATURES)
        held.update({f: getattr(spec, f) for f in SUPPORTED})
        if spec.o_bias or spec.mlp_bias:  # --add-bias-linear gives every linear a bias
            held.update(qkv_bias=True, o_bias=True, mlp_bias=True)
        return spec.replace(**held)

    def refuses(self, spec: ModelSpec) -> dict[str, str]:
        return refuses(spec)

    def write(self, tensors: Mapping[str, Lazy], held: ModelSpec, extra: Mapping[str, Any],
              dtype: torch.dtype | None, out: Path, progress: Progress | None = None) -> tuple[int, int]:
        """Write into `out`; returns (tensors, bytes) written."""
        if self.layout.ckpt_format == "torch_dist":
            from reference.converters.megatron.dist_write import write_dist

            return write_dist(tensors, held, self.layout, self.family, extra, dtype, out, progress)
        from reference.converters.megatron.write import write_megatron

        return write_megatron(tensors, held, self.layout, self.family, extra, dtype, out, progress)
