"""Regenerate goldens/ (run by `nox -s goldens`, the only way they change): for each family
and tying, the original model's fp32 logits on the fixed golden input, and the tolerance
within which another machine may reproduce them. Also reference/families/class_defaults.json:
what each config class fills in, which `reference families` reads instead of importing
transformers.

The tolerance is measured, not chosen: the same logits recomputed with other thread counts,
with sdpa instead of eager attention, and with every weight moved one float step (what another
CPU's kernels do to the last bits), times a margin. A golden then fails only when the
computation changes, never because a runner has AVX-512 and this machine does not.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script by nox

import layouts  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from harness import GOLDENS, TIES, golden_path, load_golden, ulp_noise, versions  # noqa: E402
from layouts import CONFIGS as LAYOUTS  # noqa: E402

from reference.families.registry import FAMILIES  # noqa: E402
from reference.families.verdict import CLASS_DEFAULTS, typical_config  # noqa: E402
from reference.tiny import TINY, golden_input, logits, tiny_model  # noqa: E402

MARGIN = 8.0  # over the largest last-bit spread measured here
FLOOR = 1e-5  # assert_close's fp32 atol: never tighter than the equivalence tests
NOISE_SEEDS = (1, 2)  # tests use other seeds, so they do not replay what set the tolerance


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_variants(model_type: str, tie: bool) -> Iterator[torch.Tensor]:
    """The tiny model's logits as other machines may compute them."""
    model = tiny_model(model_type, tie=tie)
    for n in (2, 4):
        with threads(n):
            yield logits(model)
    with contextlib.suppress(ValueError):  # some families serve eager attention only
        model.set_attn_implementation("sdpa")
        yield logits(model)
    for seed in NOISE_SEEDS:
        noisy = tiny_model(model_type, tie=tie)
        ulp_noise(noisy.parameters(), seed)
        yield logits(noisy)


def layout_variants(model_type: str, path: Path) -> Iterator[torch.Tensor]:
    """The same for a remote-code layout, through its reference forward."""
    for n in (2, 4):
        with threads(n):
            yield layouts.forward(model_type, path, golden_input())
    for seed in NOISE_SEEDS:
        tensors = safetensors.torch.load_file(path / "model.safetensors")
        ulp_noise(tensors.values(), seed)
        noisy = path.parent / f"{path.name}-noise{seed}"
        noisy.mkdir()
        safetensors.torch.save_file(tensors, noisy / "model.safetensors")
        for side in path.iterdir():  # config.json and any remote code beside it
            if side.suffix != ".safetensors":
                (noisy / side.name).write_text(side.read_text())
        yield layouts.forward(model_type, noisy, golden_input())


def write(golden: torch.Tensor, variants: Callable[[], Iterator[torch.Tensor]], model_type: str,
          tie: bool) -> None:
    """Save a golden and its tolerance unless an equal one is there (the header's key order is
    not stable, so an unchanged golden is left alone)."""
    spread = max((v - golden).abs().max().item() for v in variants())
    meta = {**versions(), "atol": f"{max(FLOOR, MARGIN * spread):.3g}", "spread": f"{spread:.3g}"}
    path = golden_path(model_type, tie)
    if path.exists():
        old = load_golden(model_type, tie)
        if ({**old.made_with, "atol": f"{old.atol:.3g}"} == {k: meta[k] for k in (*old.made_with, "atol")}
                and torch.equal(old.logits, golden)):
            print(f"kept  {path.name}")
            return
    safetensors.torch.save_file({"logits": golden.contiguous()}, path, meta)
    print(f"wrote {path.name} {tuple(golden.shape)} spread {meta['spread']} atol {meta['atol']}")


def write_class_defaults() -> None:
    """Every family's typical config as the installed transformers fills it in."""
    configs = {f: {k: v for k, v in typical_config(f).items() if k != "transformers_version"}
               for f in FAMILIES}
    data = {"transformers": versions()["transformers"], "configs": configs}
    CLASS_DEFAULTS.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(f"wrote {CLASS_DEFAULTS.name}")


def main() -> None:
    torch.set_num_threads(1)  # the tests' setting (tests/conftest.py)
    GOLDENS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in LAYOUTS:  # no transformers class: the published layout's forward
            path = layouts.tiny_layout(model_type, Path(tmp) / model_type)
            write(layouts.forward(model_type, path, golden_input()),
                  lambda m=model_type, p=path: layout_variants(m, p), model_type, False)
    for model_type in TINY:
        for tie in TIES:
            write(logits(tiny_model(model_type, tie=tie)),
                  lambda m=model_type, t=tie: model_variants(m, t), model_type, tie)
    write_class_defaults()


if __name__ == "__main__":
    main()
