"""Writing canonical tensors as a Megatron-LM `torch` checkpoint, one rank file at a time, and
each rank file one tensor at a time (`torch_file.TorchFile`, the file torch.save would write):
memory holds the one Megatron tensor being cut, and the pages of the source tensors it is cut
from (q, k, v for `linear_qkv`), never a rank's shard.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from reference.converters.megatron import stage as S
from reference.converters.megatron.args import build_args, check_heads
from reference.converters.megatron.keys import KeyTable, extra_state_value
from reference.converters.megatron.layout import MegatronLayout, check_layout
from reference.converters.megatron.torch_file import TorchFile
from reference.converters.plan import Lazy
from reference.converters.safetensors_io import Mapped, Progress
from reference.errors import InputError
from reference.families.spec import ModelSpec, canonical_names

FAMILY_FILE = "hf_source.json"  # the HF family and config fields the weights came with


def mapped(lazy: Lazy) -> torch.Tensor:
    """The tensor; a source file's unchanged bytes as a view of its pages rather than read into
    memory of their own first: a piece is cut out of it, or written straight from it, and
    reading each source tensor once per TP rank into fresh memory was a third of the writer's
    time. The map closes when the last view of it goes."""
    if lazy.entry is None:
        return lazy.load()
    try:
        return Mapped().tensor(lazy.entry)
    except ValueError:  # the file shrank since its header was read: shorter than the map wants
        raise InputError(f"{lazy.entry.path}: truncated while reading a tensor") from None


class _Scratch:
    """Memory reused from piece to piece for the pieces that must be copied: cutting each into a
    fresh allocation cost more than the copy (the kernel zero-fills every new page)."""

    def __init__(self) -> None:
        self.buf = torch.empty(0, dtype=torch.uint8)

    def cut(self, blocks: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The blocks concatenated along rows, in `dtype`, into the scratch (valid until the next cut)."""
        shape = (sum(b.shape[0] for b in blocks), *blocks[0].shape[1:])
        n = math.prod(shape) * dtype.itemsize
        if self.buf.numel() < n:
            self.buf = torch.empty(0, dtype=torch.uint8)  # release the smaller one first
            self.buf = torch.empty(n, dtype=torch.uint8)
        return torch.cat(blocks, out=self.buf[:n].view(dtype).view(shape))


def prepare(tensors: Mapping[str, Lazy], spec: ModelSpec, layout: MegatronLayout,
            dtype: torch.dtype | None) -> tuple[tuple[int, ...], torch.dtype, Any]:
    """What both Megatron writers check and build first: the layout's layers per stage, the
    dtype written (the embedding's unless cast) and the checkpoint's args."""
    counts = check_layout(spec, layout)
    check_heads(spec)
    expected = sorted(canonical_names(spec))
    if expected != sorted(tensors):
        odd = sorted(set(expected) ^ set(tensors))
        raise InputError(f"megatron: canonical tensors do not fit the spec: {odd[:3]}")
    dtype = dtype or tensors["embed.weight"].meta.dtype
    return counts, dtype, build_args(spec, layout, counts, dtype)


def check_placed(spec: ModelSpec, used: set[str]) -> None:
    """Raise unless the key rules gave every canonical tensor a place in the checkpoint."""
    missing = sorted(set(canonical_names(spec)) - used)
    if missing:
        raise InputError(f"megatron: canonical tensor '{missing[0]}' has no place")


def record(out: Path, family: str, extra: Mapping[str, Any], cast: torch.dtype | None) -> None:
    """The tracker file and our record of the HF family (and a cast dtype) beside the iteration."""
    (out / S.TRACKER).write_text(f"{S.ITERATION}\n")
    recorded = dict(extra)
    if cast is not None:
        recorded["dtype"] = str(cast).removeprefix("torch.")
    (out / FAMILY_FILE).write_text(json.dumps({"model_type": family, "config": recorded}, indent=2) + "\n")


