"""`backend="vllm"`: a replica is vLLM's `LLM`, tensor parallel over the worker's devices.

The prompts go in as token ids encoded by the Replica (the same chat template and special
tokens as the other backends) and the new token ids come back to be cut at eos and decoded
by it, so only generation itself is vLLM's. Greedy is temperature 0; sampling gives each
request its own seed (the row's), so a row's text does not depend on its batch. Tested at this
boundary only: the tests replace the `vllm` module with a recording fake (vLLM cannot be
installed beside the CPU torch build the suite runs on).
"""

from __future__ import annotations

import os
from typing import Any


def load(model_path: str, devices: list[str]) -> Any:
    """An `LLM` over `devices` (all CUDA: it sees only them, as 0..k-1; or one CPU)."""
    from vllm import LLM

    if all(d.startswith("cuda:") for d in devices):
        # before vLLM initialises CUDA in this process: its tensor parallel ranks take the
        # visible devices in order, so the worker's own devices must be the only visible ones
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(d.split(":", 1)[1] for d in devices)
    return LLM(model=model_path, tokenizer=model_path, tensor_parallel_size=len(devices))


def generate(llm: Any, encoded: list[list[int]], seeds: list[int] | None, max_new_tokens: int,
             do_sample: bool, temperature: float, top_p: float) -> list[list[int]]:
    """The new token ids of each prompt, in the prompts' order (as `LLM.generate` returns them)."""
    from vllm import SamplingParams

    if do_sample:
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=s)
                  for s in seeds or []]
    else:
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=0.0)] * len(encoded)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False)
    return [list(out.outputs[0].token_ids) for out in outputs]
