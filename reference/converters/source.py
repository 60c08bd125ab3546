"""A checkpoint opened for reading: its family, spec, config extras and lazy canonical tensors."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reference.converters.hf_dir import open_hf
from reference.converters.plan import Lazy, read_canonical
from reference.converters.unified_dir import is_unified_dir, read_unified
from reference.errors import InputError
from reference.families.config import PASSTHROUGH
from reference.families.family import Family
from reference.families.spec import ModelSpec


@dataclass(frozen=True)
class Source:
    """What every reader hands every writer. `family` is the HF family the weights came from
    (for a Megatron checkpoint, the one recorded in it); `key_of` names a canonical tensor as
    the source file calls it, for error messages."""

    path: Path
    family: Family
    spec: ModelSpec
    extra: dict[str, Any]
    tensors: dict[str, Lazy]
    key_of: Callable[[str], str]
    # The config.json of the family the weights were first converted from (a conversion
    # record carries it along), else the source's own: written back whole by a target of that
    # family while the weights still describe it, so no field the spec omits is lost.
    config: dict[str, Any] | None = None
    # How the tensors were read ("dequantized 40 fp8 tensors (block 128x128) to bfloat16"), and
    # the parts no class of the family computes with, kept out of `tensors`: feature -> keys
    # (a conversion refuses them unless allowed, unheld.py; loading a model ignores them, as
    # transformers' class does).
    read_as: tuple[str, ...] = ()
    unheld: dict[str, list[str]] = field(default_factory=dict)


def passthrough(config: dict[str, Any]) -> dict[str, Any]:
    """The config fields that mean the same in every family."""
    extra = {k: config[k] for k in PASSTHROUGH if k in config}
    if "torch_dtype" in config and "dtype" not in extra:
        extra["dtype"] = config["torch_dtype"]  # transformers 4.x name
    return extra


RECORD = "conversion.json"  # what a conversion did, beside the weights it wrote


def carried_config(path: Path) -> dict[str, Any] | None:
    """The source_config a conversion record in `path` carries, if any (a record that cannot
    be read carries nothing: it is an account of the past, not an input)."""
    try:
        carried = json.loads((path / RECORD).read_text()).get("source_config")
    except (OSError, ValueError, AttributeError):
        return None
    return carried if isinstance(carried, dict) and "model_type" in carried else None


def open_source(path: Path, family: str | None = None, *, any_fit: bool = False,
                dtype: torch.dtype | None = None) -> Source:
    """An HF model directory, a unified one or a Megatron checkpoint, by what it holds;
    `family` (--family) names the family of a Megatron checkpoint that does not record one;
    `any_fit` takes the first family its args fit, for callers that use only the spec; `dtype`
    is the one FP8 weights are dequantized into (default: the config's, fp8.py), so that a
    cast asked for rounds the float32 product once, as transformers loading in that dtype does."""
    source = _open(path, family, any_fit, dtype)
    carried = carried_config(path)
    return dataclasses.replace(source, config=carried) if carried else source


def _open(path: Path, family: str | None, any_fit: bool, dtype: torch.dtype | None) -> Source:
    from reference.converters import megatron

    if megatron.is_megatron_dir(path):
        return megatron.read_megatron(path, family, any_fit=any_fit)
    if family is not None:  # an HF or unified directory names its family itself
        raise InputError(f"--family {family}: applies only to a Megatron-LM checkpoint, not {path}")
    if is_unified_dir(path):
        return read_unified(path)
    model = open_hf(path, dtype)
    family = model.family
    if family.keys is None:  # known by its features only: fine for refusing, not for reading
        return Source(path, family, model.spec, passthrough(model.config), {}, str, model.config)
    tensors = read_canonical(model.entries, family, model.spec, str(path))
    return Source(path, family, model.spec, passthrough(model.config), tensors,
                  lambda name: family.keys.hf(name, family.model_type)[0], model.config,
                  model.read_as, model.unheld)
