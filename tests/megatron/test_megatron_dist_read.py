"""Megatron-LM `torch_dist` checkpoints saved by megatron-core 0.16.1 itself read back to HF.

A tiny HF model goes to the legacy format (our writer), into the real GPTModel at TP 2 x PP 2
under gloo on the CPU (strict load), and out through megatron-core's `dist_checkpointing.save`.
`reference convert DIST --to hf` must give the HF tensors back bitwise, with no megatron-core
at read time, reading one layer's slice at a time.
"""

from __future__ import annotations

import json
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
# (family, tied, virtual stages): VPP 2 interleaves the layers (rank 0 holds 0 and 2), yet
# megatron-core saves them by global layer number into the same [L, ...] stack.
CASES = {"llama-untied": ("llama", False, None), "qwen3-tied": ("qwen3", True, None),
         "qwen3-tied-vpp": ("qwen3", True, 2)}
TP, PP = 2, 2


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """root/NAME/hf (the original), root/NAME/legacy, root/NAME/dist (megatron-core's save)."""
    import megatron.core.models.gpt  # noqa: F401  (imported once, before the ranks fork)
    from mcore_ranks import save_dist_group

    root = tmp_path_factory.mktemp("dist")
    records = []
    for name, (family, tie, vpp) in CASES.items():
        model = tiny_model(family, tie=tie, **GQA)
        model.save_pretrained(root / name / "hf")
        layout = MegatronLayout(tp=TP, pp=PP, vpp=vpp)
        convert(root / name / "hf", root / name / "legacy", to="megatron", layout=layout)
        records.append({"dir": str(root / name / "legacy"), "dist": str(root / name / "dist"),
                        "tp": TP, "pp": PP, "vpp": vpp, "te": False})
    (root / "cases.json").write_text(json.dumps(records))
    spawn(save_dist_group, TP * PP, str(root / "cases.json"), timeout_s=240, method="fork")
    return root


def cli(*args: object) -> int:
    return main(["convert", *map(str, args)])


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("at", ["root", "iter"])
def test_torch_dist_to_hf_is_bitwise(saved, tmp_path, name: str, at: str, monkeypatch) -> None:
    src = saved / name / "dist"
    assert sorted(p.name for p in (src / "iter_0000001").glob("*.distcp"))  # megatron-core's own files
    assert not (src / "hf_source.json").exists()  # the family: --family, or the args' features
    if CASES[name][2]:  # saved by virtual stage: each of a rank's chunks of the stack is one layer
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


@pytest.mark.parametrize("remove", ["__1_0.distcp", ".metadata"])
def test_missing_file_is_one_line_exit_2(saved, tmp_path, capsys, remove: str) -> None:
    src = tmp_path / "dist"
    shutil.copytree(saved / "llama-untied" / "dist", src)
    (src / "iter_0000001" / remove).unlink()
    capsys.readouterr()
    assert cli(src, tmp_path / "out", "--to", "hf") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and remove in err and "missing" in err, err
    assert not (tmp_path / "out").exists()


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
