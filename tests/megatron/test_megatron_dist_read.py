"""Megatron-LM `torch_dist` checkpoints saved by megatron-core 0.16.1 itself read back to HF.

A tiny HF model goes to the legacy format (our writer), into the real GPTModel at TP 2 x PP 2
(x VPP 2; a mixture at TP 1 x PP 2 x EP 2) under gloo on the CPU (strict load), and out
through megatron-core's `dist_checkpointing.save`, with the sharded-state-dict metadata
Megatron-LM may pass (per-layer keys, singleton_local_shards). `reference convert DIST --to hf`
must give the HF tensors back bitwise, with no megatron-core at read time, reading one layer's
slice at a time; bad input is one line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from harness import assert_bitwise, read_tensors
from procs import spawn
from transformers import AutoModelForCausalLM

from reference.cli import main
from reference.converters import convert
from reference.converters.megatron import MegatronLayout
from reference.converters.megatron import dist as D
from reference.errors import InputError
from reference.tiny import logits, tiny_model

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.xdist_group("megatron")

GQA = {"num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 48, "head_dim": 12,
       "intermediate_size": 64, "num_hidden_layers": 4}
# (family, tied, virtual stages, sharded-state-dict metadata): VPP 2 interleaves the layers
# (rank 0 holds 0 and 2), yet megatron-core saves them by global layer number into the same
# [L, ...] stack; non_homogeneous_layers saves one key per layer instead of the stack;
# singleton_local_shards does too, and splits the gated fc1 into `_w` (gate) and `_v` (up).
PER_LAYER = {"non_homogeneous_layers": True}
SINGLETON = {"singleton_local_shards": True}
CASES = {"llama-untied": ("llama", False, None, None), "qwen3-tied": ("qwen3", True, None, None),
         "qwen3-tied-vpp": ("qwen3", True, 2, None), "qwen3-singleton": ("qwen3", False, 2, SINGLETON)}
# A mixture's experts, sharded over EP 2 (TP 1 x PP 2 x EP 2: the same 4 ranks): megatron-core
# saves them as [L, E, ...] by global expert number (SequentialMLP.sharded_state_dict).
CASES["qwen3_moe-ep2"] = ("qwen3_moe", False, None, None)
LAYOUTS = {"qwen3_moe-ep2": (1, 2, 2), "qwen3_moe-ep2-singleton": (1, 2, 2)}
if os.environ.get("REFERENCE_EQUIVALENCE") == "1":  # the gate adds what singleton already covers
    CASES["llama-per-layer"] = ("llama", True, None, PER_LAYER)
    CASES["qwen3_moe-ep2-singleton"] = ("qwen3_moe", False, None, SINGLETON)
    # a dense first layer (non-homogeneous: one key per layer) and shared experts with their gate
    CASES["qwen2_moe-dense0-ep2"] = ("qwen2_moe", True, None, None)
    LAYOUTS["qwen2_moe-dense0-ep2"] = (1, 2, 2)
TP, PP = 2, 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """root/NAME/hf (the original), root/NAME/legacy, root/NAME/dist (megatron-core's save)."""
    import megatron.core.models.gpt  # noqa: F401  (imported once, before the ranks fork)
    from mcore_ranks import save_dist_group

    root = tmp_path_factory.mktemp("dist")
    records = []
    for name, (family, tie, vpp, metadata) in CASES.items():
        tp, pp, ep = LAYOUTS.get(name, (TP, PP, 1))
        shape = GQA if ep == 1 else {"num_hidden_layers": 4}
        if "dense0" in name:
            shape = {**shape, "mlp_only_layers": [0], "intermediate_size": 64}
        model = tiny_model(family, tie=tie, **shape)
        model.save_pretrained(root / name / "hf")
        layout = MegatronLayout(tp=tp, pp=pp, vpp=vpp, ep=ep)
        convert(root / name / "hf", root / name / "legacy", to="megatron", layout=layout)
        records.append({"dir": str(root / name / "legacy"), "dist": str(root / name / "dist"),
                        "tp": tp, "pp": pp, "ep": ep, "vpp": vpp, "te": False,
                        "metadata": metadata})
    (root / "cases.json").write_text(json.dumps(records))
    spawn(save_dist_group, TP * PP, str(root / "cases.json"), timeout_s=240, method="fork")
    return root


def cli(*args: object) -> int:
    return main(["convert", *map(str, args)])


@pytest.mark.parametrize(("name", "at"), [(n, "root") for n in CASES] + [("llama-untied", "iter")])
def test_torch_dist_to_hf_is_bitwise(saved, tmp_path, name: str, at: str, monkeypatch) -> None:
    src = saved / name / "dist"
    assert sorted(p.name for p in (src / "iter_0000001").glob("*.distcp"))  # megatron-core's own files
    assert not (src / "hf_source.json").exists()  # the family: --family, or the args' features
    keys = set(D._metadata(src / "iter_0000001").state_dict_metadata)
    if CASES[name][3]:  # one key per layer, by global layer number; singleton: fc1 in two
        assert "decoder.layers.3.self_attention.linear_proj.weight" in keys
        assert not any(k.startswith("decoder.layers.self_attention") for k in keys)
        expert = "experts.experts.1." if name in LAYOUTS else ""  # SequentialMLP: one key per expert
        fc1 = f"decoder.layers.3.mlp.{expert}linear_fc1.weight"
        split = {fc1 + "_w", fc1 + "_v"}
        assert (split <= keys) == (CASES[name][3] == SINGLETON)
        common = D.load_common(src / "iter_0000001" / D.COMMON)
        assert common["content_metadata"] == CASES[name][3]
    elif "dense0" in name:  # MoE and dense layers: non-homogeneous, one key per layer
        assert {"decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.1.mlp.shared_experts.gate_weight",
                "decoder.layers.1.mlp.experts.experts.linear_fc1.weight"} <= keys
    elif name in LAYOUTS:  # every expert of a layer in one stack, whichever EP rank saved it
        assert "decoder.layers.mlp.experts.experts.linear_fc1.weight" in keys
    elif CASES[name][2]:  # saved by virtual stage: each of a rank's chunks of the stack is one layer
        args = D.load_common(src / "iter_0000001" / D.COMMON)["args"]
        assert args.virtual_pipeline_model_parallel_size == 2
        md = D._metadata(src / "iter_0000001").state_dict_metadata["decoder.layers.mlp.linear_fc2.weight"]
        assert sorted({(c.offsets[0], c.sizes[0]) for c in md.chunks}) == [(i, 1) for i in range(4)]
    reads: list[torch.Size] = []
    get = D._Slices.get
    monkeypatch.setattr(D._Slices, "get", lambda self, w: reads.append(t := get(self, w)) or t)
    family = CASES[name][0]
    # Llama's args fit Mistral, Phi-3, ... as well: megatron-core's own checkpoint needs --family.
    named = ["--family", family] if family == "llama" else []
    assert cli(src if at == "root" else src / "iter_0000001", tmp_path / "hf", "--to", "hf", *named) == 0
    original = read_tensors(saved / name / "hf")
    assert_bitwise(original, read_tensors(tmp_path / "hf"))
    # One layer's slice at a time: nothing read is larger than the largest single HF tensor
    # (the embedding, padded to the vocabulary multiple, or one layer's fused qkv/fc1).
    largest = max(t.numel() for t in original.values())
    assert reads and max(t.numel() for t in reads) <= 1.1 * largest
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == family
    ids = torch.randint(0, 250, (2, 10), generator=torch.Generator().manual_seed(3))
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    want = AutoModelForCausalLM.from_pretrained(saved / name / "hf", dtype=torch.float32).eval()
    assert torch.equal(logits(back, ids), logits(want, ids))


def fails(capsys, src: Path, out: Path, *needles: str) -> str:
    """`convert SRC OUT --to hf` exits 2 with one line holding every needle, and writes nothing."""
    capsys.readouterr()
    assert cli(src, out, "--to", "hf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("remove", ["__1_0.distcp", ".metadata", "common.pt"])
def test_missing_file_is_one_line_exit_2(saved, tmp_path, capsys, remove: str) -> None:
    src = tmp_path / "dist"
    shutil.copytree(saved / "llama-untied" / "dist", src)
    (src / "iter_0000001" / remove).unlink()
    fails(capsys, src, tmp_path / "out", f"iter_0000001/{remove}: missing")


def test_corrupt_distcp_is_one_line_naming_the_file(saved, tmp_path, capsys) -> None:
    """The same size (so .metadata's extents hold), other bytes: torch.distributed.checkpoint's
    multi-line CheckpointException becomes one line naming the file and the key."""
    src = tmp_path / "dist"
    shutil.copytree(saved / "qwen3-tied" / "dist", src)
    file = src / "iter_0000001" / "__0_0.distcp"
    file.write_bytes(b"\x01" * file.stat().st_size)
    fails(capsys, src, tmp_path / "out", str(file), "not readable, corrupt?")


def test_the_other_format_is_refused_by_name(saved, tmp_path, capsys) -> None:
    """A torch-format rank directory inside a torch_dist iteration, and a torch-format iteration
    directory given where only a root is read."""
    src = tmp_path / "dist"
    shutil.copytree(saved / "qwen3-tied" / "dist", src)
    legacy = saved / "qwen3-tied" / "legacy" / "iter_0000001"
    shutil.copytree(legacy / "mp_rank_00_000", src / "iter_0000001" / "mp_rank_00_000")
    fails(capsys, src, tmp_path / "out", "iter_0000001/mp_rank_00_000: a torch-format rank directory")
    fails(capsys, legacy, tmp_path / "out", f"{legacy}: an iteration directory of a torch-format checkpoint",
          "give the checkpoint root")


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("hidden_size", 64, "'embedding.word_embeddings.weight' has global shape [256, 48], the args imply"),
    ("num_layers", 2, "has global shape [4, 48], the args imply [2, 48]"),  # the first stacked: a norm
    ("ffn_hidden_size", 32, "'decoder.layers.mlp.linear_fc1.weight' has global shape [4, 128, 48]"),
])
def test_args_that_disagree_with_the_tensors(saved, tmp_path, capsys, field, value, needle) -> None:
    src = tmp_path / "dist"
    shutil.copytree(saved / "qwen3-tied" / "dist", src)
    common = D.load_common(src / "iter_0000001" / D.COMMON)
    setattr(common["args"], field, value)
    torch.save(common, src / "iter_0000001" / D.COMMON)
    fails(capsys, src, tmp_path / "out", needle)


