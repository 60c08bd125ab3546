"""Megatron-Core checkpoints (Megatron-LM's `torch` format), with tensor, pipeline and virtual
pipeline parallelism, in the local or the TransformerEngine key layout."""

from pathlib import Path

from reference.converters.megatron.layout import MegatronLayout
from reference.converters.megatron.read import read_megatron
from reference.converters.megatron.stage import TRACKER
from reference.converters.megatron.target import MegatronTarget

__all__ = ["MegatronLayout", "MegatronTarget", "is_megatron_dir", "read_megatron"]


def is_megatron_dir(path: Path) -> bool:
    """A Megatron-LM checkpoint directory has latest_checkpointed_iteration.txt."""
    return (Path(path) / TRACKER).is_file()

