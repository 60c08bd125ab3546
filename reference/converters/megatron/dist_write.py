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

TransformerEngine's spec (`--layer-spec te`, dense layers only) declares the same tensors under
the same keys: TELayerNormColumnParallelLinear keeps the fused norm's `layer_norm_weight` out of
its TP axis map (replicated, as the local spec's renamed norm), and its weight is cut as the
local linear's. Only the `_extra_state` ShardedObjects differ: the four linears hold TE's "no
FP8" marker (an empty uint8 tensor) where the local linears hold None; the q/k norms and the
final norm (TENorm: TE's RMSNorm op) have one of their own, which the local spec's norms lack;
TEDotProductAttention's `sharded_state_dict()` declares nothing (only a learnable softmax
offset), so core_attention has none although its state dict has `_extra_state`. The local
spec's final norm has one too in a dense model (keys.FINAL_NORM): megatron-core makes it TE's
wherever TE is installed, and Megatron-LM's default strictness ignores it where TE is not.

A mixture's routed experts (the local spec's SequentialMLP) get a global expert axis after the
layer axis (`decoder.layers.mlp.experts.experts.linear_fc1.weight` is `[L, E, ...]`), so any EP
can load them; shared experts are cut like the dense MLP, the router is replicated. When not
every layer is a mixture (`moe_layer_freq` a list), megatron-core does not stack the layers: each
has keys of its own (`decoder.layers.<global layer>.`), without the layer axis.

Latent attention (DeepSeek-V2/V3, the local MLA spec) has column-parallel projections only, each
rank's box a run of rows, and no keys map: its layers' norms keep their local names
(`decoder.layers.input_layernorm.weight`).
"""

from __future__ import annotations

import io
import json
import re
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
from reference.converters.megatron.dist import BACKEND, COMMON
from reference.converters.megatron.keys import (
    EXTRA_SUFFIX,
    TE_RENAMES,
    KeyTable,
    dist_extra_states,
    extra_state_value,
)
from reference.converters.megatron.layout import MegatronLayout
from reference.converters.megatron.torch_file import own_bytes
from reference.converters.megatron.write import check_placed, mapped, prepare, record
from reference.converters.plan import Lazy
from reference.converters.safetensors_io import Progress
from reference.errors import InputError
from reference.families.keymap import GATE_UP, Fused
from reference.families.spec import ModelSpec

# What Megatron-LM's `_build_sharded_state_dict_metadata` records (megatron-core >= 0.14) and
# passes back to `sharded_state_dict()` on load: these say "stacked layers, fused fc1 as one key".
CONTENT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable", "singleton_local_shards": False,
                    "chained_optim_avoid_prefix": True}
BACKEND_RECORD = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                  "common_backend": "torch", "common_backend_version": 1}

Box = tuple[tuple[int, ...], tuple[int, ...]]  # (offsets, sizes)


def stacked(spec: ModelSpec) -> bool:
    """Whether megatron-core stacks the decoder layers into one key per parameter: unless some
    layers are mixtures and others dense (Megatron-LM's `moe_layer_freq` a list), when
    TransformerBlock.sharded_state_dict keys each layer on its own (`non_homogeneous_layers`)."""
    return spec.moe is None or all(spec.moe.on(i) for i in range(spec.num_layers))


def norm_renames(spec: ModelSpec) -> Mapping[str, str]:
    """The renames megatron-core's local layer spec gives the norms in a sharded state dict (its
    `sharded_state_dict_keys_map`: TE names), none in its latent-attention layer, which has no map."""
    return {} if spec.mla is not None else TE_RENAMES


def dist_key(template: str, layer: int | None = None, renames: Mapping[str, str] = TE_RENAMES) -> str:
    """A Megatron rule's key in the checkpoint: `renames` for the norms, layers stacked
    (`decoder.layers.{}.input_layernorm.weight` ->
    `decoder.layers.self_attention.linear_qkv.layer_norm_weight`) or, given `layer`, that
    layer's own key; routed experts' `local_experts.{}.` is SequentialMLP's `experts.` axis."""
    key = renames.get(template, template).replace("local_experts.{}.", "experts.")
    return key.replace("{}.", "" if layer is None else f"{layer}.")


