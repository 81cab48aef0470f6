"""Small file operations every layer needs: bounded reads of input files, atomic writes.

Input files (policies, records, guest configurations, evidence) are read with a size bound so
that a wrong path (a disk image, /dev/zero) fails with one clear error instead of eating
memory. Files the project writes are replaced atomically: a temporary file in the same
directory, fsync, rename over the old one, fsync of the directory.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from vtpm.errors import ConfigError


def read_limited(path: Path, what: str, limit: int) -> bytes:
    """The bytes of `path`, at most `limit` of them; ConfigError naming `what` otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit} bytes")
    return data


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that a crash leaves the old or the new file, whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    write_new(tmp, data, mode)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_new(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Create `path` (it must not exist) holding `data`, on disk (fsync) when this returns;
    a failure removes it. The first step of an atomic replace: rename it over the target."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)
