"""The one JSONL reader (infer's rows, train's samples): every non-blank line a JSON object,
anything else refused with an InputError naming the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from reference.errors import InputError


def line_error(path: Path, line: int, message: str) -> InputError:
    """The error for one line of a data file, as `path:line: message`."""
    return InputError(f"{path}:{line}: {message}")


def read_objects(path: Path, expected: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; `expected` says what a line holds, for
    the message when the file is missing."""
    if not path.is_file():
        raise InputError(f"{path}: no such data file (expected JSONL, {expected})")
    with path.open(encoding="utf-8") as f:
        for n, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise line_error(path, n, f"not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(obj, dict):
                raise line_error(path, n, f"a line must be a JSON object, not {type(obj).__name__}")
            yield n, obj