def test_args_with_megatron_enums_read_as_plain_values(tmp_path) -> None:
    """Megatron-LM's parse_args puts an AttnBackend in args: common.pt is read without running
    code or importing megatron-core; the enum becomes its value."""
    from megatron.core.transformer.enums import AttnBackend

    path = tmp_path / "common.pt"
    torch.save({"args": Namespace(attention_backend=AttnBackend.flash, params_dtype=torch.bfloat16)}, path)
    args = D.load_common(path)["args"]
    assert args.attention_backend == AttnBackend.flash.value and type(args.attention_backend) is int
    assert args.params_dtype is torch.bfloat16

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("ran",))

    torch.save({"args": Namespace(x=Evil())}, path)
    with pytest.raises(InputError, match=r"print' is not allowed"):
        D.load_common(path)


def test_llama_args_name_the_families_they_fit(saved, tmp_path, capsys) -> None:
    """megatron-core's own save records no family: Llama's args are refused, naming every
    family they fit, rather than converted to the first in registry order."""
    capsys.readouterr()
    assert cli(saved / "llama-untied" / "dist", tmp_path / "out", "--to", "hf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "common.pt" in err, err
    assert "(llama, mistral, phi3, internlm2, granite)" in err and "--family NAME" in err, err
    assert not (tmp_path / "out").exists()


def test_te_names_are_what_megatron_core_saves_and_others_are_refused(saved, tmp_path, capsys) -> None:
    """torch_dist keys are TransformerEngine's whatever the spec: megatron-core's local spec maps
    its norms onto TE's fused names when it saves (its sharded_state_dict_keys_map, the same map
    as our TE_RENAMES), so a TE-spec checkpoint holds the same tensors; TE's extra states are
    byte objects, which the reader passes over as it does the local linears'. A tensor the
    reader does not map (a LayerNorm's bias in TE's name) is refused by name."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    from reference.converters.megatron.keys import TE_RENAMES

    mapped = get_gpt_layer_local_spec().submodules.sharded_state_dict_keys_map
    prefix = "decoder.layers.{}."
    assert {prefix + k + "weight": prefix + v + "weight" for k, v in mapped.items()} == TE_RENAMES
    src = tmp_path / "dist"
    shutil.copytree(saved / "qwen3-tied" / "dist", src)
    md = D._metadata(src / "iter_0000001")
    entries = md.state_dict_metadata
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in entries
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in entries)
    extra = [k for k in entries if "_extra_state" in k]
    assert extra and all(isinstance(entries[k], BytesStorageMetadata) for k in extra)
    norm = entries["decoder.layers.self_attention.linear_qkv.layer_norm_weight"]
    assert isinstance(norm, TensorStorageMetadata)
    entries["decoder.layers.self_attention.linear_qkv.layer_norm_bias"] = norm
    (src / "iter_0000001" / D.METADATA).write_bytes(pickle.dumps(md))
    fails(capsys, src, tmp_path / "out", "'decoder.layers.self_attention.linear_qkv.layer_norm_bias' in "
          ".metadata is not read")


def test_experts_the_args_imply_must_be_there(saved, tmp_path, capsys) -> None:
    """Args that describe experts over a dense checkpoint's tensors: the missing expert stack
    is named, in megatron-core's key (SequentialMLP's `experts.experts.`)."""
    src = tmp_path / "dist"
    shutil.copytree(saved / "qwen3-tied" / "dist", src)
    common = D.load_common(src / "iter_0000001" / D.COMMON)
    args = common["args"]
    args.num_experts, args.moe_router_topk, args.moe_ffn_hidden_size = 4, 2, 32
    torch.save(common, src / "iter_0000001" / D.COMMON)
    fails(capsys, src, tmp_path / "out", "no tensor 'decoder.layers.mlp.router.weight'")
