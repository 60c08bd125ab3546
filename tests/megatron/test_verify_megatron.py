"""`reference verify` with a Megatron side run by megatron-core itself, in spawned ranks under
gloo: HF <-> Megatron `torch` (TP 1 x PP 2, stages sending to each other) and HF <-> Megatron
`torch_dist` (TP 2, loaded by megatron-core's dist_checkpointing from a checkpoint its own
`dist_checkpointing.save` wrote). A good conversion exits 0; one whose layer-0 q_proj moved by
1e-3 exits 1, in full and with `--layers 1`. Four verify runs, a few seconds each: one
through the CLI with spawned ranks, three through the API with forked ones.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from procs import spawn
from test_verify import perturbed

from reference.cli import main
from reference.converters import convert
from reference.converters.megatron import MegatronLayout
from reference.tiny import save_tiny
from reference.verify.compare import report
from reference.verify.compare import verify as api_verify

pytest.importorskip("megatron.core")
pytestmark = pytest.mark.xdist_group("megatron")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """root/hf and, from it and from a copy with layer 0's q_proj + 1e-3 (root/hf-bad):
    root/torch[-bad] (TP 1 x PP 2) and root/dist[-bad] (TP 2, saved by megatron-core)."""
    import megatron.core.models.gpt  # noqa: F401  (imported once, before the savers fork)
    from mcore_ranks import save_dist_group

    root = tmp_path_factory.mktemp("verify-megatron")
    save_tiny("qwen2", root / "hf")  # qkv bias; 6 heads in 2 groups, head_dim != hidden / heads
    perturbed(root / "hf", root / "hf-bad", "model.layers.0.self_attn.q_proj.weight")
    records = []
    for tag in ("", "-bad"):
        convert(root / f"hf{tag}", root / f"torch{tag}", to="megatron", layout=MegatronLayout(pp=2))
        convert(root / f"hf{tag}", root / f"legacy{tag}", to="megatron", layout=MegatronLayout(tp=2))
        records.append({"dir": str(root / f"legacy{tag}"), "dist": str(root / f"dist{tag}"),
                        "tp": 2, "pp": 1, "vpp": None, "te": False})
    (root / "cases.json").write_text(json.dumps(records))
    spawn(save_dist_group, 2, str(root / "cases.json"), timeout_s=240, method="fork")
    return root


def cli(capsys, *args: object) -> tuple[int, str]:
    """`reference verify ARGS`: its ranks are spawned, as a user's are."""
    capsys.readouterr()
    code = main(["verify", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out + out.err


def verify(capsys, src: Path, dst: Path, **options) -> tuple[int, str]:
    """The same through the API, with forked ranks (megatron-core is imported here already,
    and importing it takes each spawned rank seconds on 2 cores)."""
    v = api_verify(src, dst, start_method="fork", **options)
    return (0 if v.ok else 1), "\n".join(report(v))


def test_hf_and_megatron_torch_pipelined_agree(ckpts, capsys) -> None:
    code, out = cli(capsys, ckpts / "hf", ckpts / "torch")
    assert code == 0, out
    assert "megatron-core GPTModel, torch tp 1 pp 2" in out and "top-1 agreement 32/32" in out


def test_megatron_torch_with_layer_0_moved_fails_at_layers_1(ckpts, capsys) -> None:
    code, out = verify(capsys, ckpts / "torch-bad", ckpts / "hf", layers=1)
    assert code == 1 and "hidden states after layer 1" in out and "DIFFERENT" in out, out


def test_layers_of_every_pipeline_stage_run_as_one_stage(ckpts, capsys) -> None:
    """`--layers 2` of the PP 2 checkpoint: layer 2 lives on stage 1, where the rank file calls
    it layer 0; one process runs both layers, renumbered (reference/verify/first_layers.py)."""
    code, out = verify(capsys, ckpts / "hf", ckpts / "torch", layers=2)
    assert code == 0 and "hidden states after layer 2" in out, out


def test_megatron_torch_dist_and_hf_agree(ckpts, capsys) -> None:
    assert sorted((ckpts / "dist" / "iter_0000001").glob("*.distcp"))  # megatron-core's own files
    code, out = verify(capsys, ckpts / "dist", ckpts / "hf")
    assert code == 0 and "torch_dist tp 2 pp 1" in out, out


def test_megatron_torch_dist_with_a_moved_tensor_fails(ckpts, capsys) -> None:
    code, out = verify(capsys, ckpts / "hf", ckpts / "dist-bad", tokens=16)
    assert code == 1 and "DIFFERENT" in out and "max |src - dst|" in out, out


def test_reading_a_rank_file_keeps_megatron_cores_safe_globals(ckpts) -> None:
    """megatron-core registers Namespace for torch.load at import; our reader's own allowance
    must not take it away (megatron-core's dist_checkpointing.load then failed in this process)."""
    from argparse import Namespace

    import torch

    from reference.converters.megatron.read import load_rank_file

    assert Namespace in torch.serialization.get_safe_globals()  # registered by megatron-core
    load_rank_file(next((ckpts / "torch").rglob("model_optim_rng.pt")))
    assert Namespace in torch.serialization.get_safe_globals()


def test_a_broken_megatron_checkpoint_is_one_line_exit_2(ckpts, capsys, tmp_path) -> None:
    import shutil

    shutil.copytree(ckpts / "torch", tmp_path / "torch")
    next((tmp_path / "torch").rglob("mp_rank_00_001/model_optim_rng.pt")).unlink()
    code, out = cli(capsys, ckpts / "hf", tmp_path / "torch")
    assert code == 2 and len(out.strip().splitlines()) == 1, out
    assert "mp_rank_00_001" in out and "missing" in out, out
