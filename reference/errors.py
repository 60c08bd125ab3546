"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

from __future__ import annotations

import importlib.util


class InputError(Exception):
    """Bad input or an inexpressible model; the message names the file, key, family or feature."""


class Inexpressible(InputError):
    """A target family cannot express a feature the model uses."""

    def __init__(self, target: str, feature: str, detail: str = "", unified_holds: bool = False) -> None:
        self.target, self.feature, self.detail = target, feature, detail
        hint = " (use --to unified to keep it)" if unified_holds and target != "unified" else ""
        detail = f": {detail}" if detail else ""
        super().__init__(f"{target} cannot express feature '{feature}'{detail}{hint}")


def require(extra: str, *modules: str) -> None:
    """Raise, naming the first of `modules` that is not installed and the extra that installs
    it; commands call this before doing anything, so a missing one leaves nothing behind."""
    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise InputError(f"needs {name}: pip install 'reference[{extra}]'")
