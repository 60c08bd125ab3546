"""Checkpoint converters: `convert(src, dst, to=...)` between HF families, the unified model's
own format and Megatron-Core checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reference.converters.conversion import Report, convert

__all__ = ["Report", "convert"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `reference convert --help` and `reference families` import from
    # this package and must not pay for torch (seconds) to show a help text or a table.
    if name in __all__:
        from reference.converters import conversion

        return getattr(conversion, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
