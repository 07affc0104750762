"""The one atomic writer: every file and directory the stages hand each other appears complete or not at all.

A file is written under `<name>.partial` and renamed onto its name when the writing succeeded (a rename
within a directory is atomic on POSIX filesystems), so a reader, a resumed run or a crash never meets half
a file under the real name. Object stores put whole objects atomically and need none of this.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from distillery.errors import DistilleryError

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def publish(partial: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a finished `.partial` file (or directory entry) its real name."""
    os.replace(partial, path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the partial path to write `path` through; it takes the real name only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        yield partial
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    publish(partial, path)


def write_atomic(path: str | os.PathLike, content: str | bytes) -> Path:
    """Write text or bytes to `path` atomically, creating its directory."""
    with atomic_path(path) as partial:
        partial.write_bytes(content) if isinstance(content, bytes) else partial.write_text(content)
    return Path(path)


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike) -> Iterator[Path]:
    """Build a directory under `<out>.partial` and move its entries into `out` only when the block succeeds,
    so an interrupted conversion never leaves files under `out` that look like a finished set."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DistilleryError(f"{out}: not empty; write into a new or empty directory")
    partial = partial_path(out)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    out.mkdir(parents=True, exist_ok=True)
    for child in sorted(partial.iterdir()):
        publish(child, out / child.name)
    partial.rmdir()
