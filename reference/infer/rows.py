"""The rows of a job: read and checked before any work, keyed by a stable id; the manifest
that ties an output to its input and model; the parts that workers commit, read back by id."""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reference.errors import InputError
from reference.jsonl import line_error, read_objects


@dataclass(frozen=True)
class Row:
    """One input row: its id (given, or the 1-based line number), a `prompt` or chat `messages`."""

    id: Any
    line: int
    prompt: str | None = None
    messages: list[dict] | None = None

    @property
    def key(self) -> str:
        """The id as a dict key that keeps 1 and "1" apart."""
        return json.dumps(self.id)

    @property
    def size(self) -> int:
        """A length proxy for sorting rows into batches with little padding (characters)."""
        return len(self.prompt) if self.prompt is not None else len(json.dumps(self.messages))


def read_rows(path: Path) -> list[Row]:
    """Every row of a JSONL file; a malformed line is an InputError naming it."""
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for n, obj in read_objects(path, "one prompt or chat a line"):
        prompt, messages = obj.get("prompt"), obj.get("messages")
        if (prompt is None) == (messages is None):
            raise line_error(path, n, "give exactly one of 'prompt' (a string) or 'messages'")
        if prompt is not None and not isinstance(prompt, str):
            raise line_error(path, n, "'prompt' must be a string")
        if messages is not None and not (isinstance(messages, list)
                                         and all(isinstance(m, dict) for m in messages)):
            raise line_error(path, n, "'messages' must be a list of objects")
        id_ = obj.get("id", n)
        if not isinstance(id_, (int, str)) or isinstance(id_, bool):
            raise line_error(path, n, "'id' must be an integer or a string")
        row = Row(id=id_, line=n, prompt=prompt, messages=messages)
        if row.key in seen:
            raise line_error(path, n, f"id {row.key} already on line {seen[row.key]}")
        seen[row.key] = n
        rows.append(row)
    return rows


def row_seed(seed: int, id_: Any) -> int:
    """The sampling seed of a row: seed + its id (a string id through crc32), whatever the batch."""
    return seed + (id_ if isinstance(id_, int) else zlib.crc32(str(id_).encode()))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomically(path: Path, lines: list[str]) -> None:
    """Write `lines` to a temporary file beside `path`, flush it to disk, rename it over `path`:
    a reader (or a rerun after a kill) sees the whole file or none of it."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with tmp.open("w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_manifest(path: Path, manifest: dict, output: Path) -> None:
    """Write the job's manifest beside the output, or refuse an output made by another job."""
    if path.is_file():
        old = json.loads(path.read_text())
        if old != manifest:
            differ = ", ".join(k for k in manifest if old.get(k) != manifest[k])
            raise InputError(f"{output}: made from a different job ({differ} differ, see {path}); "
                             f"remove it, {path.name} and {output.name}.parts, or choose another output")
        return
    if output.exists():
        raise InputError(f"{output}: exists but has no manifest ({path.name}), so it may come from "
                         "another input or model; remove it or choose another output")
    write_atomically(path, [json.dumps(manifest, indent=1)])


def committed_parts(parts: Path) -> list[Path]:
    """The committed part files, in name order: not the dot files (a temporary part of a worker
    killed mid-write, or one being written now), which pathlib's glob matches too."""
    return sorted(p for p in parts.glob("*.jsonl") if not p.name.startswith(".")) if parts.is_dir() else []


def read_done(parts: Path, output: Path) -> dict[str, dict]:
    """The rows already committed, by key: every part file, and the output of a finished run."""
    done: dict[str, dict] = {}
    for f in ([output] if output.is_file() else []) + committed_parts(parts):
        for text in f.read_text(encoding="utf-8").splitlines():
            row = json.loads(text)
            done[json.dumps(row["id"])] = row
    return done
