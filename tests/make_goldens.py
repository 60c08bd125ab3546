"""Regenerate goldens/ (run by `nox -s goldens`, the only way they change): for each family
and tying, the original transformers model's fp32 logits on the fixed golden input. Also
reference/families/class_defaults.json: what each config class fills in, which
`reference families` reads instead of importing transformers."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script by nox

import layouts  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from harness import GOLDENS, TIES, golden_path, load_golden  # noqa: E402
from layouts import CONFIGS as LAYOUTS  # noqa: E402

from reference.families.registry import FAMILIES  # noqa: E402
from reference.families.verdict import CLASS_DEFAULTS, typical_config  # noqa: E402
from reference.tiny import TINY, golden_input, logits, tiny_model  # noqa: E402


def write(logits: torch.Tensor, model_type: str, tie: bool, meta: dict[str, str]) -> None:
    """Save a golden unless an equal one is there (the header's key order is not stable)."""
    path = golden_path(model_type, tie)
    if path.exists():
        old, old_meta = load_golden(model_type, tie)
        if old_meta == meta and torch.equal(old, logits):
            print(f"kept  {path.name}")
            return
    safetensors.torch.save_file({"logits": logits.contiguous()}, path, meta)
    print(f"wrote {path.name} {tuple(logits.shape)}")


def write_class_defaults() -> None:
    """Every family's typical config as the installed transformers fills it in."""
    configs = {f: {k: v for k, v in typical_config(f).items() if k != "transformers_version"}
               for f in FAMILIES}
    data = {"transformers": transformers.__version__, "configs": configs}
    CLASS_DEFAULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"wrote {CLASS_DEFAULTS.name}")


def main() -> None:
    torch.set_num_threads(1)  # the same reduction order as the tests, so goldens are stable
    GOLDENS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in LAYOUTS:  # no transformers class: the published layout's forward
            path = layouts.tiny_layout(model_type, Path(tmp) / model_type)
            write(layouts.forward(model_type, path, golden_input()), model_type, False, meta)
    for model_type in TINY:
        for tie in TIES:
            write(logits(tiny_model(model_type, tie=tie)), model_type, tie, meta)
    write_class_defaults()


if __name__ == "__main__":
    main()
