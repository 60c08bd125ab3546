"""Data-parallel batch inference: many model replicas, each row exactly once, resumable."""

from reference.infer.runner import Infer

__all__ = ["Infer"]
