"""Checkpoint converters: `convert(src, dst, to=...)` between HF families and Megatron-Core."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reference.converters.conversion import Report, convert

__all__ = ["Report", "convert"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the CLI's argument definitions and `reference families` live in
    # this package and must not pay for torch (seconds) to show a help text or a table.
    if name in __all__:
        from reference.converters import conversion

        return getattr(conversion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