def write_megatron(
    tensors: Mapping[str, Lazy],
    spec: ModelSpec,
    layout: MegatronLayout,
    family: str,
    extra: Mapping[str, Any],
    dtype: torch.dtype | None,
    out: Path,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Write the checkpoint into `out`; returns (tensors, bytes) written. `progress` is told
    (bytes so far, bytes in all) as each tensor is cut into its rank file."""
    cast = dtype
    counts, dtype, args = prepare(tensors, spec, layout, dtype)
    table = KeyTable(layout.layer_spec)
    # Virtual stage v * pp + p is model{v} of pipeline rank p; expert-parallel rank e holds the
    # experts e * n/ep .. (e + 1) * n/ep - 1 beside a copy of everything else.
    every = S.stages(counts)
    ep = layout.ep
    ranks = [[[(st, S.slots(spec, table, st, e, ep)) for st in every[p::layout.pp]] for e in range(ep)]
             for p in range(layout.pp)]
    check_placed(spec, {n for eps in ranks for stages in eps for _, slots in stages for slot in slots
                        for n in slot.sources})
    files = S.rank_files(layout.tp, layout.expert_tp, ep)

    def rows(slot: S.Slot, parts: list[Any], tp_rank: int, etp_rank: int) -> list[torch.Tensor]:
        """The row blocks whose concatenation is the slot's piece in the file of TP rank
        `tp_rank` (expert-TP rank `etp_rank`)."""
        tp = S.rule_tp(slot.rule, layout.tp, layout.expert_tp)
        return S.shard_rows(slot.rule.split, parts, S.width_spec(spec, slot.rule), tp,
                            S.rule_tp(slot.rule, tp_rank, etp_rank), args.padded_vocab_size)

    def piece_bytes(slot: S.Slot, tp_rank: int, etp_rank: int) -> int:  # cut from the data-free stand-ins
        blocks = rows(slot, [tensors[n].meta for n in slot.sources], tp_rank, etp_rank)
        return sum(b.numel() for b in blocks) * S.piece_dtype(slot.rule, dtype).itemsize

    total = sum(piece_bytes(slot, t, a) for eps in ranks for t, e, a in files
                for _, slots in eps[e] for slot in slots) if progress is not None else 0
    n_tensors = n_bytes = 0
    scratch = _Scratch()
    for pp_rank, eps in enumerate(ranks):
        for tp_rank, ep_rank, etp_rank in files:  # each file reads its tensors anew, one at a time
            path = S.rank_file(out, str(S.ITERATION), tp_rank, pp_rank, layout.pp, ep_rank, ep)
            path.parent.mkdir(parents=True, exist_ok=True)
            file = TorchFile(path)
            state: dict[str, Any] = {"args": args, "checkpoint_version": S.CHECKPOINT_VERSION,
                                     "iteration": S.ITERATION}
            for chunk, (st, slots) in enumerate(eps[ep_rank]):
                model: dict[str, Any] = {}
                for slot in slots:
                    parts = [mapped(tensors[n]) for n in slot.sources]
                    blocks = rows(slot, parts, tp_rank, etp_rank)
                    kept = S.piece_dtype(slot.rule, dtype)
                    x = blocks[0]  # one run of the source's bytes is written from its pages
                    if len(blocks) > 1 or x.dtype != kept or not x.is_contiguous():
                        x = scratch.cut(blocks, kept)
                    model[slot.key] = file.tensor(x)
                    n_tensors += 1
                    n_bytes += x.nbytes
                    del parts, blocks, x
                    if progress is not None:
                        progress(n_bytes, total)
                extras = {**S.extra_keys(spec, layout.layer_spec, st), **S.expert_extra_keys(slots)}
                for key, kind in extras.items():
                    value = extra_state_value(kind)
                    model[key] = value if value is None else file.tensor(value)
                state[S.model_key(chunk, layout.vpp)] = model
            file.finish(state)
    record(out, family, extra, dtype if cast is not None else None)
    return n_tensors, n_bytes
