"""reference infer: row for row what one process's greedy generate() gives, for any number of
workers; every id exactly once through a dead worker and through a killed, rerun job."""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import time

import pytest
from jobs import ENV, NEW, ROWS, check, data, reference

from reference.infer import Infer
from reference.infer.rows import committed_parts
from reference.infer.runner import plan_devices


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
    while len(committed_parts(parts)) < 2:  # renamed parts, not a temporary being written
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = [json.loads(line)["id"] for f in committed_parts(parts)
                 for line in f.read_text().splitlines()]
    assert len(committed) == 4 and not out.exists()
    # what a worker killed while writing its part leaves: a half-written temporary file
    (parts / ".tmp-1-x-000009.jsonl").write_text('{"id": "long", "output": "trunc')

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
    assert len(err.splitlines()) == 1 and f"{path}:3: not valid JSON" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_workers_that_neither_divide_the_devices_nor_are_a_multiple_are_refused(model, tmp_path) -> None:
    run = reference("infer", str(model), str(data(tmp_path)), str(tmp_path / "o"), "--workers", "3",
                    "--devices", "cpu,cpu")
    _, err = run.communicate(timeout=60)
    assert run.returncode == 2 and "--workers 3 does not divide the 2 devices" in err


def test_more_workers_than_devices_share_them(model, expected, tmp_path) -> None:
    assert plan_devices(["cuda:0", "cuda:1"], 4) == [["cuda:0"], ["cuda:1"], ["cuda:0"], ["cuda:1"]]
    out = tmp_path / "out.jsonl"
    n = Infer(model, data(tmp_path), out, 2, devices=["cpu"], batch_size=2, max_new_tokens=NEW).run()
    assert n == len(ROWS)
    check(out, expected)


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
