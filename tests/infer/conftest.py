"""The infer tests' model and the outputs one process's generate() gives for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from jobs import NEW, ROWS, encode, make_model
from transformers import AutoModelForCausalLM, AutoTokenizer


@pytest.fixture(scope="session")
def model(tmp_path_factory) -> Path:
    """A tiny Llama (64 positions) with a byte-level BPE tokenizer and a chat template."""
    return make_model(tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture(scope="session")
def expected(model) -> list[dict]:
    """Each row alone through transformers' greedy generate() in this process."""
    tok = AutoTokenizer.from_pretrained(model)
    original = AutoModelForCausalLM.from_pretrained(model)
    rows = []
    for n, row in enumerate(ROWS, start=1):
        id_ = row.get("id", n)
        ids = encode(tok, row)
        if len(ids) + NEW > original.config.max_position_embeddings:
            rows.append({"id": id_, "error": None})
            continue
        new = original.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                eos_token_id=1)[0, len(ids):].tolist()
        new = new[: new.index(1)] if 1 in new else new
        rows.append({"id": id_, "output": tok.decode(new, skip_special_tokens=True)})
    return rows
