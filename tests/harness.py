"""The shared harness: the equivalence matrix read off the registry, goldens, and helpers.

Adding a family to reference.families.registry adds its rows here; nothing is listed twice.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch

from reference.families.registry import FAMILIES
from reference.families.spec import ModelSpec
from reference.families.verdict import blocking
from reference.tiny import TINY, tiny_config

GOLDENS = Path(__file__).resolve().parents[1] / "goldens"
TIES = (False, True)


def golden_path(model_type: str, tie: bool) -> Path:
    return GOLDENS / f"{model_type}-tie{int(tie)}.safetensors"


def load_golden(model_type: str, tie: bool) -> tuple[torch.Tensor, dict[str, str]]:
    """The golden logits of a family's tiny model, and the versions that made them."""
    path = golden_path(model_type, tie)
    with safetensors.safe_open(path, "pt") as f:
        return f.get_tensor("logits"), f.metadata()


def tiny_spec(model_type: str, tie: bool) -> ModelSpec:
    """The ModelSpec of a family's tiny model, as the converter reads it."""
    return FAMILIES[model_type].read(tiny_config(model_type, tie=tie).to_dict(), model_type)


# Families the Megatron-Core tests convert and run in megatron-core (tests/megatron).
MEGATRON_FAMILIES = [f for f in ("llama", "qwen2", "mistral", "yi", "qwen3") if f in FAMILIES]

# Families transformers can build; remote-code layouts are checked in test_layouts.py.
BUILT = [name for name in FAMILIES if name in TINY]
TARGETS = [name for name in BUILT if FAMILIES[name].keys is not None]


def _pairs(refused: bool) -> list[tuple[str, str, bool]]:
    out = []
    for s in BUILT:
        for t in TARGETS:
            for tie in TIES:
                spec = tiny_spec(s, tie)
                if s != t and bool(blocking(spec, FAMILIES[t].express(spec))) == refused:
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
