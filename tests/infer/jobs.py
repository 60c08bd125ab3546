"""What the infer tests share: the rows (every hard case once), the tiny model, and how to
run the CLI and check an output against one-process generate()."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

from test_stream_generate import VOCAB, tokenizer

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


def make_model(path: Path) -> Path:
    """A tiny Llama (64 positions) with a byte-level BPE tokenizer and a chat template."""
    tiny_model("llama", vocab_size=VOCAB, pad_token_id=0, eos_token_id=1).save_pretrained(path)
    tok = tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(path)
    return path


def precommit(out: Path, results: list[dict]) -> set[str]:
    """Make `out` a job that an earlier run stopped after committing `results` (rows of one-process
    generate()); returns their ids as keys."""
    parts = out.with_name(out.name + ".parts")
    parts.mkdir()
    (parts / "earlier-000000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    return {json.dumps(r["id"]) for r in results}


def generated(count: Path) -> collections.Counter:
    """How many times each row (its id as a key) was generated, from REFERENCE_INFER_TEST_COUNT."""
    return collections.Counter(count.read_text().splitlines()) if count.exists() else collections.Counter()


def valid_keys(expected: list[dict]) -> set[str]:
    """The ids (as keys) of the rows that reach the model: not those refused as too long."""
    return {json.dumps(e["id"]) for e in expected if e.get("error", "") is not None}


def encode(tok, row: dict) -> list[int]:
    """A row's prompt ids, as a replica encodes them (a chat through the template)."""
    if "messages" in row:
        text = tok.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]
    return tok(row["prompt"])["input_ids"]
