"""The console script as a newcomer meets it: fast help, quiet output, one-line errors.

The tests run the script in a fresh interpreter, with this checkout first on PYTHONPATH (so
that it is the one tested wherever the package is installed from); the fsync test runs main()
in this process, to watch its system calls.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from reference.cli import COMMANDS, main
from reference.tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
HEAVY = ("torch", "transformers")


def python(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`python ARGS` in this checkout, output captured as text."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          **kwargs)


def reference(*args: str, **kwargs) -> subprocess.CompletedProcess:
    """`reference ARGS` as `python -m reference`."""
    return python("-m", "reference", *args, **kwargs)


def imported_by(*args: str) -> set[str]:
    """The modules loaded once the console script's main(ARGS) is done."""
    code = ("import json, sys\nfrom reference.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "except SystemExit:\n    pass\nprint(json.dumps(sorted(sys.modules)), file=sys.stderr)")
    return set(json.loads(python("-c", code, *args, check=True).stderr.splitlines()[-1]))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A tiny Llama saved as one model.safetensors, no index."""
    return save_tiny("llama", tmp_path_factory.mktemp("m") / "llama")


def test_help_lists_every_command() -> None:
    run = reference("--help")
    assert run.returncode == 0 and run.stderr == ""
    assert all(name in run.stdout for name in COMMANDS)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_imports_neither_torch_nor_other_commands(command: str | None) -> None:
    """Speed without timing: help needs no torch or transformers (seconds to import), and no
    subcommand module but the chosen one. `benchmarks/bench_cli.py` has the times."""
    args = [command, "--help"] if command else ["--help"]
    assert reference(*args).returncode == 0
    loaded = imported_by(*args)
    assert not {m for m in loaded if m.split(".")[0] in HEAVY}
    assert {module for name, (module, _) in COMMANDS.items() if name != command}.isdisjoint(loaded)


def test_families_imports_neither_torch_nor_transformers() -> None:
    """The table comes from the family rows and the stored config-class defaults."""
    assert not {m for m in imported_by("families") if m.split(".")[0] in HEAVY}


def test_a_missing_extra_is_one_line_naming_it_before_any_work(tmp_path) -> None:
    """`reference train` without tensorboard (as without `reference[train]`): nothing created."""
    code = ("import sys\nsys.modules['tensorboard'] = None  # unimportable, and find_spec says absent\n"
            "from reference.cli import main\nsys.exit(main(sys.argv[1:]))")
    out = tmp_path / "out"
    args = ["train", str(tmp_path / "model"), str(tmp_path / "data.jsonl"), str(out)]
    run = python("-c", code, *args)
    assert run.returncode == 2
    assert run.stderr.splitlines() == ["reference train: error: needs tensorboard: "
                                       "pip install 'reference[train]'"]
    assert not out.exists()


def test_a_single_file_source_gives_a_single_file(llama, tmp_path) -> None:
    """Even when the output outgrows the source (qwen2 adds zero q, k, v biases); sharded
    sources keep their shards (tests/test_qwen2_llama.py)."""
    for src, dst, to in ((llama, tmp_path / "q", "qwen2"), (tmp_path / "q", tmp_path / "l", "llama")):
        assert reference("convert", str(src), str(dst), "--to", to).returncode == 0
        assert sorted(p.name for p in dst.glob("model*")) == ["model.safetensors"]
    grown, source = (d / "model.safetensors" for d in (tmp_path / "q", llama))
    assert grown.stat().st_size > source.stat().st_size


@pytest.mark.parametrize(("flags", "message"), [
    (["--tp", "2", "--to", "llama"], "--tp applies only to --to megatron"),
    (["--to", "hf", "--make-vocab-size-divisible-by", "64"],
     "--make-vocab-size-divisible-by applies only to --to megatron"),
    (["--to", "megatron", "--max-shard-size", "1000"],
     "--max-shard-size applies only to HF targets, not --to megatron"),
])
def test_an_option_for_another_target_is_refused_by_name(llama, tmp_path, flags, message) -> None:
    run = reference("convert", str(llama), str(tmp_path / "dst"), *flags)
    assert run.returncode == 2
    assert run.stderr.splitlines() == [f"reference convert: error: {message}"]
    assert list(tmp_path.iterdir()) == []


def on_a_terminal(*args: str) -> str:
    """What `reference ARGS` shows on stderr when stderr is a 100-column terminal."""
    master, slave = pty.openpty()
    # 24 x 100: a new pty has 0 columns, in which tqdm draws an empty bar
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "reference", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    shown = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the child has closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(master)
    assert proc.wait() == 0
    return shown.decode()


@pytest.mark.parametrize("to", ["qwen2", "megatron"])
def test_a_terminal_gets_one_progress_bar_and_a_pipe_nothing(llama, tmp_path, to) -> None:
    redraws = [line for line in on_a_terminal("convert", str(llama), str(tmp_path / "a"), "--to", to)
               .replace("\r", "\n").split("\n") if line.strip()]
    assert redraws and all(line.startswith("writing:") for line in redraws), redraws
    assert "100%" in redraws[-1] and "B/s" in redraws[-1]
    piped = reference("convert", str(llama), str(tmp_path / "b"), "--to", to)
    assert piped.returncode == 0 and piped.stderr == ""


def cells(shown: str) -> list[list[str]]:
    """The rows of a printed table, continuation rows (first cell empty) joined back on."""
    out: list[list[str]] = []
    for line in shown.splitlines():
        if not line.startswith("|") or line.startswith("|-"):
            continue
        row = [c.strip() for c in line.split("|")[1:-1]]
        if row[0]:
            out.append(row)
        else:
            # a line broken after an underscore (sliding_ / window) joins back without a space
            joined = zip(out[-1], row, strict=True)
            out[-1] = [(a + b if a.endswith("_") else f"{a} {b}").strip() for a, b in joined]
    return out


def test_demo_prints_its_table_and_no_progress_bars() -> None:
    """One pair of the demo (all of it takes minutes): transformers' save and load bars stay off."""
    code = ("import sys\nfrom reference import demo\nfrom reference.cli import main\n"
            "demo.demo = lambda workdir: [demo._pair('qwen2', 'llama', False, workdir)]\n"
            "sys.exit(main(['demo']))")
    run = python("-c", code)
    assert run.returncode == 0 and run.stderr == "", run.stderr
    (source, target, tied, _, roundtrip, verdict), = cells(run.stdout)[1:]
    assert (source, target, tied, roundtrip, verdict) == ("qwen2", "llama", "False", "bitwise", "exact")


def test_families_fits_100_columns_and_keeps_every_cell() -> None:
    from reference.families.cli import rows

    shown = reference("families").stdout
    assert max(map(len, shown.splitlines())) <= 100
    assert cells(shown) == rows()


def test_a_reader_that_has_gone_is_no_traceback() -> None:
    """`reference families | head -1`, made certain: the pipe is closed before anything is written."""
    proc = subprocess.Popen([sys.executable, "-m", "reference", "families"], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait() == 141 and err == b""


@pytest.mark.parametrize("to", [["qwen2"], ["megatron", "--tp", "2"]])
def test_output_reaches_the_disk_before_and_after_its_rename(llama, tmp_path, monkeypatch, to) -> None:
    """Every file and directory of DST (Megatron's has subdirectories) is fsynced under its
    temporary name before the rename, and the parent after it: DST survives a power cut whole."""
    events: list[tuple[str, ...]] = []
    fsync, rename = os.fsync, os.rename

    def recorded_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recorded_rename(a, b) -> None:
        events.append(("rename", str(a), str(b)))
        rename(a, b)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "rename", recorded_rename)
    dst = tmp_path / "dst"
    assert main(["convert", str(llama), str(dst), "--to", *to]) == 0
    (r, (_, tmp, _)), = [(i, e) for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(dst)]
    before = {e[1] for e in events[:r] if e[0] == "fsync"}
    written = [dst, *dst.rglob("*")]
    assert len(written) >= 5 and before == {tmp + str(p)[len(str(dst)):] for p in written}
    assert ("fsync", str(tmp_path)) in events[r + 1:]
