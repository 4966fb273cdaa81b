"""Atomic file writes: a reader, or a run killed mid-write, sees the old file or the new one,
never a torn one. Standard library only, so light modules (evals, instruction data) can use it."""
from __future__ import annotations

import os
import shutil
import tempfile


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: str, path: str) -> None:
    """Put the finished directory ``tmp`` at ``path`` (a sibling), replacing an older ``path``, durably. The
    old one is first renamed aside (a directory cannot be renamed over a non-empty one), so a crash leaves
    the old directory, or the new one, or the old one set aside next to it, never a half-written one."""
    parent = os.path.dirname(os.path.abspath(path))
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
        os.rename(path, os.path.join(old, "x"))
    os.rename(tmp, path)
    fsync_dir(parent)
    if old:
        shutil.rmtree(old)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via a temporary sibling file: fsync, rename, fsync the
    directory. The parent directory is created if needed; the temporary file never survives a failure."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(parent)
