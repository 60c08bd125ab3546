"""Writing canonical tensors as a Megatron-LM `torch_dist` checkpoint (PyTorch Distributed
Checkpoint), in one process, without megatron-core or a process group.

megatron-core stores every tensor once, by its global shape: the TP 1 layout (`linear_qkv`
grouped per query group, `linear_fc1` as [gate; up], the vocabulary padded), the decoder layers
stacked as one `[L, ...]` tensor per parameter (its `singleton_local_shards=False` layout), the
local spec's norms under their TransformerEngine names. Each of its ranks saves its own boxes
(chunks) of those tensors; we declare the same boxes a save at the requested TP would (one
layer's slice of each TP piece), so `.metadata` is what megatron-core's own save writes, and
hand them to torch.distributed.checkpoint's FileSystemWriter through a planner that cuts each
box only when the writer asks for it: one Megatron tensor of one layer is in memory at a time.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import CheckpointException, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from reference.converters.megatron import cut
from reference.converters.megatron import stage as S
from reference.converters.megatron.args import build_args, check_heads
from reference.converters.megatron.dist import BACKEND, COMMON
from reference.converters.megatron.keys import EXTRA_SUFFIX, TE_RENAMES, KeyTable, extra_states
from reference.converters.megatron.layout import MegatronLayout, check_layout
from reference.converters.megatron.write import FAMILY_FILE
from reference.converters.plan import Lazy
from reference.converters.safetensors_io import Progress
from reference.errors import InputError
from reference.families.keymap import Fused
from reference.families.spec import ModelSpec, canonical_names

# What Megatron-LM's `_build_sharded_state_dict_metadata` records (megatron-core >= 0.14) and
# passes back to `sharded_state_dict()` on load: these say "stacked layers, fused fc1 as one key".
CONTENT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
                    "chained_optim_avoid_prefix": True}
BACKEND_RECORD = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                  "common_backend": "torch", "common_backend_version": 1}

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def dist_key(template: str) -> str:
    """A Megatron rule's key in the checkpoint: TE names for the norms, layers stacked
    (`decoder.layers.{}.input_layernorm.weight` ->
    `decoder.layers.self_attention.linear_qkv.layer_norm_weight`)."""
    return TE_RENAMES.get(template, template).replace("{}.", "")


def _runs(positions: Sequence[int]) -> list[tuple[int, int]]:
    """(start, length) of each run of consecutive positions."""
    out: list[tuple[int, int]] = []
    for p in positions:
        if out and out[-1][0] + out[-1][1] == p:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((p, 1))
    return out


def tp_boxes(split: str | Fused, rows: Sequence[int], shape: Sequence[int], spec: ModelSpec,
             tp: int) -> list[Box]:
    """The boxes of a global Megatron tensor of `shape` (made of parts of `rows` rows) that TP
    ranks 0..tp-1 hold, in rank order: a fused tensor's rank piece is located by cutting row
    labels the way its rank is cut."""
    shape = tuple(shape)
    rest = shape[1:]
    if split == "replicated":
        return [((0,) * len(shape), shape)]
    if split == "vocab":
        per = shape[0] // tp
        return [((r * per, *(0,) * len(rest)), (per, *rest)) for r in range(tp)]
    if split == "cols":
        per = shape[1] // tp
        return [((0, r * per, *(0,) * (len(shape) - 2)), (shape[0], per, *shape[2:])) for r in range(tp)]
    if not isinstance(split, Fused):
        raise InputError(f"unknown Megatron split {split!r}")
    starts = [sum(rows[:i]) for i in range(len(rows))]
    labels = [torch.arange(s, s + n) for s, n in zip(starts, rows, strict=True)]
    where = {int(label): i for i, label in enumerate(S.shard(split, labels, spec, 1, 0, 0))}
    boxes = []
    for r in range(tp):
        piece = S.shard(split, labels, spec, tp, r, 0)
        for start, n in _runs([where[int(label)] for label in piece]):
            boxes.append(((start, *(0,) * len(rest)), (n, *rest)))
    return boxes


@dataclass(frozen=True)
class Tensor:
    """One Megatron tensor of the checkpoint: its key, layer (stacked) or None, the canonical
    tensors it is cut from and its global shape without the layer axis."""

    key: str
    layer: int | None
    slot: S.Slot
    shape: tuple[int, ...]


def plan_tensors(spec: ModelSpec, metas: Mapping[str, torch.Tensor], padded: int) -> list[Tensor]:
    """Every Megatron tensor, in the order they are written: embedding, layer by layer, final
    norm, output layer."""
    whole = S.Stage(0, 0, spec.num_layers, True, True)
    out = []
    for slot in S.slots(spec, KeyTable("local"), whole):
        layer = int(slot.key.split(".")[2]) if "{}" in slot.rule.key else None
        shape = S.shard(slot.rule.split, [metas[n] for n in slot.sources], spec, 1, 0, padded).shape
        out.append(Tensor(dist_key(slot.rule.key), layer, slot, tuple(shape)))
    return out


def extra_objects(spec: ModelSpec) -> list[str]:
    """megatron-core's ShardedObject keys for the local linears' `_extra_state` (None): one
    per layer, `<module>._extra_state/shard_<layer>_<layers>` (output_layer's is dropped by GPTModel)."""
    out = []
    for module in (m for m in extra_states("local", spec.qk_norm) if "{}" in m):
        key = module.replace("{}.", "") + EXTRA_SUFFIX
        out += [f"{key}/shard_{i}_{spec.num_layers}" for i in range(spec.num_layers)]
    return out


class _LazyPlanner(DefaultSavePlanner):
    """A save planner whose items are given, and whose data is made when the writer asks."""

    def __init__(self, items: list[WriteItem],
                 resolve: Callable[[WriteItem], torch.Tensor | io.BytesIO]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.items = items
        self.resolve = resolve

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self.items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        return self.resolve(write_item)


def _none_bytes() -> io.BytesIO:
    """A ShardedObject of megatron-core's local linears: torch.save of the list of its local
    shards' data, [None]."""
    buf = io.BytesIO()
    torch.save([None], buf)
    buf.seek(0)
    return buf


def write_dist(
    tensors: Mapping[str, Lazy],
    spec: ModelSpec,
    layout: MegatronLayout,
    family: str,
    extra: Mapping[str, Any],
    dtype: torch.dtype | None,
    out: Path,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Write the checkpoint into `out` (root: tracker, iter_0000001/, hf_source.json); returns
    (tensors, bytes) written. The args record `layout`, which Megatron-LM may load at another."""
    counts = check_layout(spec, layout)
    check_heads(spec)
    if layout.layer_spec != "local":
        raise InputError(f"--layer-spec {layout.layer_spec} with --ckpt-format torch_dist: only the local "
                         "spec is written (TransformerEngine's extra state is not checked here); use "
                         "--layer-spec local, or --ckpt-format torch")
    expected = list(canonical_names(spec))
    if sorted(expected) != sorted(tensors):
        odd = sorted(set(expected) ^ set(tensors))
        raise InputError(f"megatron: canonical tensors do not fit the spec: {odd[:3]}")
    cast = dtype
    dtype = dtype or tensors["embed.weight"].meta.dtype
    args = build_args(spec, layout, counts, dtype)
    args.ckpt_format = "torch_dist"
    padded = args.padded_vocab_size
    metas = {n: t.meta for n, t in tensors.items()}
    plan = plan_tensors(spec, metas, padded)
    used = {n for t in plan for n in t.slot.sources}
    if used != set(expected):
        raise InputError(f"megatron: canonical tensor '{sorted(set(expected) - used)[0]}' has no place")

    props = TensorProperties(dtype=dtype)
    items: list[WriteItem] = []
    home: dict[tuple[str, tuple[int, ...]], tuple[Tensor, Box]] = {}
    for t in plan:
        rows = [metas[n].shape[0] for n in t.slot.sources]
        size = torch.Size(t.shape if t.layer is None else (spec.num_layers, *t.shape))
        for offsets, sizes in tp_boxes(t.slot.rule.split, rows, t.shape, spec, layout.tp):
            if t.layer is not None:
                offsets, sizes = (t.layer, *offsets), (1, *sizes)
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            items.append(WriteItem(index=MetadataIndex(t.key, torch.Size(offsets)), type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(chunk=chunk, properties=props, size=size)))
            home[(t.key, tuple(offsets))] = (t, (tuple(offsets), tuple(sizes)))
    objects = extra_objects(spec)
    items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in objects]
    boxes = [i.tensor_data.chunk.sizes for i in items if i.tensor_data is not None]
    total = sum(torch.Size(sizes).numel() for sizes in boxes) * dtype.itemsize

    # (Tensor, its global layer slice): a fused tensor is cut once for all its boxes. A vocabulary
    # tensor is kept unpadded: each box is cut and padded on its own.
    last: list[Any] = [None, None]
    written = [0]

    def resolve(item: WriteItem) -> torch.Tensor | io.BytesIO:
        if item.type == WriteItemType.BYTE_IO:
            return _none_bytes()
        t, (offsets, sizes) = home[(item.index.fqn, tuple(item.index.offset))]
        vocab = t.slot.rule.split == "vocab"
        if last[0] is not t:
            last[:] = [None, None]  # release the previous tensor before cutting the next
            parts = [tensors[n].load() for n in t.slot.sources]
            last[:] = [t, parts[0] if vocab else S.shard(t.slot.rule.split, parts, spec, 1, 0, padded)]
            del parts
        if t.layer is not None:
            offsets, sizes = offsets[1:], sizes[1:]
        box = last[1]
        if vocab:  # rows [offset, offset + size) of the padded rows: a rank's rows at tp = padded / size
            box = cut.vocab_rank(box, padded, padded // sizes[0], offsets[0] // sizes[0])
        else:
            for dim, (o, n) in enumerate(zip(offsets, sizes, strict=True)):
                box = box.narrow(dim, o, n)
        box = box.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        written[0] += box.nbytes
        if progress is not None:
            progress(written[0], total)
        return box.unsqueeze(0) if t.layer is not None else box

    where = out / S.iteration_dir(str(S.ITERATION))
    where.mkdir(parents=True)
    torch.save({"args": args, "checkpoint_version": S.CHECKPOINT_VERSION, "iteration": S.ITERATION,
                "content_metadata": dict(CONTENT_METADATA)}, where / COMMON)
    # One thread, one file: the writer resolves and writes one box at a time (keeping the last box
    # of each key until the file is closed). No fsync here: atomic_dir syncs the whole tree.
    writer = FileSystemWriter(str(where), single_file_per_rank=True, thread_count=1, sync_files=False)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp_save({}, storage_writer=writer, planner=_LazyPlanner(items, resolve), no_dist=True)
    except CheckpointException as e:  # DCP wraps (as a BaseException) what failed: the source's own error
        raise next(iter(e.failures.values()))[0] from None
    last[:] = [None, None]
    (where / BACKEND).write_text(json.dumps(BACKEND_RECORD))
    (out / S.TRACKER).write_text(f"{S.ITERATION}\n")
    recorded = dict(extra)
    if cast is not None:
        recorded["dtype"] = str(dtype).removeprefix("torch.")
    (out / FAMILY_FILE).write_text(json.dumps({"model_type": family, "config": recorded}, indent=2) + "\n")
    return len(plan), written[0]
