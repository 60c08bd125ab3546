"""Reading a Megatron-LM `torch_dist` checkpoint (PyTorch Distributed Checkpoint) as lazy
canonical tensors, in one process, without megatron-core.

megatron-core saves every tensor once, by its global shape, whatever TP/PP/VPP/EP saved it:
the TP 1 layout (linear_qkv grouped per query group, linear_fc1 as [gate; up], the vocabulary
padded), with the decoder layers stacked as one `[L, ...]` tensor per parameter by global layer
number (a mixture's experts as `[L, E, ...]`), or one key per layer where the sharded state
dict was asked for non-homogeneous layers (and the gated fc1 in two, `_w` and `_v`, with
`singleton_local_shards`). A canonical tensor is read as one layer's (one expert's) slice
through `torch.distributed.checkpoint`'s own reader and a load planner that asks for that slice
only, so one layer's tensors are in memory at a time.
"""

from __future__ import annotations

import json
import pickle
import types
import warnings
from argparse import Namespace
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from reference.converters.megatron import stage as S
from reference.converters.megatron.args import spec_from_args
from reference.converters.megatron.family import megatron_family, routing_dtype
from reference.converters.megatron.keys import EMBEDDING, OUTPUT, TE_RENAMES, KeyTable
from reference.converters.megatron.read import LastMerged, load_args_file
from reference.converters.plan import Lazy
from reference.converters.source import Source
from reference.errors import InputError
from reference.families.spec import ModelSpec, canonical_shapes

METADATA = ".metadata"
COMMON = "common.pt"
BACKEND = "metadata.json"  # megatron-core's record of the sharded backend
# Entries of a training checkpoint that are not the model's weights.
NOT_MODEL = ("optimizer.", "rng_state", "rerun_state_machine_state")


def rank_dirs(path: Path) -> list[Path]:
    """The `torch` format's per-rank directories (mp_rank_00, ...) in an iteration directory."""
    return sorted(d for d in path.glob("mp_rank_*") if d.is_dir())


def is_dist_dir(path: Path) -> bool:
    """An iteration directory megatron-core's `dist_checkpointing.save` wrote."""
    return any((path / name).is_file() for name in (METADATA, BACKEND, COMMON)) or any(path.glob("*.distcp"))


def is_dist_checkpoint(path: Path) -> bool:
    """A `torch_dist` iteration directory, or a root whose tracker names one."""
    tracker = path / S.TRACKER
    if not tracker.is_file():
        return is_dist_dir(path)
    text = tracker.read_text().strip()
    return (text == "release" or text.isdigit()) and is_dist_dir(path / S.iteration_dir(text))


# --- args from common.pt, unpickled without running code ------------------------------------

_PLAIN = {("argparse", "Namespace"): Namespace, ("types", "SimpleNamespace"): types.SimpleNamespace,
          ("collections", "OrderedDict"): OrderedDict, ("torch._utils", "_rebuild_tensor_v2"):
          torch._utils._rebuild_tensor_v2, ("torch", "Size"): torch.Size}


def _enum_value(value: Any) -> Any:
    """A megatron-core enum member (`AttnBackend.flash`) as its plain value."""
    if not isinstance(value, int | str | float | bool):
        raise pickle.UnpicklingError(f"a megatron global built from {type(value).__name__}, "
                                     "not an enum value")
    return value


class _Unpickler(pickle.Unpickler):
    """Only plain values, tensors, dtypes and Namespaces; megatron-core enums become their values
    (megatron-core is never imported)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN:
            return _PLAIN[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.split(".")[0] == "megatron":
            return _enum_value
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in {COMMON}")


_PICKLE = types.SimpleNamespace(Unpickler=_Unpickler, __name__="reference_restricted_pickle",
                                load=pickle.load)


def load_common(path: Path) -> dict[str, Any]:
    """megatron-core's common.pt (everything but the sharded tensors), restricted."""
    return load_args_file(path, f"missing (megatron-core writes it beside {METADATA})",
                          weights_only=False, pickle_module=_PICKLE)


# --- slices through torch.distributed.checkpoint ----------------------------------------------


