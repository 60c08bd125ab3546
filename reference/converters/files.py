"""Output directories that appear whole or not at all, and the side files that travel."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from reference.errors import ReferenceError

# Tokenizer, generation and chat-template files are copied verbatim: converters that rebuild
# them have shipped models with the wrong special tokens.
SIDE_FILES = (
    "tokenizer*", "*.tiktoken", "*.model", "vocab.*", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json", "chat_template*", "*.jinja",
)


def side_files(src: Path) -> list[Path]:
    """The files of SRC that travel unchanged."""
    return sorted(p for p in src.iterdir() if p.is_file()
                  and any(fnmatch.fnmatch(p.name, pat) for pat in SIDE_FILES))


@contextlib.contextmanager
def atomic_dir(dst: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling directory that replaces DST only if the block succeeds."""
    if dst.exists() and not force:
        raise ReferenceError(f"{dst}: already exists (use --force to replace it)")
    if not dst.parent.is_dir():
        raise ReferenceError(f"{dst.parent}: no such directory")
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
