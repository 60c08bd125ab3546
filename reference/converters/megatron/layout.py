"""How Megatron-Core lays a model over tensor- and pipeline-parallel ranks: the layout and its
checks (the tensors are cut in `cut.py`)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from reference.errors import InputError
from reference.families.spec import ModelSpec

LAYER_SPECS = ("local", "te")
CKPT_FORMATS = ("torch", "torch_dist")  # Megatron-LM's --ckpt-format values: rank files, or PyTorch DCP


@dataclass(frozen=True, kw_only=True)
class MegatronLayout:
    """Parallel sizes and key layout of a Megatron-Core checkpoint.

    `pp_layers` gives the decoder layers of every pipeline stage (with `vpp`, of every virtual
    stage, in Megatron's order: virtual stage v of pipeline rank p is entry v * pp + p).
    """

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    layer_spec: str = "local"  # or "te"
    vocab_divisor: int = 128
    pp_layers: tuple[int, ...] | None = None
    ckpt_format: str = "torch"

    @property
    def chunks(self) -> int:
        """Virtual stages per pipeline rank (1 without VPP)."""
        return self.vpp or 1


def check_layout(spec: ModelSpec, layout: MegatronLayout) -> tuple[int, ...]:
    """Raise, naming the field, if `layout` cannot hold `spec`; else the layers of every
    virtual stage (see `stage_layers`)."""
    for name, value in (("--tp", layout.tp), ("--pp", layout.pp),
                        ("--make-vocab-size-divisible-by", layout.vocab_divisor)):
        if value < 1:
            raise InputError(f"{name} {value}: must be at least 1")
    if layout.vpp is not None and (layout.vpp < 2 or layout.pp < 2):
        raise InputError(f"--vpp {layout.vpp}: needs --vpp >= 2 and --pp >= 2 (or no --vpp)")
    if layout.layer_spec not in LAYER_SPECS:
        raise InputError(f"--layer-spec '{layout.layer_spec}': not one of {', '.join(LAYER_SPECS)}")
    if layout.ckpt_format not in CKPT_FORMATS:
        raise InputError(f"--ckpt-format '{layout.ckpt_format}': not one of {', '.join(CKPT_FORMATS)}")
    tp = layout.tp
    for what, size in (("num_attention_heads", spec.num_heads),
                       ("num_query_groups (num_key_value_heads)", spec.num_kv_heads),
                       ("ffn_hidden_size (intermediate_size)", spec.intermediate_size)):
        if size % tp:
            raise InputError(f"--tp {tp} does not divide {what} {size}")
    return stage_layers(spec.num_layers, layout)


def stage_layers(num_layers: int, layout: MegatronLayout) -> tuple[int, ...]:
    """Decoder layers of every virtual stage, in Megatron's order (v * pp + p)."""
    stages = layout.pp * layout.chunks
    if layout.pp_layers is not None:
        counts = tuple(layout.pp_layers)
        if len(counts) != stages or min(counts) < 0 or sum(counts) != num_layers:
            raise InputError(
                f"--pp-layers {','.join(map(str, counts))}: needs {stages} non-negative counts "
                f"(pp x vpp) summing to num_layers {num_layers}")
        return counts
    if num_layers % stages:
        raise InputError(
            f"num_layers {num_layers} is not divisible by {stages} pipeline stages "
            f"(pp {layout.pp} x vpp {layout.chunks}); give --pp-layers")
    return (num_layers // stages,) * stages


def layout_string(counts: Sequence[int]) -> str:
    """Megatron's `pipeline_model_parallel_layout` for per-stage counts: "Et*3|t*5L"."""
    stages = [f"t*{n}" if n else "" for n in counts]
    stages[0] = "E" + stages[0]
    stages[-1] += "L"
    return "|".join(stages)


def parse_layout_string(text: str) -> tuple[int, ...]:
    """Decoder layers per stage of a `pipeline_model_parallel_layout` ("Et*3|t*5L",
    "E(tt|)*2tL"), unrolled as megatron-core's `PipelineParallelLayerLayout` does."""
    text = text.replace(",", "")
    for pattern in (r"\(([^)]+)\)\*(\d+)", r"(.)\*(\d+)"):
        text = re.sub(pattern, lambda m: m.group(1) * int(m.group(2)), text)
    if set(text) - set("EtL|"):
        raise InputError(f"pipeline_model_parallel_layout '{text}': only E, t, L stages are read")
    return tuple(stage.count("t") for stage in text.split("|"))


def padded_vocab(vocab_size: int, divisor: int, tp: int) -> int:
    """Rows of Megatron's embedding: the vocabulary rounded up to divisor x tp (Megatron-LM's
    `_vocab_size_with_padding`)."""
    multiple = divisor * tp
    return math.ceil(vocab_size / multiple) * multiple

