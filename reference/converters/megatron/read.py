"""Reading a Megatron-LM `torch` checkpoint as lazy canonical tensors.

Opening checks every rank file against the args (keys, shapes, dtypes, layers per stage)
without reading tensor data: files are memory-mapped. A canonical tensor is merged from its
TP pieces when pulled (or handed to a writer as those pieces' row blocks, `Lazy.rows`); the
rank files are mapped for one layer at a time.
"""

from __future__ import annotations

import pickle
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from reference.converters.megatron import stage as S
from reference.converters.megatron.args import layout_from_args, spec_from_args
from reference.converters.megatron.cut import cat_rows
from reference.converters.megatron.family import megatron_family, routing_dtype
from reference.converters.megatron.keys import EXTRA_SUFFIX, OUTPUT, KeyTable
from reference.converters.megatron.layout import MegatronLayout, check_layout, padded_vocab
from reference.converters.plan import Lazy
from reference.converters.source import Source
from reference.errors import InputError
from reference.families.spec import ModelSpec, canonical_shapes

# Unpickled without running arbitrary code: tensors, plain values and the args Namespace.
SAFE = [Namespace, SimpleNamespace]


def load_args_file(path: Path, missing: str, **load: Any) -> dict[str, Any]:
    """A torch-saved dict holding Megatron-LM's `args` (a rank file, or torch_dist's common.pt),
    loaded with `load`'s torch.load options; each failure one line naming the file."""
    try:
        state = torch.load(path, map_location="cpu", **load)
    except FileNotFoundError:
        raise InputError(f"{path}: {missing}") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise InputError(f"{path}: not a readable torch checkpoint ({reason})") from None
    if not isinstance(state, dict) or not isinstance(state.get("args"), Namespace):
        raise InputError(f"{path}: no 'args' Namespace (not a Megatron-LM checkpoint)")
    return state


def load_rank_file(path: Path) -> dict[str, Any]:
    """One rank file, memory-mapped: tensor data is read only when touched."""
    # safe_globals() removes on exit what it was given, even a global registered before it:
    # megatron-core registers Namespace at import, and its own loads need it afterwards.
    missing = [g for g in SAFE if g not in torch.serialization.get_safe_globals()]
    with torch.serialization.safe_globals(missing):
        return load_args_file(path, "missing rank file", mmap=True, weights_only=True)


