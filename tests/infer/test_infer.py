"""reference infer: row for row what one process's greedy generate() gives, for any number of
workers; every id exactly once through a dead worker and through a killed, rerun job."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_stream_generate import VOCAB, tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from reference.infer import Infer
from reference.tiny import tiny_model

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
NEW = 8
TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")
ROWS = [{"prompt": "the quick brown fox jumps over the lazy dog and then " * 2, "id": "long"},
        {"prompt": "h"},
        {"prompt": "naïve café"},
        {"messages": [{"role": "user", "content": "stop here. then go on"}], "id": 40},
        {"prompt": "héllo wörld, ça va? 日本語のテキスト"},
        {"prompt": "stop"},
        {"prompt": "the quick brown fox " * 30, "id": "too long"},
        {"prompt": "and on, and on."}]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny Llama (64 positions) with a byte-level BPE tokenizer and a chat template."""
    path = tmp_path_factory.mktemp("m") / "llama"
    tiny_model("llama", vocab_size=VOCAB, pad_token_id=0, eos_token_id=1).save_pretrained(path)
    tok = tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def expected(model) -> list[dict]:
    """Each row alone through transformers' greedy generate() in this process."""
    tok = AutoTokenizer.from_pretrained(model)
    original = AutoModelForCausalLM.from_pretrained(model)
    rows = []
    for n, row in enumerate(ROWS, start=1):
        id_ = row.get("id", n)
        if "messages" in row:
            ids = tok(tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)["input_ids"]
        else:
            ids = tok(row["prompt"])["input_ids"]
        if len(ids) + NEW > original.config.max_position_embeddings:
            rows.append({"id": id_, "error": None})
            continue
        new = original.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                eos_token_id=1)[0, len(ids):].tolist()
        new = new[: new.index(1)] if 1 in new else new
        rows.append({"id": id_, "output": tok.decode(new, skip_special_tokens=True)})
    return rows


def data(tmp_path: Path, rows: list[dict] = ROWS) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check(out: Path, expected: list[dict]) -> None:
    """Every id exactly once, in input order, each output that of one-process generate()."""
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in got] == [r["id"] for r in expected]
    for g, e in zip(got, expected, strict=True):
        if e.get("error", "") is None:
            assert "too long" in g["error"] and "output" not in g
        else:
            assert g == e


def reference(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "reference", *args], cwd=ROOT, env=kwargs.pop("env", ENV),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize(("workers", "backend"), [(1, "hf"), (2, "hf"), (3, "hf"), (2, "unified")])
def test_outputs_equal_one_process_greedy_generate(model, expected, tmp_path, workers, backend) -> None:
    out = tmp_path / "out.jsonl"
    n = Infer(model, data(tmp_path), out, workers, batch_size=2, max_new_tokens=NEW, backend=backend).run()
    assert n == len(ROWS)
    check(out, expected)
    assert not (tmp_path / "out.jsonl.parts").exists()


def test_a_dead_worker_is_reported_and_its_rows_rerun_by_the_others(model, expected, tmp_path, capfd,
                                                                    monkeypatch) -> None:
    monkeypatch.setenv("REFERENCE_INFER_TEST_EXIT", "1")  # the first worker to generate dies uncommitted
    out = tmp_path / "out.jsonl"
    Infer(model, data(tmp_path), out, 2, batch_size=2, max_new_tokens=NEW).run()
    check(out, expected)
    assert "died (exit code 3) with 2 rows unfinished; the other workers take them" in capfd.readouterr().err


def test_a_killed_run_resumes_without_generating_a_row_twice(model, expected, tmp_path) -> None:
    out, count = tmp_path / "out.jsonl", tmp_path / "count"
    args = ["infer", str(model), str(data(tmp_path)), str(out), "--workers", "2", "--batch-size", "2",
            "--max-new-tokens", str(NEW)]
    # both workers commit one batch each, then hang: the job is killed mid-run, deterministically
    hang = {**ENV, "REFERENCE_INFER_TEST_HANG": "1", "REFERENCE_INFER_TEST_COUNT": str(count)}
    proc = reference(*args, env=hang, start_new_session=True)
    parts = tmp_path / "out.jsonl.parts"
    deadline = time.monotonic() + 120
    while len(list(parts.glob("*.jsonl"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = [json.loads(line)["id"] for f in parts.glob("*.jsonl") for line in f.read_text().splitlines()]
    assert len(committed) == 4 and not out.exists()

    rerun = reference(*args, env={**ENV, "REFERENCE_INFER_TEST_COUNT": str(count)})
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    check(out, expected)
    generated = collections.Counter(json.loads(line) for line in count.read_text().splitlines())
    valid = [e["id"] for e in expected if e.get("error", "") is not None]
    assert sorted(generated, key=str) == sorted(valid, key=str)
    assert set(generated.values()) == {1}  # no row generated twice, committed ones not again


def test_a_malformed_line_is_refused_by_number_before_any_work(model, tmp_path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n{"prompt": "d"}\n')
    run = reference("infer", str(model), str(path), str(tmp_path / "out.jsonl"), "--workers", "1")
    _, err = run.communicate(timeout=60)
    assert run.returncode == 2
    assert len(err.splitlines()) == 1 and "line 3: not valid JSON" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_workers_that_do_not_divide_the_devices_are_refused(model, tmp_path) -> None:
    run = reference("infer", str(model), str(data(tmp_path)), str(tmp_path / "o"), "--workers", "3",
                    "--devices", "cpu,cpu")
    _, err = run.communicate(timeout=60)
    assert run.returncode == 2 and "--workers 3 does not divide the 2 devices" in err


def test_an_output_from_another_input_or_model_is_refused(model, tmp_path) -> None:
    out = tmp_path / "out.jsonl"
    Infer(model, data(tmp_path, ROWS[:2]), out, 1, max_new_tokens=NEW).run()
    before = out.read_text()
    for path, rows in ((model, ROWS[:3]), (tmp_path / "elsewhere", ROWS[:2])):
        if path != model:
            shutil.copytree(model, path)
        run = reference("infer", str(path), str(data(tmp_path, rows)), str(out), "--workers", "1",
                        "--max-new-tokens", str(NEW))
        _, err = run.communicate(timeout=60)
        assert run.returncode == 2 and "made from a different job" in err, err
    assert out.read_text() == before
