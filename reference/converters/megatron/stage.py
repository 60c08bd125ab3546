"""What one rank file of a Megatron-LM `torch` checkpoint holds: file names, the tensors of a
(virtual) pipeline stage, and one TP rank's piece of each."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from reference.converters.megatron import cut
from reference.converters.megatron.keys import EMBEDDING, EXTRA_SUFFIX, OUTPUT, KeyTable, Rule, extra_states
from reference.errors import InputError
from reference.families.keymap import Fused
from reference.families.spec import ModelSpec, canonical_names

TRACKER = "latest_checkpointed_iteration.txt"
# Megatron-LM refuses iteration 0 ("assert iteration > 0 or release"); its own HF converters
# save iteration 1 too. Load with --finetune (or --no-load-optim --no-load-rng): no optimizer.
ITERATION = 1
FILE = "model_optim_rng.pt"
CHECKPOINT_VERSION = 3.0


def iteration_dir(tracker: str) -> str:
    """The directory a tracker's content names: `release`, or `iter_0000001` for 1."""
    return "release" if tracker == "release" else f"iter_{int(tracker):07d}"


def rank_dir(tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    """`mp_rank_TT` without pipeline parallelism, `mp_rank_TT_PPP` with it, and `_EEE` after
    either with expert parallelism (Megatron-LM's `get_checkpoint_name`)."""
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return name if ep == 1 else f"{name}_{ep_rank:03d}"


def rank_file(root: Path, iteration: str, tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0,
              ep: int = 1) -> Path:
    return root / iteration_dir(iteration) / rank_dir(tp_rank, pp_rank, pp, ep_rank, ep) / FILE


def rank_files(tp: int, etp: int, ep: int) -> list[tuple[int, int, int]]:
    """(tp rank, ep rank, expert-TP rank) of every rank file of one pipeline stage, ordered by
    name: a file per (tp rank, ep rank) pair that some rank of a job at this layout loads, with
    the experts that rank holds. megatron-core orders a stage's ranks tp fastest for the dense
    part and etp, then ep for the experts (`RankGenerator`, order "tp-cp-ep-dp-pp"), so local
    rank l is dense TP rank l % tp, EP rank (l // etp) % ep and expert-TP rank l % etp; the
    pairs repeat every lcm(tp, etp * ep) ranks. With etp dividing tp a file's expert-TP rank is
    its TP rank % etp whichever rank loads it (`layout.check_experts` refuses the rest)."""
    period = math.lcm(tp, etp * ep)
    return sorted({(r % tp, (r // etp) % ep, r % etp) for r in range(period)})


def model_key(chunk: int, vpp: int | None) -> str:
    """`model`, or `model0`..`model{V-1}` with virtual pipeline stages."""
    return "model" if vpp is None else f"model{chunk}"


@dataclass(frozen=True)
class Stage:
    """Virtual stage `index` (= chunk * pp + pp_rank): layers [start, start + count)."""

    index: int
    start: int
    count: int
    first: bool
    last: bool


def stages(counts: Sequence[int]) -> list[Stage]:
    """Every virtual stage, in Megatron's order, from its layer counts."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    n = len(counts)
    return [Stage(i, starts[i], counts[i], i == 0, i == n - 1) for i in range(n)]


@dataclass(frozen=True)
class Slot:
    """One tensor of a stage file: its key, rule and the canonical tensors it is made of."""

    key: str
    rule: Rule
    sources: tuple[str, ...]


def slots(spec: ModelSpec, table: KeyTable, stage: Stage, ep_rank: int = 0, ep: int = 1) -> list[Slot]:
    """The tensors of a stage file: embedding, layer by layer, final norm, output layer; of a
    mixture's experts, those of expert-parallel rank `ep_rank` (of `ep`), numbered from 0."""
    have = set(canonical_names(spec))
    local = spec.num_experts // ep
    out = []
    for rule in table.rules:
        if "{}" not in rule.key or rule.latent not in (None, spec.mla is not None):
            continue
        for i in range(stage.count):
            if rule.width == "experts":
                pairs = [((i, j), (stage.start + i, ep_rank * local + j)) for j in range(local)]
            else:
                pairs = [((i,), (stage.start + i,))]
            for key_at, name_at in pairs:
                names = tuple(c.format(*name_at) for c in rule.canonical)
                if all(n in have for n in names):
                    out.append(Slot(rule.key.format(*key_at), rule, names))
    out.sort(key=lambda s: int(s.key.split(".")[2]))  # layer by layer, rules in order
    by_key = {r.key: r for r in table.rules}
    if stage.first:
        out.insert(0, Slot(EMBEDDING, by_key[EMBEDDING], ("embed.weight",)))
    if stage.last:
        out.append(Slot("decoder.final_layernorm.weight", by_key["decoder.final_layernorm.weight"],
                        ("norm.weight",)))
        # A tied head lives in the embedding; a last stage without it needs its own copy.
        if not spec.tie_word_embeddings:
            out.append(Slot(OUTPUT, by_key[OUTPUT], ("lm_head.weight",)))
        elif not stage.first:
            out.append(Slot(OUTPUT, by_key[OUTPUT], ("embed.weight",)))
    return out


def extra_keys(spec: ModelSpec, layer_spec: str, stage: Stage) -> dict[str, str]:
    """`_extra_state` key -> kind ("none" or "te") of a stage file."""
    out = {}
    for module, kind in extra_states(layer_spec, spec.qk_norm, spec.mla).items():
        if "{}" in module:
            # a mixture's layers have no dense linear_fc1/fc2 (`expert_extra_keys` has theirs)
            layers = [i for i in range(stage.count) if not (".mlp." in module and spec.moe is not None
                                                            and spec.moe.on(stage.start + i))]
            out.update({module.format(i) + EXTRA_SUFFIX: kind for i in layers})
        elif stage.last:
            out[module + EXTRA_SUFFIX] = kind
    return out


def expert_extra_keys(slots: Sequence[Slot]) -> dict[str, str]:
    """`_extra_state` keys of the experts' and shared expert's linears (local spec: None)."""
    return {slot.key.removesuffix(".weight") + EXTRA_SUFFIX: "none" for slot in slots
            if slot.rule.width != "dense" and slot.key.endswith(("linear_fc1.weight", "linear_fc2.weight"))}


def width_spec(spec: ModelSpec, rule: Rule) -> ModelSpec:
    """The spec a rule's split sees: its MLP width as `intermediate_size` (`Rule.width`)."""
    if rule.width == "dense" or spec.moe is None:
        return spec
    size = spec.moe.expert_size if rule.width == "experts" else spec.moe.shared_size
    return spec.replace(intermediate_size=size)


def piece_dtype(rule: Rule, dtype: torch.dtype) -> torch.dtype:
    """The dtype a rule's tensor is stored in, in a checkpoint of `dtype`."""
    return torch.float32 if rule.fp32 else dtype


def rule_tp(rule: Rule, tp: int, etp: int) -> int:
    """The tensor-parallel size (or rank) a rule is split over: expert TP for routed experts."""
    return etp if rule.width == "experts" else tp


def _unknown(split: object) -> InputError:
    return InputError(f"unknown Megatron split {split!r}: want replicated, vocab, cols, rows or a Fused "
                      "layout")


def shard(split: str | Fused, parts: Sequence[torch.Tensor], spec: ModelSpec, tp: int, rank: int,
          padded: int) -> torch.Tensor:
    """TP rank's piece of the Megatron tensor made of `parts` (full canonical tensors)."""
    if isinstance(split, Fused):
        return cut.fused_rank(split, parts, spec, tp, rank)
    if split == "replicated":
        return parts[0]
    if split == "vocab":
        return cut.vocab_rank(parts[0], padded, tp, rank)
    if split == "cols":
        return cut.cols_rank(parts[0], tp, rank)
    if split == "rows":
        return parts[0].chunk(tp)[rank]
    raise _unknown(split)


def shard_rows(split: str | Fused, parts: Sequence[torch.Tensor], spec: ModelSpec, tp: int, rank: int,
               padded: int) -> list[torch.Tensor]:
    """`shard` as row blocks to be concatenated (views of the parts, a padded vocabulary's
    zeros), so that a writer can concatenate them into memory it reuses."""
    if isinstance(split, Fused):
        return cut.fused_blocks(split, parts, spec, tp, rank)
    if split == "vocab":
        return cut.vocab_blocks(parts[0], padded, tp, rank)
    return [shard(split, parts, spec, tp, rank, padded)]


def unshard_rows(split: str | Fused, pieces: Sequence[torch.Tensor], spec: ModelSpec,
                 where: str) -> list[list[torch.Tensor]]:
    """The full canonical tensors from every TP rank's piece, each as row blocks to be
    concatenated (views of the pieces; a row-parallel weight's columns are joined here, as they
    are not rows), so that a writer can write them one after another."""
    if isinstance(split, Fused):
        return cut.fused_rows(split, pieces, spec)
    if split == "replicated":
        for r, p in enumerate(pieces[1:], 1):
            if not torch.equal(p, pieces[0]):
                raise InputError(f"{where}: replicated tensor differs between TP ranks 0 and {r}")
        return [[pieces[0]]]
    if split == "vocab":
        return [cut.vocab_rows(pieces, spec.vocab_size)]
    if split == "cols":
        return [[pieces[0] if len(pieces) == 1 else torch.cat(list(pieces), dim=1)]]
    if split == "rows":
        return [list(pieces)]
    raise _unknown(split)


def unshard(split: str | Fused, pieces: Sequence[torch.Tensor], spec: ModelSpec,
            where: str) -> list[torch.Tensor]:
    """The full canonical tensors from every TP rank's piece."""
    return [cut.cat_rows(blocks) for blocks in unshard_rows(split, pieces, spec, where)]
