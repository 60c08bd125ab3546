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
    `ep` spreads a mixture's experts over expert-parallel ranks; `etp` is the tensor-parallel
    size of each expert (megatron-core's default, None, is `tp`).
    """

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    layer_spec: str = "local"  # or "te"
    vocab_divisor: int = 128
    pp_layers: tuple[int, ...] | None = None
    ep: int = 1
    etp: int | None = None
    ckpt_format: str = "torch"

    @property
    def expert_tp(self) -> int:
        """Tensor-parallel size of each expert."""
        return self.etp or self.tp

    @property
    def stage_ranks(self) -> int:
        """Ranks of the smallest job at this layout, per pipeline stage: a multiple of TP (dense
        data parallelism beyond it) and of expert TP x EP (expert data parallelism beyond it)."""
        return math.lcm(self.tp, self.expert_tp * self.ep)

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
    dense = spec.moe is None or any(not spec.moe.on(i) for i in range(spec.num_layers))
    for what, size in (("num_attention_heads", spec.num_heads),
                       ("num_query_groups (num_key_value_heads)", spec.num_kv_heads),
                       *((("ffn_hidden_size (intermediate_size)", spec.intermediate_size),) * dense)):
        if size % tp:
            raise InputError(f"--tp {tp} does not divide {what} {size}")
    check_latent(spec, layout)
    check_experts(spec, layout)
    return stage_layers(spec.num_layers, layout)


def check_latent(spec: ModelSpec, layout: MegatronLayout) -> None:
    """Raise, naming the flag, unless latent attention fits `layout`: its down projections are
    column-parallel too (local spec), so TP cuts their outputs, q_lora_rank and kv_lora_rank +
    the rope dims, before gathering them."""
    m = spec.mla
    if m is None:
        return
    if layout.layer_spec != "local":
        raise InputError(f"--layer-spec {layout.layer_spec}: latent attention is written in the local "
                         "spec only")
    for what, size in (("q_lora_rank", m.q_rank or 0),
                       ("kv_lora_rank + qk_rope_head_dim", m.kv_rank + spec.head_dim)):
        if size % layout.tp:
            raise InputError(f"--tp {layout.tp} does not divide {what} {size}")


def check_experts(spec: ModelSpec, layout: MegatronLayout) -> None:
    """Raise, naming the flag, unless the experts fit `layout` (`--ep`, `--etp`)."""
    for name, value in (("--ep", layout.ep), ("--etp", layout.etp)):
        if value is not None and value < 1:
            raise InputError(f"{name} {value}: must be at least 1")
    if spec.moe is None:
        given = [f"{n} {v}" for n, v in (("--ep", layout.ep), ("--etp", layout.etp)) if v not in (None, 1)]
        if given:
            raise InputError(f"{given[0]}: the model has no experts (a dense model)")
        return
    if spec.num_experts % layout.ep:
        raise InputError(f"--ep {layout.ep} does not divide num_experts {spec.num_experts}")
    if layout.ckpt_format == "torch" and layout.tp % layout.expert_tp:
        # Megatron-LM names a rank file by TP and EP rank only (`get_checkpoint_name`): ranks
        # that share both but hold different expert-TP shards would save the same mp_rank file.
        raise InputError(f"--etp {layout.expert_tp} does not divide --tp {layout.tp}: Megatron-LM's torch "
                         "format names rank files by TP and EP rank only, so ranks holding different "
                         "expert-TP shards would save the same file; use --ckpt-format torch_dist")
    if layout.layer_spec != "local":
        raise InputError(f"--layer-spec {layout.layer_spec}: experts are written in the local spec only")
    m = spec.moe
    for what, size, by, flag in (("moe_ffn_hidden_size", m.expert_size, layout.expert_tp, "--etp"),
                                 ("moe_shared_expert_intermediate_size", m.shared_size, layout.tp, "--tp")):
        if size % by:
            raise InputError(f"{flag} {by} does not divide {what} {size}")


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