def _runs(values: torch.Tensor, breaks: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """(index, length) of each run of consecutive integers in `values` (1-D), also broken
    where `breaks[i]` says a new run starts at i + 1; vectorised: a fused tensor has 10^4 rows."""
    if len(values) == 0:
        return []
    cut = values[1:] != values[:-1] + 1
    if breaks is not None:
        cut |= breaks
    starts = [0, *(torch.nonzero(cut).flatten() + 1).tolist(), len(values)]
    return [(a, b - a) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def _labels(rows: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Row labels of each part (their rows in cat(parts)) and the part of every label."""
    starts = [sum(rows[:i]) for i in range(len(rows))]
    labels = [torch.arange(s, s + n) for s, n in zip(starts, rows, strict=True)]
    return labels, torch.cat([torch.full((n,), i) for i, n in enumerate(rows)])


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
    if split == "rows":  # MLA's projections: one run of rows per rank
        per = shape[0] // tp
        return [((r * per, *(0,) * len(rest)), (per, *rest)) for r in range(tp)]
    if not isinstance(split, Fused):
        raise InputError(f"unknown Megatron split {split!r}")
    labels, part = _labels(rows)
    order = S.shard(split, labels, spec, 1, 0, 0)
    where = torch.empty_like(order)
    where[order] = torch.arange(len(order))  # label -> its row in the global tensor
    boxes = []
    for r in range(tp):
        piece = S.shard(split, labels, spec, tp, r, 0)
        # megatron-core's swiglu factory declares gate and up apart, even where they touch (TP 1);
        # linear_qkv's rank piece is one box.
        apart = part[piece[1:]] != part[piece[:-1]] if split.blocks is GATE_UP else None
        at = where[piece]
        boxes += [((int(at[i]), *(0,) * len(rest)), (n, *rest)) for i, n in _runs(at, apart)]
    return boxes


def fused_rows(parts: Sequence[torch.Tensor], order: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """Rows [start, start + n) of the fused tensor whose row i is row `order[i]` of cat(parts),
    copied once from the parts (the whole fused tensor is never built)."""
    rows = [p.shape[0] for p in parts]
    _, part = _labels(rows)
    want = order[start:start + n]
    pieces = []
    for i, m in _runs(want, part[want[1:]] != part[want[:-1]]):
        k = int(part[want[i]])
        row = int(want[i]) - sum(rows[:k])
        pieces.append(parts[k][row:row + m])
    return torch.cat(pieces)


@dataclass(frozen=True)
class Tensor:
    """One Megatron tensor of the checkpoint: its key, its index on the stacked axes (layer when
    layers are stacked, then expert for a routed expert's), the sizes of those axes, the canonical
    tensors it is cut from and its shape without those axes."""

    key: str
    index: tuple[int, ...]
    axes: tuple[int, ...]
    slot: S.Slot
    shape: tuple[int, ...]


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def _place(spec: ModelSpec, legacy: str) -> tuple[int | None, tuple[int, ...], tuple[int, ...]]:
    """(layer in the key or None, index on the stacked axes, their sizes) of a legacy key."""
    layer = _LAYER.match(legacy)
    expert = _EXPERT.search(legacy)
    index: tuple[int, ...] = ()
    axes: tuple[int, ...] = ()
    if layer is not None and stacked(spec):
        index, axes = (int(layer.group(1)),), (spec.num_layers,)
    if expert is not None:
        index, axes = (*index, int(expert.group(1))), (*axes, spec.num_experts)
    keyed = int(layer.group(1)) if layer is not None and not stacked(spec) else None
    return keyed, index, axes


def plan_tensors(spec: ModelSpec, metas: Mapping[str, torch.Tensor], padded: int) -> list[Tensor]:
    """Every Megatron tensor, in the order they are written: embedding, layer by layer, final
    norm, output layer."""
    whole = S.Stage(0, 0, spec.num_layers, True, True)
    out = []
    for slot in S.slots(spec, KeyTable("local"), whole):
        keyed, index, axes = _place(spec, slot.key)
        parts = [metas[n] for n in slot.sources]
        shape = S.shard(slot.rule.split, parts, S.width_spec(spec, slot.rule), 1, 0, padded).shape
        key = dist_key(slot.rule.key, keyed, norm_renames(spec))
        out.append(Tensor(key, index, axes, slot, tuple(shape)))
    return out


# Extra states in a layer spec's state dict that its `sharded_state_dict()` leaves out: GPTModel
# drops output_layer's, TEDotProductAttention declares only a learnable softmax offset.
UNDECLARED = ("output_layer._extra_state", ".core_attention._extra_state")


def extra_objects(spec: ModelSpec, layer_spec: str = "local") -> dict[str, str]:
    """megatron-core's ShardedObject keys for the modules' `_extra_state`, with what each holds
    ("none": Megatron's linears, "te": TransformerEngine's modules; keys.extra_states):
    `<module>._extra_state/shard_<index>_<axes>`, the stacked axes' index and sizes joined by
    dots (`shard_<layer>_<layers>`, `shard_<layer>.<expert>_<layers>.<experts>`; `shard_0_1` for a
    layer of its own and for the final norm)."""
    whole = S.Stage(0, 0, spec.num_layers, True, True)
    legacy = {**S.extra_keys(spec, layer_spec, whole),
              **S.expert_extra_keys(S.slots(spec, KeyTable(layer_spec), whole)),
              **{m + EXTRA_SUFFIX: k for m, k in dist_extra_states(layer_spec, not spec.num_experts).items()}}
    out = {}
    for key, kind in legacy.items():
        if key.endswith(UNDECLARED):
            continue
        keyed, index, axes = _place(spec, key)
        module = _EXPERT.sub(".experts.", key)
        module = _LAYER.sub("decoder.layers." + ("" if keyed is None else f"{keyed}."), module)
        index, axes = index or (0,), axes or (1,)
        out[f"{module}/shard_{'.'.join(map(str, index))}_{'.'.join(map(str, axes))}"] = kind
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


def _object_bytes(kind: str) -> io.BytesIO:
    """A ShardedObject as megatron-core's torch_dist strategy stores it: torch.save of the list
    of its local shards' data, here the one `_extra_state` value (None, or TE's empty uint8
    tensor; TE's norm ops would save a pickled empty dict, which their set_extra_state takes
    as it takes an empty tensor: no FP8 state)."""
    buf = io.BytesIO()
    torch.save([extra_state_value(kind)], buf)
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
    cast = dtype
    _, dtype, args = prepare(tensors, spec, layout, dtype)
    args.ckpt_format = "torch_dist"
    padded = args.padded_vocab_size
    metas = {n: t.meta for n, t in tensors.items()}
    plan = plan_tensors(spec, metas, padded)
    check_placed(spec, {n for t in plan for n in t.slot.sources})

    items: list[WriteItem] = []
    home: dict[tuple[str, tuple[int, ...]], tuple[Tensor, Box]] = {}
    for t in plan:
        rule = t.slot.rule
        props = TensorProperties(dtype=S.piece_dtype(rule, dtype))
        rows = [metas[n].shape[0] for n in t.slot.sources]
        size = torch.Size((*t.axes, *t.shape))
        for offsets, sizes in tp_boxes(rule.split, rows, t.shape, S.width_spec(spec, rule),
                                       S.rule_tp(rule, layout.tp, layout.expert_tp)):
            offsets, sizes = (*t.index, *offsets), (*(1,) * len(t.index), *sizes)
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
            items.append(WriteItem(index=MetadataIndex(t.key, torch.Size(offsets)), type=WriteItemType.SHARD,
                                   tensor_data=TensorWriteData(chunk=chunk, properties=props, size=size)))
            home[(t.key, tuple(offsets))] = (t, (tuple(offsets), tuple(sizes)))
    objects = extra_objects(spec, layout.layer_spec)
    items += [WriteItem(index=MetadataIndex(key), type=WriteItemType.BYTE_IO) for key in objects]
    total = sum(i.tensor_data.chunk.sizes.numel() * i.tensor_data.properties.dtype.itemsize
                for i in items if i.tensor_data is not None)

    # (Tensor, its canonical parts, their fused row order): a tensor's parts are read once for
    # all its boxes; each box is copied once out of them (a vocabulary box padded on its own).
    last: list[Any] = [None, None, None]
    written = [0]

    def resolve(item: WriteItem) -> torch.Tensor | io.BytesIO:
        if item.type == WriteItemType.BYTE_IO:
            return _object_bytes(objects[item.index.fqn])
        t, (offsets, sizes) = home[(item.index.fqn, tuple(item.index.offset))]
        split = t.slot.rule.split
        if last[0] is not t:
            last[:] = [None, None, None]  # release the previous tensor before reading the next
            parts = [mapped(tensors[n]) for n in t.slot.sources]  # views of the source's pages
            order = None
            if isinstance(split, Fused):
                labels, _ = _labels([p.shape[0] for p in parts])
                order = S.shard(split, labels, S.width_spec(spec, t.slot.rule), 1, 0, padded)
            last[:] = [t, parts, order]
            del parts
        offsets, sizes = offsets[len(t.index):], sizes[len(t.index):]
        parts, order = last[1], last[2]
        if split == "vocab":  # padded rows [offset, offset + size): a rank's rows at tp = padded / size
            box = cut.vocab_rank(parts[0], padded, padded // sizes[0], offsets[0] // sizes[0])
        elif isinstance(split, Fused):
            box = fused_rows(parts, order, offsets[0], sizes[0])
        else:
            box = parts[0]
            for dim, (o, n) in enumerate(zip(offsets, sizes, strict=True)):
                box = box.narrow(dim, o, n)
        # DCP's torch.save writes a tensor's whole storage, so a box must be all of its own: one
        # cut by cat, or a whole source tensor, is; a run of a source's rows is aliased, not
        # copied (own_bytes); only a strided box (a row-parallel weight's columns) is copied.
        kept = S.piece_dtype(t.slot.rule, dtype)
        box = own_bytes(box.to(dtype=kept, memory_format=torch.contiguous_format))
        written[0] += box.nbytes
        if progress is not None:
            progress(written[0], total)
        return box.view(*(1,) * len(t.index), *box.shape)

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
    last[:] = [None, None, None]
    (where / BACKEND).write_text(json.dumps(BACKEND_RECORD))
    record(out, family, extra, dtype if cast is not None else None)
    return len(plan), written[0]
