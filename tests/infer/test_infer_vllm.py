"""reference infer --backend vllm, at its boundary only: vLLM cannot be installed beside the CPU
torch build, so `vllm` is a recording fake with LLM / SamplingParams. What is proven: the LLM is
built on the worker's devices with tensor parallelism over them, the prompts go in as the
replica's own token ids, greedy is temperature 0, sampling seeds each row (seed + id), and the
returned ids are cut at eos and decoded row for row. Without vllm: one line, exit 2."""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types
from types import SimpleNamespace

import pytest
from jobs import NEW, ROWS, data, encode
from transformers import AutoTokenizer

from reference.errors import InputError
from reference.infer import Infer
from reference.infer.rows import read_rows, row_seed
from reference.infer.worker import Job, Replica

EOS = 1


def canned(ids: list[int]) -> list[int]:
    """The fake's "generation": the prompt's last four ids reversed, eos, then ids past eos."""
    return ids[::-1][:4] + [EOS, 7, 8]


def fake_vllm(calls: list) -> types.ModuleType:
    """A `vllm` module whose LLM records how it is built and called, answering RequestOutput-shaped
    objects (`.outputs[0].token_ids`, `.outputs[0].text`)."""
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)

    class SamplingParams:
        def __init__(self, **kwargs) -> None:
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs) -> None:
            calls.append(("LLM", kwargs, os.environ.get("CUDA_VISIBLE_DEVICES")))

        def generate(self, prompts: list[dict], params: list[SamplingParams], use_tqdm: bool = True) -> list:
            calls.append(("generate", [p["prompt_token_ids"] for p in prompts], [p.kwargs for p in params]))
            return [SimpleNamespace(prompt_token_ids=p["prompt_token_ids"],
                                    outputs=[SimpleNamespace(token_ids=canned(p["prompt_token_ids"]),
                                                             text="not read")])
                    for p in prompts]

    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module


@pytest.mark.parametrize("do_sample", [False, True])
def test_the_vllm_glue_builds_prompts_and_params_and_decodes_row_for_row(model, expected, tmp_path,
                                                                         monkeypatch, do_sample) -> None:
    calls: list = []
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm(calls))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    job = Job(str(model), "vllm", NEW, do_sample, 0.7, 0.9, 5, str(tmp_path), "test")
    replica = Replica(job, ["cuda:2", "cuda:3"])
    results = replica.run(read_rows(data(tmp_path)))

    built = {"model": str(model), "tokenizer": str(model), "tensor_parallel_size": 2}
    assert calls[0] == ("LLM", built, "2,3")  # only the worker's devices visible, tensor parallel over them
    assert [c[0] for c in calls] == ["LLM", "generate"]  # the whole batch in one call, sampled or not
    tok = AutoTokenizer.from_pretrained(model)
    valid = [(row, e) for row, e in zip(ROWS, expected, strict=True) if "output" in e]
    _, prompts, params = calls[1]
    assert prompts == [encode(tok, row) for row, _ in valid]
    if do_sample:
        assert params == [{"max_tokens": NEW, "temperature": 0.7, "top_p": 0.9, "seed": row_seed(5, e["id"])}
                          for _, e in valid]
    else:
        assert params == [{"max_tokens": NEW, "temperature": 0.0}] * len(valid)
    want = {json.dumps(e["id"]): tok.decode(ids[::-1][:4], skip_special_tokens=True)
            for (_, e), ids in zip(valid, prompts, strict=True)}
    assert [r["id"] for r in results] == [e["id"] for e in expected]
    for r in results:
        if json.dumps(r["id"]) in want:
            assert r == {"id": r["id"], "output": want[json.dumps(r["id"])]}
        else:
            assert "too long" in r["error"]


def test_without_vllm_the_error_is_one_line_naming_it(model, tmp_path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # what find_spec sees for a package not installed
    with pytest.raises(InputError) as e:
        Infer(model, data(tmp_path), tmp_path / "out.jsonl", 1, backend="vllm").run()
    assert str(e.value) == "backend vllm needs vllm, which is not installed: pip install vllm " \
                           "(it brings its own torch build)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