class _SlicePlanner(DefaultLoadPlanner):
    """Reads the box `offsets`/`sizes` of every named tensor into the state dict's tensor."""

    def __init__(self, boxes: dict[str, ChunkStorageMetadata]) -> None:
        super().__init__()
        self.boxes = boxes

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, box in self.boxes.items():
            items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [box])
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self.state_dict[index.fqn]  # the box itself: read items are offset within it


class _Reader(FileSystemReader):
    """A FileSystemReader that reads `.metadata` once."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(str(path))
        self.cached = metadata

    def read_metadata(self) -> Metadata:
        return self.cached


@dataclass(frozen=True)
class Where:
    """A Megatron tensor in the checkpoint: its key, and the indices of its leading stacked dims
    that select ours (the layer of a `[L, ...]` stack; the layer and expert of `[L, E, ...]`, or
    the expert of a per-layer `[E, ...]`), with those dims' sizes."""

    key: str
    lead: tuple[int, ...] = ()
    lead_sizes: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return f"'{self.key}'" + "".join(f"[{i}]" for i in self.lead)


class _Slices:
    """One tensor (or one layer of a stacked one) at a time, the last one kept: a fused tensor
    is pulled once per canonical part."""

    def __init__(self, where: Path, metadata: Metadata) -> None:
        self.reader = _Reader(where, metadata)
        self.where = where
        self.metadata = metadata
        self.last: tuple[Where, torch.Tensor] | None = None
        self.last_joined: tuple[list[Where], torch.Tensor] | None = None

    def get(self, at: Where) -> torch.Tensor:
        if self.last is not None and self.last[0] == at:
            return self.last[1]
        md = self.metadata.state_dict_metadata[at.key]
        assert isinstance(md, TensorStorageMetadata)
        sizes, offsets = list(md.size), [0] * len(md.size)
        for d, i in enumerate(at.lead):
            sizes[d], offsets[d] = 1, i
        out = torch.empty(sizes, dtype=md.properties.dtype)
        box = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.simplefilter("ignore", UserWarning)
                dcp_load({at.key: out}, storage_reader=self.reader, planner=_SlicePlanner({at.key: box}),
                         no_dist=True)
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            raise InputError(self._unreadable(at.key, e)) from None
        tensor = out[(0,) * len(at.lead)]
        self.last = (at, tensor)
        return tensor

    def joined(self, parts: list[Where]) -> torch.Tensor:
        """The parts concatenated along their first dim (one layer's, if stacked), the last kept."""
        if len(parts) == 1:
            return self.get(parts[0])
        if self.last_joined is None or self.last_joined[0] != parts:
            self.last_joined = (parts, torch.cat([self.get(p) for p in parts]))
        return self.last_joined[1]

    def _unreadable(self, key: str, error: BaseException) -> str:
        """One line naming the file(s) holding `key` and the first failure inside the multi-line
        CheckpointException that torch.distributed.checkpoint wraps every read error in."""
        while isinstance(error, CheckpointException) and error.failures:
            error = next(iter(error.failures.values()))[0]
        files = sorted({info.relative_path for index, info in (self.metadata.storage_data or {}).items()
                        if index.fqn == key})
        where = ", ".join(str(self.where / f) for f in files) or str(self.where)
        detail = (str(error).strip().splitlines() or [""])[0][:100]
        return f"{where}: '{key}' not readable, corrupt? ({type(error).__name__}: {detail})"


# --- the checkpoint ---------------------------------------------------------------------------


def _iteration_dir(path: Path) -> tuple[Path, Path]:
    """(checkpoint root, iteration directory) of a root with the tracker or an iter_ directory."""
    if (path / S.TRACKER).is_file():
        tracker = (path / S.TRACKER).read_text().strip()
        if tracker != "release" and not tracker.isdigit():
            raise InputError(f"{path / S.TRACKER}: '{tracker}' is neither an iteration nor 'release'")
        where = path / S.iteration_dir(tracker)
        if not where.is_dir():
            raise InputError(f"{where}: missing (named by {S.TRACKER})")
        return path, where
    return path.parent, path


