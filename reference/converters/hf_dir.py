"""An HF model directory as (config dict, family, spec, tensors), validated up front."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from reference.converters.fp8 import Dequantized, dequantized, read_fp8
from reference.converters.safetensors_io import Entry, read_dir
from reference.converters.unheld import split_unheld
from reference.errors import InputError
from reference.families.family import Family
from reference.families.registry import family_of
from reference.families.resolve import as_loaded
from reference.families.spec import ModelSpec


@dataclass(frozen=True)
class HFModel:
    """What a converter needs to know of an HF checkpoint before reading any tensor data."""

    path: Path
    config: dict[str, Any]
    family: Family
    spec: ModelSpec
    entries: dict[str, Entry | Dequantized]  # FP8 weights read as the dense ones they stand for
    # How the tensors were read, for the conversion report ("dequantized 40 fp8 tensors ...").
    read_as: tuple[str, ...] = ()
    # Parts no class of the family computes with (unheld.py), kept out of `entries`: feature -> keys.
    unheld: dict[str, list[str]] = field(default_factory=dict)


def read_config(path: Path) -> dict[str, Any]:
    """config.json of an HF model directory."""
    if not path.is_dir():
        raise InputError(f"{path}: no such model directory")
    cfg_path = path / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise InputError(f"{cfg_path}: missing (not an HF model directory)") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{cfg_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path}: not a JSON object")
    return cfg


def read_beside(path: Path, family: Family) -> dict[str, str]:
    """The text of the files beside config.json that reading the family's config needs
    (`Family.beside`), those present: read, never run."""
    return {name: (path / name).read_text(errors="replace") for name in family.beside
            if (path / name).is_file()}


def open_hf(path: Path, dtype: torch.dtype | None = None) -> HFModel:
    """Config, family, spec and the tensor index of an HF model directory. FP8 block-scaled
    weights are read dequantized (into `dtype`, default the config's), and the config is
    returned without its quantization_config (what is read is no longer quantized)."""
    cfg = read_config(path)
    where = str(path / "config.json")
    family = family_of(cfg, where)
    files = read_beside(path, family)
    family.read(cfg, where, files)  # the fields a checkpoint must state, before any class fills them
    spec = family.read(as_loaded(cfg, where), where, files)
    fp8 = read_fp8(cfg, where, dtype)
    entries = read_dir(path)
    unheld = split_unheld(entries, cfg, spec.num_layers)
    apart = {k for keys in unheld.values() for k in keys}  # their scales included: same prefix
    read = dequantized({k: e for k, e in entries.items() if k not in apart}, fp8, str(path))
    count = sum(isinstance(e, Dequantized) for e in read.values())
    read_as = (fp8.describe(count),) if count else ()
    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    return HFModel(path, cfg, family, spec, read, read_as, unheld)
