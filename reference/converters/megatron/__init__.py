"""Megatron-Core checkpoints (placeholder until the Megatron layout lands)."""

from pathlib import Path


def is_megatron_dir(path: Path) -> bool:
    """A Megatron-LM checkpoint directory has latest_checkpointed_iteration.txt."""
    return (Path(path) / "latest_checkpointed_iteration.txt").is_file()