def _metadata(where: Path) -> Metadata:
    backend = where / BACKEND
    if backend.is_file():
        kind = json.loads(backend.read_text()).get("sharded_backend")
        if kind != "torch_dist":
            raise InputError(f"{backend}: sharded_backend {kind!r} is not read (only 'torch_dist')")
    ranks = rank_dirs(where)
    if ranks:  # both formats in one iteration: which one Megatron-LM would load is not ours to guess
        raise InputError(f"{ranks[0]}: a torch-format rank directory in a torch_dist iteration directory "
                         f"({where}); one iteration holds one format")
    if not (where / METADATA).is_file():
        raise InputError(f"{where / METADATA}: missing (the index of the .distcp files)")
    try:
        metadata = FileSystemReader(str(where)).read_metadata()
    except Exception as e:  # a corrupt pickle raises anything
        raise InputError(f"{where / METADATA}: not readable ({type(e).__name__}: {e})") from None
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        file = where / name
        if not file.is_file():
            raise InputError(f"{file}: missing (named by {METADATA})")
        if file.stat().st_size < end:
            raise InputError(f"{file}: truncated ({file.stat().st_size} bytes, {METADATA} says {end})")
    return metadata


def _stacked(template: str) -> str:
    """`decoder.layers.{}.mlp.linear_fc2.weight` -> `decoder.layers.mlp.linear_fc2.weight`."""
    return template.replace("{}.", "")


EXPERT = "local_experts.{}."  # the rules' (the torch format's) expert key: rank-local numbers


def _one(name: str, at: tuple[int, ...], counts: tuple[int, int], keys: set[str]) -> Where | None:
    """`name` (a rule key, `{}` for the layer and expert) in `keys`: stacked by layer (and by
    expert), or one key per layer (stacked by expert), or one per layer and expert
    (SequentialMLP's `singleton_local_shards`)."""
    if not at:
        return Where(name) if name in keys else None
    if EXPERT not in name:
        layouts = [(_stacked(name), at, counts[:1]), (name.format(*at), (), ())]
    else:
        # SequentialMLP's prefix is `experts.` again (`mlp.experts.experts.linear_fc1`), its
        # expert axis global; singleton_local_shards names each expert `mlp.experts.experts.{e}.`
        pooled = name.replace(EXPERT, "experts.")
        layer, expert = at
        layouts = [(_stacked(pooled), at, counts), (pooled.format(layer), (expert,), counts[1:]),
                   (name.replace("local_experts.", "experts.").format(*at), (), ())]
    for key, lead, sizes in layouts:
        if key in keys:
            return Where(key, lead, sizes)
    return None


def _locate(rule_key: str, at: tuple[int, ...], counts: tuple[int, int],
            keys: set[str]) -> list[Where] | None:
    """Where megatron-core put a rule's tensor: stacked `[L, ...]`, or per layer (sharded
    state dicts with `non_homogeneous_layers`); local-spec norms are saved under their
    TransformerEngine names; with `singleton_local_shards` a gated fc1 is two tensors, its
    gate rows under `..._w` and its up rows under `..._v` (megatron-core's
    apply_swiglu_sharded_factory), read back as the one [gate; up] tensor."""
    for name in dict.fromkeys([rule_key, TE_RENAMES.get(rule_key, rule_key)]):
        for parts in ([name], [name + "_w", name + "_v"]):
            found = [_one(part, at, counts, keys) for part in parts]
            if all(found):
                return found  # type: ignore[return-value]
    return None


def _joined_shape(parts: list[Where], tensors_md: dict[str, TensorStorageMetadata]) -> list[int]:
    """The global shape of the parts' tensors concatenated along their first non-layer dim."""
    sizes = [list(tensors_md[p.key].size) for p in parts]
    axis = len(parts[0].lead)
    if any(len(s) != len(sizes[0]) or s[:axis] + s[axis + 1:] != sizes[0][:axis] + sizes[0][axis + 1:]
           for s in sizes):
        return sizes[0] + [-1]  # parts that cannot be joined: the shape check names the first
    return [*sizes[0][:axis], sum(s[axis] for s in sizes), *sizes[0][axis + 1:]]