@dataclass(frozen=True)
class Checkpoint:
    """What the args of the first rank file say the checkpoint is."""

    root: Path
    tracker: str
    spec: ModelSpec
    layout: MegatronLayout
    counts: tuple[int, ...]  # decoder layers of every virtual stage
    table: KeyTable
    dtype: torch.dtype

    def file(self, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> Path:
        return S.rank_file(self.root, self.tracker, tp_rank, pp_rank, self.layout.pp, ep_rank, self.layout.ep)

    def ranks(self) -> list[tuple[int, int, int]]:
        """(tp, pp, ep) rank of every file, in Megatron-LM's order of names (`S.rank_files`)."""
        lay = self.layout
        return [(t, p, e) for t, e, _ in S.rank_files(lay.tp, lay.expert_tp, lay.ep) for p in range(lay.pp)]

    def holders(self, experts: bool, rank: int, ep_rank: int) -> list[tuple[int, int]]:
        """(tp, ep) ranks of the files holding TP rank `rank`'s piece of a dense tensor (every EP
        rank has a copy), or of EP rank `ep_rank`'s routed experts (expert-TP rank `rank`, in
        every file whose TP rank it is modulo etp)."""
        lay = self.layout
        files = S.rank_files(lay.tp, lay.expert_tp, lay.ep)
        if experts:
            return [(t, e) for t, e, a in files if (e, a) == (ep_rank, rank)]
        return [(t, e) for t, e, _ in files if t == rank]

    def stages_of(self, pp_rank: int) -> list[S.Stage]:
        """The virtual stages pipeline rank `pp_rank` holds, as model0, model1, ..."""
        return S.stages(self.counts)[pp_rank::self.layout.pp]


def _tracker(root: Path) -> str:
    text = (root / S.TRACKER).read_text().strip()
    if text != "release" and not text.isdigit():
        raise InputError(f"{root / S.TRACKER}: '{text}' is neither an iteration nor 'release'")
    return text


def _first_file(root: Path, tracker: str) -> Path:
    for pp in (1, 2):  # the directory name says whether the checkpoint is pipelined
        for ep in (1, 2):  # and whether it is expert-parallel
            path = S.rank_file(root, tracker, 0, 0, pp, 0, ep)
            if path.is_file():
                return path
    raise InputError(f"{root / S.iteration_dir(tracker)}: missing rank file mp_rank_00[_000][_000]/{S.FILE}")


def _dtype(state: dict[str, Any], path: Path) -> torch.dtype:
    """The dtype of the first floating tensor of a rank file."""
    for model in state.values():
        for t in model.values() if isinstance(model, dict) else ():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return t.dtype
    raise InputError(f"{path}: holds no floating tensor")


def _open(root: Path) -> Checkpoint:
    tracker = _tracker(root)
    first = _first_file(root, tracker)
    state = load_rank_file(first)
    spec = spec_from_args(state["args"], str(first))
    layout, counts = layout_from_args(state["args"], str(first))
    try:
        check_layout(spec, replace(layout, pp_layers=counts))
    except InputError as e:
        raise InputError(f"{first}: args: {e}") from None
    return Checkpoint(root, tracker, spec, layout, counts, KeyTable(layout.layer_spec), _dtype(state, first))


def _check_rank_dirs(ck: Checkpoint) -> None:
    """Every rank file the args imply exists, and no other rank directory does."""
    tp, pp, ep = ck.layout.tp, ck.layout.pp, ck.layout.ep
    said = f"tp {tp}, pp {pp}" + (f", ep {ep}" if ep > 1 else "")
    for t, p, e in ck.ranks():
        if not ck.file(t, p, e).is_file():
            raise InputError(f"{ck.file(t, p, e)}: missing rank file (args say {said})")
    want = {S.rank_dir(t, p, pp, e, ep) for t, p, e in ck.ranks()}
    where = ck.root / S.iteration_dir(ck.tracker)
    odd = sorted(d.name for d in where.iterdir() if d.name.startswith("mp_rank_") and d.name not in want)
    if odd:
        raise InputError(f"{where / odd[0]}: rank directory the args do not imply ({said})")


def _piece_shape(ck: Checkpoint, slot: S.Slot, tp_rank: int, padded: int) -> list[int]:
    """The shape the args imply for a slot's piece in the file of TP rank `tp_rank` (whose
    expert-TP rank is tp_rank % etp: `S.rank_files`)."""
    shapes = canonical_shapes(ck.spec)
    metas = [torch.empty(shapes[n], device="meta") for n in slot.sources]
    tp = S.rule_tp(slot.rule, ck.layout.tp, ck.layout.expert_tp)
    width = S.width_spec(ck.spec, slot.rule)
    return list(S.shard(slot.rule.split, metas, width, tp, tp_rank % tp, padded).shape)


def _check_file(ck: Checkpoint, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> None:
    """Raise, naming the file and key, unless the file holds exactly what the args imply."""
    path = ck.file(tp_rank, pp_rank, ep_rank)
    state = load_rank_file(path)
    args = state["args"]
    said = (spec_from_args(args, str(path)), layout_from_args(args, str(path)))
    if said != (ck.spec, (ck.layout, ck.counts)):
        raise InputError(f"{path}: args differ from those of the first rank file")
    padded = padded_vocab(ck.spec.vocab_size, ck.layout.vocab_divisor, ck.layout.tp)
    for chunk, st in enumerate(ck.stages_of(pp_rank)):
        name = S.model_key(chunk, ck.layout.vpp)
        model = state.get(name)
        if not isinstance(model, dict):
            raise InputError(f"{path}: no '{name}' state dict (args say vpp {ck.layout.vpp})")
        slots = S.slots(ck.spec, ck.table, st, ep_rank, ck.layout.ep)
        for slot in slots:
            where = f"{path}: {name} '{slot.key}'"
            if slot.key not in model:
                raise InputError(f"{where} is missing; the args imply it")
            want = _piece_shape(ck, slot, tp_rank, padded)
            got = model[slot.key]
            if list(got.shape) != want:
                raise InputError(f"{where} has shape {list(got.shape)}, the args imply {want}")
            if got.dtype != S.piece_dtype(slot.rule, ck.dtype):
                raise InputError(f"{where} is {got.dtype}, want {S.piece_dtype(slot.rule, ck.dtype)}")
        known = {s.key for s in slots}
        for key in model:
            if key in known or key.endswith(EXTRA_SUFFIX):
                continue
            if not ck.table.knows(key):
                spec = ck.layout.layer_spec
                raise InputError(f"{path}: {name} holds '{key}', unknown to the {spec} layer spec")
            raise InputError(f"{path}: {name} holds '{key}', which the args do not imply")


class _Files:
    """The rank files of one pipeline rank, opened (mapped) anew for each layer: a stage is read
    front to back, and the pages read through a file's map stay in the process's RSS until the
    map closes, so keeping a pipeline rank's files open held all of them by the end. Opening a
    rank file again costs its pickle (a few ms), once per layer and TP rank."""

    def __init__(self, ck: Checkpoint) -> None:
        self.ck = ck
        self.at: tuple[int, str, str] | None = None
        self.open: dict[tuple[int, int], dict[str, Any]] = {}

    def get(self, tp_rank: int, pp_rank: int, ep_rank: int, model: str, key: str) -> dict[str, Any]:
        """The rank file holding `key` of `model`; the files of another layer are let go."""
        parts = key.split(".")
        at = (pp_rank, model, parts[2] if key.startswith("decoder.layers.") else "")
        if at != self.at:
            self.open.clear()
            self.at = at
        if (tp_rank, ep_rank) not in self.open:
            self.open[tp_rank, ep_rank] = load_rank_file(self.ck.file(tp_rank, pp_rank, ep_rank))
        return self.open[tp_rank, ep_rank]


class LastMerged:
    """The canonical parts of the Megatron tensor merged last, each as its row blocks (views of
    the TP pieces): a fused tensor's parts are pulled one after another (q, k, v), and merging
    the whole tensor again for each part was most of a reader's copying. Holding one tensor's
    pieces keeps memory at one tensor."""

    def __init__(self) -> None:
        self.key: object = None
        self.parts: list[list[torch.Tensor]] = []

    def get(self, key: object, merge: Callable[[], list[list[torch.Tensor]]]) -> list[list[torch.Tensor]]:
        if key != self.key:
            self.key, self.parts = None, []  # release the last tensor before merging the next
            self.parts = merge()
            self.key = key
        return self.parts

    def lazy(self, meta: torch.Tensor, key: object, merge: Callable[[], list[list[torch.Tensor]]],
             part: int) -> Lazy:
        """Part `part` of the tensor `merge` gives: concatenated by `load`, or as its row blocks
        for a writer that writes them in order (`Lazy.rows`)."""
        return Lazy(meta, lambda: cat_rows(self.get(key, merge)[part]),
                    rows=lambda: self.get(key, merge)[part])


def _merger(files: _Files, slot: S.Slot, pp_rank: int, ep_rank: int, model: str,
            where: str) -> Callable[[], list[list[torch.Tensor]]]:
    ck = files.ck
    tp = S.rule_tp(slot.rule, ck.layout.tp, ck.layout.expert_tp)

    # Each EP rank's file holds a copy of what is not an expert, and with etp < tp several files
    # of an EP rank hold the same expert-TP piece: the copies must agree, as replicated tensors
    # must across TP ranks.
    homes = [ck.holders(slot.rule.width == "experts", r, ep_rank) for r in range(tp)]

    def load() -> list[list[torch.Tensor]]:
        pieces = [files.get(t, pp_rank, e, model, slot.key)[model][slot.key] for (t, e), *_ in homes]
        for piece, (first, *copies) in zip(pieces, homes, strict=True):
            for t, e in copies:
                if not torch.equal(files.get(t, pp_rank, e, model, slot.key)[model][slot.key], piece):
                    raise InputError(f"{ck.file(t, pp_rank, e)}: {model} '{slot.key}' differs from "
                                     f"its copy in {ck.file(first[0], pp_rank, first[1]).parent.name}")
        return S.unshard_rows(slot.rule.split, pieces, S.width_spec(ck.spec, slot.rule), where)

    return load


def _lazy_tensors(ck: Checkpoint) -> tuple[dict[str, Lazy], dict[str, str]]:
    """Canonical name -> Lazy merge from the rank files; and -> its Megatron key, for messages."""
    files = _Files(ck)
    last = LastMerged()
    shapes = canonical_shapes(ck.spec)
    tensors: dict[str, Lazy] = {}
    homes: dict[str, str] = {}
    ep = ck.layout.ep
    for pp_rank in range(ck.layout.pp):
        for chunk, st in enumerate(ck.stages_of(pp_rank)):
            model = S.model_key(chunk, ck.layout.vpp)
            for ep_rank, slot in ((e, s) for e in range(ep) for s in S.slots(ck.spec, ck.table, st, e, ep)):
                if slot.key == OUTPUT and ck.spec.tie_word_embeddings:
                    continue  # the last stage's copy of a tied embedding
                if ep_rank and slot.rule.width != "experts":
                    continue  # every EP rank's file has a copy of the rest: read EP rank 0's
                ranks = ("mp_rank_*" + (f"_{pp_rank:03d}" if ck.layout.pp > 1 else "")
                         + (f"_{ep_rank:03d}" if ep > 1 else ""))
                where = f"{ranks} {model} '{slot.key}'"
                load = _merger(files, slot, pp_rank, ep_rank, model, where)
                for part, name in enumerate(slot.sources):
                    meta = torch.empty(shapes[name], dtype=S.piece_dtype(slot.rule, ck.dtype), device="meta")
                    tensors[name] = last.lazy(meta, where, load, part)
                    homes[name] = where
    return tensors, homes


def read_megatron(path: Path, family: str | None = None, *, any_fit: bool = False) -> Source:
    """A Megatron-LM checkpoint directory as a Source: family as `family.megatron_family` says
    (`family` is --family; `any_fit` takes the first that fits), spec from the args, canonical
    tensors merged over TP (vocabulary trimmed) when pulled. A `torch_dist` checkpoint is read
    by `dist.read_dist`."""
    from reference.converters.megatron.dist import is_dist_checkpoint, rank_dirs, read_dist

    if is_dist_checkpoint(Path(path)):
        return read_dist(Path(path), family, any_fit=any_fit)
    if not (Path(path) / S.TRACKER).is_file() and rank_dirs(Path(path)):
        raise InputError(f"{path}: an iteration directory of a torch-format checkpoint (it holds "
                         f"{rank_dirs(Path(path))[0].name}); give the checkpoint root, whose {S.TRACKER} "
                         "names the iteration")
    ck = _open(Path(path))
    family, extra = megatron_family(ck.root, ck.spec, family, str(ck.file(0, 0)), any_fit)
    _check_rank_dirs(ck)
    for tp_rank, pp_rank, ep_rank in ck.ranks():
        _check_file(ck, tp_rank, pp_rank, ep_rank)
    tensors, homes = _lazy_tensors(ck)
    spec = routing_dtype(ck.spec, family)
    return Source(ck.root, family, spec, extra, tensors, lambda name: homes.get(name, name))
