"""multi_infer on one GPU (skipped without CUDA; run with tests/test_gpu.py, docs/gpu.md): one
replica and two sharing the GPU give every row once, in input order, with one process's
greedy generate() texts."""

from __future__ import annotations

import pytest
import torch
from jobs import NEW, ROWS, check, data

from reference.infer import Infer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("workers", [1, 2])
def test_replicas_on_one_gpu_equal_one_process_greedy_generate(model, expected, tmp_path, workers) -> None:
    out = tmp_path / "out.jsonl"
    n = Infer(model, data(tmp_path), out, workers, devices=["cuda:0"], batch_size=2, max_new_tokens=NEW).run()
    assert n == len(ROWS)
    check(out, expected)
