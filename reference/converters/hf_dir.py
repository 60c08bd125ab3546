"""An HF model directory as (config dict, family, spec, tensors), validated up front."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reference.converters.safetensors_io import Entry, read_dir
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
    entries: dict[str, Entry]


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


def open_hf(path: Path) -> HFModel:
    """Config, family, spec and the tensor index of an HF model directory."""
    cfg = read_config(path)
    where = str(path / "config.json")
    family = family_of(cfg, where)
    files = read_beside(path, family)
    family.read(cfg, where, files)  # the fields a checkpoint must state, before any class fills them
    spec = family.read(as_loaded(cfg, where), where, files)
    return HFModel(path, cfg, family, spec, read_dir(path))
