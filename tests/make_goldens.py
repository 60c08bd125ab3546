"""Regenerate goldens/ (run by `nox -s goldens`, the only way they change): for each family
and tying, the original transformers model's fp32 logits on the fixed golden input."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script by nox

import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from harness import GOLDENS, TIES, golden_path  # noqa: E402

from reference.families.registry import FAMILIES  # noqa: E402
from reference.tiny import logits, tiny_model  # noqa: E402


def main() -> None:
    GOLDENS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__}
    for model_type in FAMILIES:
        for tie in TIES:
            out = logits(tiny_model(model_type, tie=tie))
            safetensors.torch.save_file({"logits": out.contiguous()}, golden_path(model_type, tie), meta)
            print(f"wrote {golden_path(model_type, tie).name} {tuple(out.shape)}")


if __name__ == "__main__":
    main()
