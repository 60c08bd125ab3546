"""reference infer --sample: each row's text is what one process's seeded generate() gives for
that row alone (seed + id), so a rerun and any worker count or batch size give the same rows."""

from __future__ import annotations

import pytest
import torch
from jobs import NEW, ROWS, check, data, encode
from transformers import AutoModelForCausalLM, AutoTokenizer

from reference.infer import Infer
from reference.infer.rows import row_seed

TEMPERATURE, TOP_P, SEED = 0.8, 0.9, 3


@pytest.fixture(scope="module")
def sampled(model, expected) -> list[dict]:
    """Each row alone through transformers' generate(), sampling after manual_seed(seed + id)."""
    tok = AutoTokenizer.from_pretrained(model)
    original = AutoModelForCausalLM.from_pretrained(model)
    rows = []
    for row, greedy in zip(ROWS, expected, strict=True):
        if "output" not in greedy:  # refused before generation, as in the greedy run
            rows.append(greedy)
            continue
        ids = encode(tok, row)
        torch.manual_seed(row_seed(SEED, greedy["id"]))
        new = original.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=True,
                                temperature=TEMPERATURE, top_p=TOP_P, pad_token_id=0,
                                eos_token_id=1)[0, len(ids):].tolist()
        new = new[: new.index(1)] if 1 in new else new
        rows.append({"id": greedy["id"], "output": tok.decode(new, skip_special_tokens=True)})
    return rows


def test_sampled_rows_are_the_same_for_a_rerun_and_any_worker_count(model, expected, sampled,
                                                                     tmp_path) -> None:
    assert sampled != expected  # sampling really changed some text, or this test would prove nothing
    for workers, batch_size in ((1, 3), (2, 2)):
        out = tmp_path / f"out-{workers}.jsonl"
        Infer(model, data(tmp_path), out, workers, batch_size=batch_size, max_new_tokens=NEW, do_sample=True,
              temperature=TEMPERATURE, top_p=TOP_P, seed=SEED).run()
        check(out, sampled)
