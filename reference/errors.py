"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class ReferenceError(Exception):
    """Bad input or an inexpressible model; the message names the file, key, family or feature."""


class Inexpressible(ReferenceError):
    """A target family cannot express a feature the model uses."""

    def __init__(self, target: str, feature: str, detail: str = "", unified_holds: bool = False) -> None:
        self.target, self.feature, self.detail = target, feature, detail
        hint = " (use --to unified to keep it)" if unified_holds and target != "unified" else ""
        detail = f": {detail}" if detail else ""
        super().__init__(f"{target} cannot express feature '{feature}'{detail}{hint}")
