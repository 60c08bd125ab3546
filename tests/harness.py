"""The shared harness: the equivalence matrix read off the registry, goldens, and helpers.

Adding a family to reference.families.registry adds its rows here; nothing is listed twice.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from reference.converters.unified_dir import held
from reference.families.registry import FAMILIES
from reference.families.spec import ModelSpec
from reference.families.verdict import blocking
from reference.tiny import TINY, tiny_config

GOLDENS = Path(__file__).resolve().parents[1] / "goldens"
TIES = (False, True)


def golden_path(model_type: str, tie: bool) -> Path:
    return GOLDENS / f"{model_type}-tie{int(tie)}.safetensors"


@dataclass(frozen=True)
class Golden:
    """Logits of a family's tiny model, the versions that made them, and the largest difference
    a machine's last bits may make to them (measured when the golden was made)."""

    logits: torch.Tensor
    made_with: dict[str, str]
    atol: float


def load_golden(model_type: str, tie: bool) -> Golden:
    path = golden_path(model_type, tie)
    with safetensors.safe_open(path, "pt") as f:
        meta = f.metadata()
        logits = f.get_tensor("logits")
    made_with = {k: meta[k] for k in VERSIONED}
    return Golden(logits, made_with, float(meta.get("atol", 1e-5)))  # older goldens: the default


VERSIONED = ("torch", "transformers")


def versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def check_golden(model_type: str, tie: bool, got: torch.Tensor) -> None:
    """Raise unless `got` is the golden within its measured last-bit spread. The message tells
    an upstream change (other versions than made the golden) from a numeric one (same versions)."""
    golden = load_golden(model_type, tie)
    diff = (got - golden.logits).abs().max().item()
    if diff <= golden.atol:
        return
    now = versions()
    if now != golden.made_with:
        cause = f"upstream drift: {now} compute differently from {golden.made_with}, which made it"
    else:
        cause = ("numeric drift: the same versions that made it compute differently, by more than "
                 "any last-bit difference between machines")
    raise AssertionError(f"{model_type} golden (tie={tie}): max |dlogits| {diff:.3g} > {golden.atol:.3g}; "
                         f"{cause}")


def ulp_noise(tensors: Iterable[torch.Tensor], seed: int) -> None:
    """Move every value one step up or down to its float neighbour, in place: what another
    machine's kernels do to the last bits, made deliberately."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in tensors:
            sign = torch.randint(0, 2, t.shape, generator=g).to(t.dtype) * 2 - 1
            t.copy_(torch.nextafter(t, t + sign * float("inf")))


def tiny_spec(model_type: str, tie: bool) -> ModelSpec:
    """The ModelSpec of a family's tiny model, as the converter reads it."""
    return FAMILIES[model_type].read(tiny_config(model_type, tie=tie).to_dict(), model_type)


# Families the Megatron-Core tests convert and run in megatron-core (tests/megatron). Each is
# looked up: a name that is not a registered family fails here rather than vanishing.
MEGATRON_FAMILIES = [FAMILIES[f].model_type for f in ("llama", "qwen2", "mistral", "qwen3")]

# Families transformers can build; remote-code layouts are checked in test_layouts.py.
BUILT = [name for name in FAMILIES if name in TINY]
TARGETS = [name for name in BUILT if FAMILIES[name].keys is not None]
# Families whose tiny model the unified model holds (tests/test_unified.py loads each through
# its key map and compares logits with the original): every feature computed, the tensors mapped.
UNIFIED_HELD = [f for f in BUILT if FAMILIES[f].keys is not None
                and not blocking(tiny_spec(f, False), held(tiny_spec(f, False)))]


def refused_by(spec: ModelSpec, target: str) -> list[str]:
    """What a family target refuses of a spec: features it cannot hold (a bias among them
    only when nonzero), then dimensions it cannot write (GPT-NeoX has no field for GQA)."""
    return blocking(spec, FAMILIES[target].express(spec)) + list(FAMILIES[target].refuses(spec))


def _pairs(refused: bool) -> list[tuple[str, str, bool]]:
    out = []
    for s in BUILT:
        for t in TARGETS:
            for tie in TIES:
                if s != t and bool(refused_by(tiny_spec(s, tie), t)) == refused:
                    out.append((s, t, tie))
    return out


def conversion_cases() -> list[tuple[str, str, bool]]:
    """Every (source, target, tied) where the target can hold the source's tiny model."""
    return _pairs(refused=False)


def refusal_cases() -> list[tuple[str, str, bool]]:
    """Every (source, target, tied) where the target cannot: each must refuse by name."""
    return _pairs(refused=True)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory, by the safetensors library (not our reader)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(safetensors.torch.load_file(f))
    return out


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, and every tensor torch.equal (dtype included)."""
    assert sorted(a) == sorted(b), f"key sets differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), f"tensor '{k}' differs"


def fails(capsys, args: list[str], *needles: str) -> None:
    """`reference ARGS` exits 2 with one line on stderr holding every needle."""
    from reference.cli import main

    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
