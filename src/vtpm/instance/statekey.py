"""The state key: 32 secret bytes that encrypt a vTPM's state blobs.

It comes from a key file (mode 0600, not a symlink) or from an inherited file descriptor
(how the Manager will hand it over). Errors name the file and the problem, never the key.
"""

from __future__ import annotations

import binascii
import contextlib
import os
import secrets
import stat
from dataclasses import dataclass, field
from pathlib import Path

from vtpm.errors import StateKeyError

KEY_SIZE = 32
_MAX_READ = 256


@dataclass(frozen=True, slots=True)
class StateKey:
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_SIZE:
            raise StateKeyError(f"a state key is {KEY_SIZE} bytes, not {len(self.secret)}")

    def __repr__(self) -> str:
        return "StateKey(<secret>)"


def _parse(raw: bytes, where: str) -> StateKey:
    if len(raw) == KEY_SIZE:
        return StateKey(raw)
    text = raw.strip()
    if len(text) == 2 * KEY_SIZE:
        try:
            return StateKey(binascii.unhexlify(text))
        except binascii.Error:
            pass
    raise StateKeyError(
        f"{where} does not hold a state key ({KEY_SIZE} raw bytes or {2 * KEY_SIZE} hex digits)"
    )


def load_key_file(path: Path) -> StateKey:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StateKeyError(f"key file {path} does not exist") from None
    except OSError as e:
        if e.errno == 40:  # ELOOP: a symlink
            raise StateKeyError(f"key file {path} is a symlink; refusing it") from None
        raise StateKeyError(f"key file {path} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateKeyError(f"key file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise StateKeyError(
                f"key file {path} is accessible by group or others "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
            )
        raw = os.read(fd, _MAX_READ)
    finally:
        os.close(fd)
    return _parse(raw, f"key file {path}")


def load_key_fd(fd: int) -> StateKey:
    """Read the key from an inherited descriptor up to end of file, then close it."""
    chunks = []
    try:
        while True:
            chunk = os.read(fd, _MAX_READ)
            if not chunk:
                break
            chunks.append(chunk)
            if sum(map(len, chunks)) > _MAX_READ:
                raise StateKeyError(f"key descriptor {fd} holds more than a key")
    except OSError as e:
        raise StateKeyError(f"key descriptor {fd} cannot be read: {e.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    return _parse(b"".join(chunks), f"key descriptor {fd}")


def load_secret_fd(fd: int, max_size: int, what: str) -> bytes:
    """1..`max_size` secret bytes read from an inherited descriptor up to end of file, which is
    then closed (a migration secret). Errors name the descriptor, never the bytes."""
    data = b""
    try:
        while len(data) <= max_size:
            chunk = os.read(fd, max_size + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise StateKeyError(f"{what} descriptor {fd} cannot be read: {e.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    if not 1 <= len(data) <= max_size:
        size = "nothing" if not data else f"more than {max_size} bytes"
        raise StateKeyError(f"{what} descriptor {fd} holds {size} (1..{max_size} bytes wanted)")
    return data


def generate_key_file(path: Path) -> None:
    """Write a new random key (hex), mode 0600, refusing to overwrite anything."""
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:
        raise StateKeyError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as e:
        raise StateKeyError(f"cannot create key file {path}: {e.strerror}") from None
    try:
        os.write(fd, secrets.token_bytes(KEY_SIZE).hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)
