"""One HF tensor stacking every expert's along dim 0 (GraniteMoE's input_linear and
output_linear): the ExpertStack rule cuts it into canonical per-expert tensors and stacks them
back bitwise, reads one expert without reading the stack, and writes one stack at a time.
Logits against transformers and HF -> unified -> HF are the shared harness's (test_moe.py,
test_unified.py, test_equivalence.py)."""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Iterator
from dataclasses import replace

import pytest
import safetensors.torch
import torch
from harness import tiny_spec

from reference.cli import main
from reference.converters.plan import read_canonical
from reference.converters.safetensors_io import Entry, read_dir
from reference.families.keymap import GATE_UP, ExpertStack, Fused, KeyMap
from reference.families.registry import FAMILIES
from reference.families.spec import canonical_names
from reference.tiny import save_tiny

_EXPERT = "layers.{}.mlp.experts.{}."
GATE_UP_STACK = ExpertStack(Fused((_EXPERT + "gate.weight", _EXPERT + "up.weight"), GATE_UP))
DOWN_STACK = ExpertStack(_EXPERT + "down.weight")
STACKED = "model.layers.1.block_sparse_moe.input_linear.weight"


def test_split_cuts_each_expert_at_its_own_width_and_merge_restores_it_bitwise() -> None:
    spec = tiny_spec("qwen3_moe", False)  # experts of 32 rows beside a dense MLP of 112
    size, h, n = spec.moe.expert_size, spec.hidden_size, spec.num_experts
    assert size != spec.intermediate_size
    stacked = torch.randn(n, 2 * size, h)
    parts = GATE_UP_STACK.split(stacked, spec)
    assert len(parts) == 2 * n
    for e in range(n):  # expert-major: expert e's gate rows, then its up rows
        assert torch.equal(parts[2 * e], stacked[e, :size])
        assert torch.equal(parts[2 * e + 1], stacked[e, size:])
    back = GATE_UP_STACK.merge((parts[2 * e:2 * e + 2] for e in range(n)), spec)
    assert back.dtype == stacked.dtype and torch.equal(back, stacked)
    down = torch.randn(n, h, size).to(torch.bfloat16)
    assert torch.equal(DOWN_STACK.merge(([t] for t in DOWN_STACK.split(down, spec)), spec), down)
    with pytest.raises(Exception, match="3 experts"):
        GATE_UP_STACK.split(stacked[:3], spec)


def test_merge_holds_one_expert_at_a_time() -> None:
    """Each expert's parts are pulled when needed and dropped once copied into the stack."""
    spec = tiny_spec("qwen3_moe", False)
    size, h = spec.moe.expert_size, spec.hidden_size
    alive: list[weakref.ref] = []

    def experts() -> Iterator[list[torch.Tensor]]:
        for e in range(spec.num_experts):
            gc.collect()
            # at most the expert merge is copying and this one: every earlier one is gone
            assert all(r() is None for r in alive[:max(0, 2 * (e - 1))]), e
            parts = [torch.full((size, h), float(e)), torch.full((size, h), -float(e))]
            alive.extend(weakref.ref(p) for p in parts)
            yield parts

    stacked = GATE_UP_STACK.merge(experts(), spec)
    assert [stacked[e, 0, 0].item() for e in range(spec.num_experts)] == list(range(spec.num_experts))


def test_every_canonical_expert_tensor_has_one_home_and_finds_its_way_back() -> None:
    """The inverse is derived: a canonical name's HF home and part index, and that HF tensor's
    canonical names at that index, agree for every tensor of the model."""
    spec, keys = tiny_spec("granitemoe", False), FAMILIES["granitemoe"].keys
    expert_names = [n for n in canonical_names(spec) if ".experts." in n]
    assert len(expert_names) == 3 * spec.num_layers * spec.num_experts
    for name in canonical_names(spec):
        hf, part = keys.hf(name, "granitemoe")
        names, rule = keys.canonical(hf, "here")
        full = rule.names(names, spec) if isinstance(rule, ExpertStack) else names
        assert full[part] == name, (name, hf, part)


def test_one_expert_is_read_by_itself_and_each_stacked_byte_once(tmp_path, monkeypatch) -> None:
    src = save_tiny("granitemoe", tmp_path / "src")
    reads: list[tuple[int, int]] = []
    load = Entry.load
    monkeypatch.setattr(Entry, "load", lambda self: reads.append((self.start, self.length)) or load(self))
    entries = read_dir(src)
    spec = FAMILIES["granitemoe"].read(json.loads((src / "config.json").read_text()), "src")
    tensors = read_canonical(entries, FAMILIES["granitemoe"], spec, "src")
    assert not reads  # names and shapes only

    stack = entries[STACKED]
    per_expert = stack.length // spec.num_experts
    up = tensors["layers.1.mlp.experts.2.up.weight"]
    assert up.entry is not None  # bytes unchanged: a writer copies them, the unified model maps them
    got = up.load()
    (start, length), = reads  # one read, of the up rows of expert 2 only
    assert length == per_expert // 2 and stack.start + 2 * per_expert + length == start
    whole = safetensors.torch.load_file(src / "model.safetensors")[STACKED]
    assert torch.equal(got, whole[2, spec.moe.expert_size:])

    reads.clear()
    stacked = [e for k, e in entries.items() if k.endswith("_linear.weight")]
    for name, lazy in tensors.items():
        if ".experts." in name:
            lazy.load()
    assert sum(length for _, length in reads) == sum(e.length for e in stacked)  # each byte once
    assert max(length for _, length in reads) <= per_expert


def test_a_part_of_several_blocks_is_cut_from_its_expert_alone(tmp_path, monkeypatch) -> None:
    """An inner rule whose parts interleave (half the gate rows, half the up rows, the rest of
    each): each part is cut from its own expert's slice, never from the stack."""
    src = save_tiny("granitemoe", tmp_path / "src")
    spec = FAMILIES["granitemoe"].read(json.loads((src / "config.json").read_text()), "src")
    half = spec.moe.expert_size // 2
    interleaved = Fused((_EXPERT + "gate.weight", _EXPERT + "up.weight"),
                        lambda s: [(0, half), (1, half), (0, half), (1, half)])
    rules = {**FAMILIES["granitemoe"].keys.rules,
             "model.layers.{}.block_sparse_moe.input_linear.weight": ExpertStack(interleaved)}
    family = replace(FAMILIES["granitemoe"], keys=KeyMap(rules))
    reads: list[int] = []
    load = Entry.load
    monkeypatch.setattr(Entry, "load", lambda self: reads.append(self.length) or load(self))
    tensors = read_canonical(read_dir(src), family, spec, "src")
    whole = safetensors.torch.load_file(src / "model.safetensors")[STACKED]
    got = tensors["layers.1.mlp.experts.3.up.weight"].load()
    assert reads == [whole[3].numel() * whole.element_size()]  # expert 3's slice, not the stack
    assert torch.equal(got, torch.cat([whole[3, half:2 * half], whole[3, 3 * half:]]))


def test_a_stack_of_other_than_the_configs_experts_is_refused_naming_it(tmp_path, capsys) -> None:
    src = save_tiny("granitemoe", tmp_path / "src")
    tensors = safetensors.torch.load_file(src / "model.safetensors")
    tensors[STACKED] = tensors[STACKED][:3].clone()
    safetensors.torch.save_file(tensors, src / "model.safetensors", {"format": "pt"})
    capsys.readouterr()
    assert main(["convert", str(src), str(tmp_path / "dst"), "--to", "unified"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and STACKED in err and "4 experts" in err, err
    assert not (tmp_path / "dst").exists()
