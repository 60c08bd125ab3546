"""reference infer under torchrun: two nodes (processes) on this machine write the output one
process writes, byte for byte, each generating only the rows nobody committed; a node left
waiting for another says so and stops at --node-timeout instead of waiting forever."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

from jobs import ENV, NEW, ROOT, data, generated, precommit, reference, valid_keys
from procs import free_port

from reference.infer import Infer
from reference.infer.nodes import Node, share
from reference.infer.rows import read_rows

ARGS = ["--workers", "1", "--batch-size", "2", "--max-new-tokens", str(NEW)]


def test_two_nodes_write_the_one_process_output_byte_for_byte_and_resume(model, expected, tmp_path) -> None:
    rows = data(tmp_path)
    single = tmp_path / "single.jsonl"
    Infer(model, rows, single, 1, batch_size=2, max_new_tokens=NEW).run()
    out, count = tmp_path / "out.jsonl", tmp_path / "count"
    earlier = precommit(out, [e for e in expected if "output" in e][:3])  # from an earlier run
    torchrun = [shutil.which("torchrun") or "torchrun", "--standalone", "--nproc-per-node", "2"]
    run = subprocess.run([*torchrun, "-m", "reference", "infer", str(model), str(rows), str(out), *ARGS],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**ENV, "REFERENCE_INFER_TEST_COUNT": str(count)})
    assert run.returncode == 0, run.stderr
    assert out.read_bytes() == single.read_bytes()
    assert not (tmp_path / "out.jsonl.parts").exists()
    made = generated(count)
    assert set(made) == valid_keys(expected) - earlier and set(made.values()) == {1}


def test_a_node_left_waiting_stops_at_the_timeout_naming_it(model, tmp_path) -> None:
    rows, out = data(tmp_path), tmp_path / "out.jsonl"
    # node 0's share is committed already, so it goes straight to waiting for node 1, whose
    # worker commits one batch and then hangs: node 1 never reports
    parts = tmp_path / "out.jsonl.parts"
    parts.mkdir()
    mine = share(read_rows(rows), Node(0, 2))
    (parts / "earlier-000000.jsonl").write_text("".join(json.dumps({"id": r.id, "output": ""}) + "\n"
                                                        for r in mine))
    env = {**ENV, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    args = ["infer", str(model), str(rows), str(out), *ARGS, "--node-timeout", "10"]
    stuck = reference(*args, env={**env, "RANK": "1", "LOCAL_RANK": "1", "REFERENCE_INFER_TEST_HANG": "1"},
                      start_new_session=True)
    try:
        node0 = reference(*args, env={**env, "RANK": "0", "LOCAL_RANK": "0"})
        _, err = node0.communicate(timeout=180)
        assert node0.returncode == 1, err
        assert err.startswith("reference infer: error: node 0 of 2: no answer from the other nodes "
                              "at the end of their shares within --node-timeout 10 s"), err
        assert "rerun to resume" in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    finally:
        os.killpg(stuck.pid, signal.SIGKILL)
        stuck.wait()
