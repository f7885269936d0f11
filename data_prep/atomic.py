"""The one way this project commits a file: write a temporary file beside it, fsync it, rename it over the
target, fsync the directory. After a crash (SIGKILL, a node losing power) the path holds the old file or the
whole new one, never a part of it, and a rename that was reported done survives.

- ``atomic_path(path)``: for writers that want a path (``tokenizers``' ``save``, ``np.lib.format.open_memmap``,
  ``shutil.copyfile``): they write the yielded temporary path, the commit follows.
- ``atomic_open(path, mode)``: a file object for writing piece by piece; ``AtomicFile`` where the writing spans
  several calls (a part that streams in, committed by ``commit()``).
- ``write_text``, ``write_json``, ``save_npy``: whole files at once.

On an exception the temporary file is removed and the target is untouched. Several commits in order make a
multi-file commit: the last file written is the completion marker its readers look for. Used by data prep and
by the trainer's checkpoints and logs alike (``pretrain`` imports it; it imports nothing of the project).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

TMP_SUFFIX = ".tmp"


def temporary(path: Path) -> Path:
    """Where a file is written before its commit: beside it, so the rename never crosses file systems."""
    return path.with_name(path.name + TMP_SUFFIX)


def fsync_dir(path: Path) -> None:
    """Make the renames inside directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _commit(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:  # writers that took a path closed it themselves: flush it to the disk here
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class AtomicFile:
    """A file written under its temporary name across many calls (a part that streams in); ``commit()`` puts it
    in place, ``discard()`` removes it."""

    def __init__(
        self, path: str | os.PathLike, mode: str = "wb", encoding: str | None = None, newline: str | None = None
    ) -> None:
        self.path = Path(path)
        self.tmp = temporary(self.path)
        self.f: IO[Any] = open(self.tmp, mode, encoding=encoding, newline=newline)  # noqa: SIM115 - commit closes

    def commit(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)
        fsync_dir(self.path.parent)

    def discard(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for any writer; on success commit it as ``path``. The writer must write that
    very path (``np.save`` adds ``.npy`` to other names: give it a file object, or use ``save_npy``)."""
    path = Path(path)
    tmp = temporary(path)
    try:
        yield tmp
        _commit(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "wb", encoding: str | None = None, newline: str | None = None
) -> Iterator[IO[Any]]:
    """A file object open on a temporary file; committed as ``path`` when the block ends without an error."""
    af = AtomicFile(path, mode, encoding, newline)
    try:
        yield af.f
    except BaseException:
        af.discard()
        raise
    af.commit()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
