"""Bad input: one line on stderr naming the file or field, exit code 2, DST untouched."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from harness import fails

from reference.cli import main
from reference.tiny import save_tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return save_tiny("qwen2", tmp_path_factory.mktemp("m") / "qwen2")


def copy(model: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model, tmp_path / "src"))


def test_missing_source(tmp_path, capsys) -> None:
    fails(capsys, ["convert", str(tmp_path / "nope"), str(tmp_path / "dst"), "--to", "llama"], "nope")
    assert not (tmp_path / "dst").exists()


def test_not_a_model(tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    fails(capsys, ["convert", str(tmp_path / "empty"), str(tmp_path / "dst"), "--to", "llama"],
          "config.json", "missing")
    assert not (tmp_path / "dst").exists()


def test_unknown_model_type(model, tmp_path, capsys) -> None:
    src = copy(model, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "nosuchfamily"}))
    args = ["convert", str(src), str(tmp_path / "dst"), "--to", "llama"]
    fails(capsys, args, "nosuchfamily", "config.json")
    assert not (tmp_path / "dst").exists()


def test_unknown_target(model, tmp_path, capsys) -> None:
    fails(capsys, ["convert", str(model), str(tmp_path / "dst"), "--to", "gpt9"], "gpt9")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_safetensors(model, tmp_path, capsys, damage) -> None:
    src = copy(model, tmp_path)
    shard = src / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes({"garbage": b"\x00" * 8 + b"x" * 100, "truncated": data[: len(data) // 2],
                       "empty": b""}[damage])
    fails(capsys, ["convert", str(src), str(tmp_path / "dst"), "--to", "llama"], str(shard))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_shard_named_in_index_but_absent(model, tmp_path, capsys) -> None:
    sharded = tmp_path / "sharded"
    assert main(["convert", str(model), str(sharded), "--to", "qwen2", "--max-shard-size", "100000"]) == 0
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    fails(capsys, ["convert", str(sharded), str(tmp_path / "dst"), "--to", "llama"],
          "model.safetensors.index.json", shards[1].name)
    assert not (tmp_path / "dst").exists()


def test_existing_destination_needs_force(model, tmp_path, capsys) -> None:
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    fails(capsys, ["convert", str(model), str(dst), "--to", "llama"], str(dst), "--force")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert main(["convert", str(model), str(dst), "--to", "llama", "--force"]) == 0
    assert (dst / "config.json").is_file() and not (dst / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


def test_bad_dtype(model, tmp_path, capsys) -> None:
    fails(capsys, ["convert", str(model), str(tmp_path / "dst"), "--to", "llama", "--dtype", "int8"], "int8")


def test_console_script_exit_code(tmp_path) -> None:
    run = subprocess.run([sys.executable, "-m", "reference", "convert", str(tmp_path / "x"),
                          str(tmp_path / "y"), "--to", "llama"], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().startswith("reference convert: error:") and "x" in run.stderr
