"""Megatron-Core checkpoints (Megatron-LM's `torch` and `torch_dist` formats), with tensor,
pipeline and virtual pipeline parallelism, in the local or the TransformerEngine key layout."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reference.converters.megatron.layout import MegatronLayout
    from reference.converters.megatron.read import read_megatron
    from reference.converters.megatron.target import MegatronTarget

__all__ = ["MegatronLayout", "MegatronTarget", "is_megatron_dir", "read_megatron"]
# Imported on first use: `reference families` needs the layout and the target's verdicts,
# not the reader and writer, which import torch (seconds).
_LAZY = {"MegatronLayout": "layout", "MegatronTarget": "target", "read_megatron": "read"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_megatron_dir(path: Path) -> bool:
    """A Megatron-LM checkpoint root has latest_checkpointed_iteration.txt; an iteration
    directory counts too (the `torch` format's is refused by name when read)."""
    from reference.converters.megatron.dist import is_dist_dir, rank_dirs
    from reference.converters.megatron.stage import TRACKER

    path = Path(path)
    return (path / TRACKER).is_file() or is_dist_dir(path) or bool(rank_dirs(path))