def _plan(where: Path, metadata: Metadata, spec: ModelSpec,
          padded: int) -> tuple[dict[str, Lazy], dict[str, str]]:
    """Canonical name -> Lazy slice; checks every model tensor's global shape and that every
    one is read."""
    md = metadata.state_dict_metadata
    tensors_md = {k: v for k, v in md.items()
                  if isinstance(v, TensorStorageMetadata) and not k.startswith(NOT_MODEL)}
    keys = set(tensors_md)
    table = KeyTable("local")
    whole = S.Stage(0, 0, spec.num_layers, True, True)
    shapes = canonical_shapes(spec)
    dtype = tensors_md[EMBEDDING].properties.dtype if EMBEDDING in tensors_md else None
    slices = _Slices(where, metadata)
    last = LastMerged()
    tensors: dict[str, Lazy] = {}
    homes: dict[str, str] = {}
    used: set[str] = set()
    for slot in S.slots(spec, table, whole):
        if slot.key == OUTPUT and spec.tie_word_embeddings:
            continue  # a tied head is the embedding
        template = slot.rule.key
        # the slot's layer (and global expert: slots are asked for at EP 1) from its key
        at = tuple(int(x) for x in slot.key.split(".") if x.isdigit())
        parts = _locate(template, at, (spec.num_layers, spec.num_experts or 0), keys)
        if parts is None:
            shown = _stacked(template.replace(EXPERT, "experts.")) if at else template
            raise InputError(f"{where}: no tensor '{shown}' in {METADATA}; the args imply it")
        used.update(p.key for p in parts)
        metas = [torch.empty(shapes[n], device="meta") for n in slot.sources]
        want = [*parts[0].lead_sizes,
                *S.shard(slot.rule.split, metas, S.width_spec(spec, slot.rule), 1, 0, padded).shape]
        named = "+".join(f"'{p.key}'" for p in parts)
        if _joined_shape(parts, tensors_md) != want:
            shown = " + ".join(str(list(tensors_md[p.key].size)) for p in parts)
            raise InputError(f"{where}: {named} has global shape {shown}, the args imply {want}")
        for p in parts:
            stored = tensors_md[p.key].properties.dtype
            dtype = dtype or stored
            if stored != S.piece_dtype(slot.rule, dtype):
                raise InputError(f"{where}: '{p.key}' is {stored}, the embedding {dtype}")
        label = "+".join(p.label for p in parts)

        def load(parts: list[Where] = parts, rule: Any = slot.rule,
                 label: str = label) -> list[list[torch.Tensor]]:
            return S.unshard_rows(rule.split, [slices.joined(parts)], S.width_spec(spec, rule),
                             f"{where}: {label}")

        for part, name in enumerate(slot.sources):
            meta = torch.empty(shapes[name], dtype=S.piece_dtype(slot.rule, dtype), device="meta")
            tensors[name] = last.lazy(meta, label, load, part)
            homes[name] = f"{where.name} {label}"
    if spec.tie_word_embeddings:
        used.add(OUTPUT)  # a tied copy, if saved, is not read
    extra = sorted(keys - used)
    if extra:
        raise InputError(f"{where}: '{extra[0]}' in {METADATA} is not read "
                         "(unknown, or the args do not imply it)")
    return tensors, homes


def read_dist(path: Path, family: str | None = None, *, any_fit: bool = False) -> Source:
    """A Megatron-LM `torch_dist` checkpoint (its root or an iter_ directory) as a Source;
    `family` is --family, `any_fit` takes the first family that fits (`family.megatron_family`)."""
    root, where = _iteration_dir(Path(path))
    metadata = _metadata(where)
    args = load_common(where / COMMON)["args"]
    spec = spec_from_args(args, str(where / COMMON))
    padded = getattr(args, "padded_vocab_size", None) or spec.vocab_size
    family_, extra = megatron_family(root, spec, family, str(where / COMMON), any_fit)
    spec = routing_dtype(spec, family_)
    tensors, homes = _plan(where, metadata, spec, padded)
    return Source(root, family_, spec, extra, tensors, lambda name: homes.get(name, name))
