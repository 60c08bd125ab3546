"""How Megatron-Core lays a model over tensor- and pipeline-parallel ranks: the layout, its
checks, and the pure tensor functions that cut a full tensor into one rank's piece and join
the pieces again. Slicing and concatenation only, so every split/merge pair is lossless."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from reference.errors import ReferenceError
from reference.families.spec import ModelSpec

LAYER_SPECS = ("local", "te")


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
            raise ReferenceError(f"{name} {value}: must be at least 1")
    if layout.vpp is not None and (layout.vpp < 2 or layout.pp < 2):
        raise ReferenceError(f"--vpp {layout.vpp}: needs --vpp >= 2 and --pp >= 2 (or no --vpp)")
    if layout.layer_spec not in LAYER_SPECS:
        raise ReferenceError(f"--layer-spec '{layout.layer_spec}': not one of {', '.join(LAYER_SPECS)}")
    tp = layout.tp
    for what, size in (("num_attention_heads", spec.num_heads),
                       ("num_query_groups (num_key_value_heads)", spec.num_kv_heads),
                       ("ffn_hidden_size (intermediate_size)", spec.intermediate_size)):
        if size % tp:
            raise ReferenceError(f"--tp {tp} does not divide {what} {size}")
    return stage_layers(spec.num_layers, layout)


def stage_layers(num_layers: int, layout: MegatronLayout) -> tuple[int, ...]:
    """Decoder layers of every virtual stage, in Megatron's order (v * pp + p)."""
    stages = layout.pp * layout.chunks
    if layout.pp_layers is not None:
        counts = tuple(layout.pp_layers)
        if len(counts) != stages or min(counts) < 0 or sum(counts) != num_layers:
            raise ReferenceError(
                f"--pp-layers {','.join(map(str, counts))}: needs {stages} non-negative counts "
                f"(pp x vpp) summing to num_layers {num_layers}")
        return counts
    if num_layers % stages:
        raise ReferenceError(
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
        raise ReferenceError(f"pipeline_model_parallel_layout '{text}': only E, t, L stages are read")
    return tuple(stage.count("t") for stage in text.split("|"))


def padded_vocab(vocab_size: int, divisor: int, tp: int) -> int:
    """Rows of Megatron's embedding: the vocabulary rounded up to divisor x tp (Megatron-LM's
    `_vocab_size_with_padding`)."""
    multiple = divisor * tp
    return math.ceil(vocab_size / multiple) * multiple


# --- one rank's piece of a full tensor, and the full tensor from every rank's piece --------


def rows_rank(x: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rows of a column-parallel linear's weight (or bias) held by `rank`."""
    return x.chunk(tp, dim=0)[rank]


def cols_rank(x: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Input columns of a row-parallel linear's weight held by `rank`."""
    return x.chunk(tp, dim=1)[rank]


def vocab_rank(x: torch.Tensor, padded: int, tp: int, rank: int) -> torch.Tensor:
    """Rank's rows of the embedding zero-padded to `padded` rows, without padding all of it."""
    per = padded // tp
    lo, hi = rank * per, (rank + 1) * per
    real = x[lo:min(hi, x.shape[0])]
    pad = x.new_zeros((hi - lo - real.shape[0], *x.shape[1:]))
    return torch.cat([real, pad])


def merge_vocab(shards: Sequence[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """The embedding from every rank's rows, trimmed to the true vocabulary."""
    return torch.cat(list(shards))[:vocab_size]


def qkv_rank(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int, tp: int,
             rank: int) -> torch.Tensor:
    """Rank's rows of Megatron's fused `linear_qkv`: for each of its query groups, the group's
    query heads, then its key head, then its value head. TP takes whole groups."""
    mine = slice(rank * groups // tp, (rank + 1) * groups // tp)
    rest = q.shape[1:]
    parts = [t.reshape(groups, -1, *rest)[mine] for t in (q, k, v)]  # (G/tp, rows per group, ...)
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def merge_qkv(shards: Sequence[torch.Tensor], groups: int, heads: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v from every rank's rows of `linear_qkv`."""
    fused = torch.cat(list(shards))
    rest = fused.shape[1:]
    per_group = fused.reshape(groups, -1, *rest)  # (G, (q_per_group + 2) * d, ...)
    d = per_group.shape[1] // (heads // groups + 2)
    q, k, v = per_group.split([per_group.shape[1] - 2 * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def fc1_rank(gate: torch.Tensor, up: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """Rank's rows of Megatron's `linear_fc1`: cat(gate_r, up_r), which SwiGLU chunks in two."""
    return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])


def merge_fc1(shards: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """gate, up from every rank's `linear_fc1`; plain concatenation would interleave them."""
    halves = [s.chunk(2) for s in shards]
    return torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])
