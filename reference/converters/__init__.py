"""Checkpoint converters: `convert(src, dst, to=...)` between HF families (and, later, Megatron)."""

from reference.converters.convert import Report, convert

__all__ = ["Report", "convert"]
