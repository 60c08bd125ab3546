"""Output directories that appear whole or not at all, and the side files that travel."""

from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from reference.errors import InputError

# Tokenizer, generation and chat-template files are copied verbatim: converters that rebuild
# them have shipped models with the wrong special tokens. So is a checkpoint's remote code
# (`*.py`: ChatGLM's tokenization_chatglm.py, modeling_chatglm.py): the tokenizer loads only
# with it, and the modeling file says what the config means.
SIDE_FILES = (
    "tokenizer*", "*.tiktoken", "*.model", "vocab.*", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json", "chat_template*", "*.jinja", "*.py",
)


def side_files(src: Path) -> list[Path]:
    """The files of SRC that travel unchanged."""
    return sorted(p for p in src.iterdir() if p.is_file()
                  and any(fnmatch.fnmatch(p.name, pat) for pat in SIDE_FILES))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file under `root`, then every directory from the deepest up: a name is durable
    only once the directory holding it is."""
    for where, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync(Path(where) / name)
        _fsync(Path(where))


@contextlib.contextmanager
def atomic_dir(dst: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling directory that replaces DST only if the block succeeds. Its files
    and directories reach the disk before the rename, and the rename before this returns, so
    that after a power cut DST is whole, or absent (or still the old one)."""
    if dst.exists() and not force:
        raise InputError(f"{dst}: already exists (use --force to replace it)")
    if not dst.parent.is_dir():
        raise InputError(f"{dst.parent}: no such directory")
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if dst.exists():
            old = dst.parent / f".{dst.name}.old-{os.getpid()}"
            dst.rename(old)
            tmp.rename(dst)
            _fsync(dst.parent)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(dst)
            _fsync(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
