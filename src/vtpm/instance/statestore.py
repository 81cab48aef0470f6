"""A vTPM's state blobs on disk, each sealed with AES-256-GCM under the state key.

File `<dir>/<name>.blob`, for name in permall / volatilestate / savestate:

    magic "VTPMBLB1" | u32 format version (1) | u64 write counter | 12-byte nonce | ciphertext+tag

The GCM key is HKDF-SHA256(state key, info = "vtpm state blob v1"), so the raw state key is
used for one purpose only. The authenticated data is magic | version | name | vTPM uuid |
counter: a blob renamed, copied to another vTPM, or with its counter edited fails to open.
Writes are atomic (O_EXCL temp file, fsync, rename, fsync of the directory) and leave a blob's
old version intact until the new one is complete. A failed load never changes the file.

Under a Manager a `StateJournal` records each blob's digest and decides which file is current
(rollback protection). A write then goes to `<name>.next` first, is reported to the journal,
and only once the journal has recorded it replaces `<name>.blob`. Whatever point a crash hits,
one of the two files carries the digest the journal holds: load picks that one and promotes it;
a file the journal does not know (an older copy put back, a write the journal never recorded)
is refused or discarded, never used.

Clear text never reaches the disk. It lives in Python `bytes`, which cannot be wiped reliably;
the process boundary is what isolates it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import secrets
import struct
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vtpm.errors import InstanceLockedError, StateError, StateIntegrityError
from vtpm.files import fsync_dir as _fsync_dir
from vtpm.files import write_new
from vtpm.instance.statekey import StateKey

log = logging.getLogger(__name__)

MAGIC = b"VTPMBLB1"
FORMAT_VERSION = 1
HEADER = struct.Struct(">8sIQ12s")
BLOB_NAMES = ("permall", "volatilestate", "savestate")
SUFFIX = ".blob"
NEXT_SUFFIX = ".next"
TMP_SUFFIX = ".tmp"


class StateJournal(Protocol):
    """The record of which blob is current (the Manager, through the instance's link)."""

    def expected(self, name: str) -> bytes | None:
        """Digest of the current file of blob `name`, or None if the blob does not exist."""
        ...

    def written(self, name: str, counter: int, digest: bytes) -> None:
        """Record a new current file; returns once recorded, raises StateError if not."""
        ...

    def deleted(self, name: str) -> None:
        """Record that blob `name` no longer exists."""
        ...


@dataclass(frozen=True, slots=True)
class BlobInfo:
    name: str
    counter: int
    digest: bytes  # SHA-256 of the file as written


class StateStore:
    """Encrypted, atomic, locked storage for one vTPM's state blobs. Thread-safe."""

    def __init__(
        self,
        directory: Path,
        vtpm_uuid: uuid.UUID,
        key: StateKey,
        journal: StateJournal | None = None,
    ) -> None:
        self.directory = directory
        self.journal = journal
        self.vtpm_uuid = vtpm_uuid
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"vtpm state blob v1")
        self._aead = AESGCM(hkdf.derive(key.secret))
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._counters: dict[str, int] = {}

    # lifecycle -------------------------------------------------------------------------------

    def open(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InstanceLockedError(
                f"vTPM {self.vtpm_uuid} is already running "
                f"(state directory {self.directory} is locked)"
            ) from None
        self._lock_fd = fd
        for leftover in self.directory.glob(f"*{TMP_SUFFIX}"):
            log.info("removing %s left by an interrupted write", leftover.name)
            leftover.unlink()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> StateStore:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # helpers ---------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        if name not in BLOB_NAMES:
            raise StateError(f"unknown state blob name {name!r}")
        return self.directory / f"{name}{SUFFIX}"

    def _next_path(self, name: str) -> Path:
        return self.directory / f"{name}{NEXT_SUFFIX}"

    def _aad(self, name: str, counter: int) -> bytes:
        return (
            MAGIC
            + struct.pack(">I", FORMAT_VERSION)
            + name.encode()
            + b"\0"
            + self.vtpm_uuid.bytes
            + struct.pack(">Q", counter)
        )

    def _refuse(self, path: Path, why: str) -> StateIntegrityError:
        log.debug("state blob %s refused: %s", path, why)
        return StateIntegrityError(
            f"state blob {path} is corrupt, truncated, or not this vTPM's; "
            "refusing to start (the file was left untouched)"
        )

    # operations ------------------------------------------------------------------------------

    def exists(self, name: str) -> bool:
        if self.journal is not None:
            self.path(name)  # validates the name
            return self.journal.expected(name) is not None
        return self.path(name).exists()

    def load(self, name: str, expected_digest: bytes | None = None) -> bytes | None:
        path = self.path(name)
        with self._lock:
            if self.journal is not None:
                return self._load_journaled(name, path)
            raw = self._read(path)
            if raw is None:
                return None
            if expected_digest is not None and hashlib.sha256(raw).digest() != expected_digest:
                raise self._rolled_back(path)
            return self._open(name, path, raw)

    @staticmethod
    def _read(path: Path) -> bytes | None:
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"state blob {path} cannot be read: {e.strerror}") from None

    @staticmethod
    def _rolled_back(path: Path) -> StateIntegrityError:
        return StateIntegrityError(
            f"state blob {path} does not match the recorded state (a rollback to an older "
            "copy, or a foreign one); refusing to start (the file was left untouched)"
        )

    def _load_journaled(self, name: str, path: Path) -> bytes | None:
        assert self.journal is not None
        expected = self.journal.expected(name)
        nxt = self._next_path(name)
        if expected is None:
            # the journal holds no such blob: whatever file is here was never recorded
            for stale in (path, nxt):
                if stale.exists():
                    log.info("discarding %s: the Manager records no %s blob", stale.name, name)
                    stale.unlink()
                    _fsync_dir(self.directory)
            return None
        cur_raw = self._read(path)
        if cur_raw is not None and hashlib.sha256(cur_raw).digest() == expected:
            if nxt.exists():
                log.info("discarding %s: a write the Manager never recorded", nxt.name)
                nxt.unlink()
                _fsync_dir(self.directory)
            return self._open(name, path, cur_raw)
        nxt_raw = self._read(nxt)
        if nxt_raw is not None and hashlib.sha256(nxt_raw).digest() == expected:
            plain = self._open(name, nxt, nxt_raw)
            os.replace(nxt, path)  # the recorded write completes
            _fsync_dir(self.directory)
            return plain
        raise self._rolled_back(path)

    def _open(self, name: str, path: Path, raw: bytes) -> bytes:
        if len(raw) < HEADER.size + 16:
            raise self._refuse(path, f"only {len(raw)} bytes")
        magic, version, counter, nonce = HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise self._refuse(path, "bad magic")
        if version != FORMAT_VERSION:
            raise self._refuse(path, f"format version {version}")
        try:
            plain = self._aead.decrypt(nonce, raw[HEADER.size :], self._aad(name, counter))
        except InvalidTag:
            raise self._refuse(path, "authentication failed") from None
        self._counters[name] = max(self._counters.get(name, 0), counter)
        return plain

    def store(self, name: str, data: bytes) -> BlobInfo:
        path = self.path(name)
        with self._lock:
            counter = self._next_counter(name, path)
            nonce = secrets.token_bytes(12)
            body = self._aead.encrypt(nonce, data, self._aad(name, counter))
            raw = HEADER.pack(MAGIC, FORMAT_VERSION, counter, nonce) + body
            tmp = path.with_name(path.name + TMP_SUFFIX)
            write_new(tmp, raw, 0o600)
            digest = hashlib.sha256(raw).digest()
            if self.journal is None:
                os.replace(tmp, path)
                _fsync_dir(self.directory)
            else:
                nxt = self._next_path(name)
                os.replace(tmp, nxt)
                _fsync_dir(self.directory)
                # until recorded, the old file stays current; if recording fails, .next stays
                # for the next load to settle by what the journal ends up holding
                self.journal.written(name, counter, digest)
                os.replace(nxt, path)
                _fsync_dir(self.directory)
            self._counters[name] = counter
            return BlobInfo(name, counter, digest)

    def _next_counter(self, name: str, path: Path) -> int:
        if name not in self._counters:
            # continue from what is on disk even if it was never loaded
            for candidate in (path, self._next_path(name)):
                try:
                    with candidate.open("rb") as f:
                        head = f.read(HEADER.size)
                except FileNotFoundError:
                    continue
                if len(head) == HEADER.size and head[:8] == MAGIC:
                    found = HEADER.unpack(head)[2]
                    self._counters[name] = max(self._counters.get(name, 0), found)
        return self._counters.get(name, 0) + 1

    def delete(self, name: str, must_exist: bool) -> bool:
        path = self.path(name)
        with self._lock:
            existed = self.exists(name)
            if self.journal is not None and existed:
                self.journal.deleted(name)  # recorded first: a leftover file is then discarded
            for victim in (path, self._next_path(name)):
                with contextlib.suppress(FileNotFoundError):
                    victim.unlink()
            _fsync_dir(self.directory)
            if not existed and must_exist:
                log.debug("state blob %s to delete does not exist", name)
            return existed

    # counters, for sealed transfer blobs (`vtpm.instance.transfer`) --------------------------

    def counter(self, name: str) -> int:
        """The write counter of blob `name`'s current version: as last loaded or written, else
        as found on disk (0: never written). Reads no more than file headers, changes nothing."""
        path = self.path(name)
        with self._lock:
            return self._next_counter(name, path) - 1

    def raise_counter(self, name: str, floor: int) -> None:
        """Make the next write of `name` carry a counter above `floor` (a state installed from
        a transfer blob stamped `floor` then counts as newer than that blob)."""
        path = self.path(name)
        with self._lock:
            self._next_counter(name, path)
            self._counters[name] = max(self._counters.get(name, 0), floor)
