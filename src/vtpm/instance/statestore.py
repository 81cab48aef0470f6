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
and only once the journal has recorded it replaces `<name>.blob`; a deletion renames the blob to
`<name>.gone`, is reported, then unlinks it. Whatever point a crash hits, one of the files
carries the digest the journal holds: load picks that one and promotes it (or restores it).
What load does with the rest, by the rules of `_load_journaled`:
- a `.next` or `.gone` file the journal does not hold is the leftover of a write or deletion
  in flight, never acknowledged: discarded;
- a `.blob` file the journal does not hold is never deleted and never used: if the journal holds
  no such blob (the Manager's database is older than the state, or lost) or another digest (an
  older copy of the blob put back, or a newer one the database does not know), the instance
  refuses to start, naming the file and what to do, and leaves every file as it is;
- a recorded `volatilestate` that is missing is "no saved volatile state" (the TPM then needs
  Startup(CLEAR)), logged at WARNING and recorded as deleted; a recorded `permall` or
  `savestate` that is missing is refused (acknowledged state lost).

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
from collections.abc import Callable
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

VOLATILE = "volatilestate"
MAGIC = b"VTPMBLB1"
FORMAT_VERSION = 1
HEADER = struct.Struct(">8sIQ12s")
BLOB_NAMES = ("permall", "volatilestate", "savestate")
SUFFIX = ".blob"
NEXT_SUFFIX = ".next"
GONE_SUFFIX = ".gone"
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


def _digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


class StateStore:
    """Encrypted, atomic, locked storage for one vTPM's state blobs. Thread-safe."""

    def __init__(
        self,
        directory: Path,
        vtpm_uuid: uuid.UUID,
        key: StateKey,
        journal: StateJournal | None = None,
        health: Callable[[bool, str], None] | None = None,
    ) -> None:
        """`health`: told when the TPM these blobs belong to cannot serve, and when it can
        again (the engine calls `tpm_health`; the Manager's link passes it on)."""
        self.directory = directory
        self.journal = journal
        self._health = health
        self.vtpm_uuid = vtpm_uuid
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"vtpm state blob v1")
        self._aead = AESGCM(hkdf.derive(key.secret))
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._counters: dict[str, int] = {}
        # writes whose recording failed: (SHA-256 of the data, counter, file bytes), by name
        self._unsettled: dict[str, tuple[bytes, int, bytes]] = {}

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

    def tpm_health(self, failed: bool, reason: str) -> None:
        """`vtpm.engine.engine.HealthListener`: passed on to the `health` callback, if any."""
        if self._health is not None:
            self._health(failed, reason)

    # helpers ---------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        if name not in BLOB_NAMES:
            raise StateError(f"unknown state blob name {name!r}")
        return self.directory / f"{name}{SUFFIX}"

    def _next_path(self, name: str) -> Path:
        return self.directory / f"{name}{NEXT_SUFFIX}"

    def _gone_path(self, name: str) -> Path:
        return self.directory / f"{name}{GONE_SUFFIX}"

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
        """The rules of the module docstring: the journal's digest picks the file."""
        assert self.journal is not None
        expected = self.journal.expected(name)
        nxt, gone = self._next_path(name), self._gone_path(name)
        cur_raw = self._read(path)
        if expected is None:
            if cur_raw is not None:
                raise self._unrecorded(name, path, cur_raw, none_recorded=True)
            self._discard(nxt, "a write the Manager never recorded")
            self._discard(gone, "a deletion the Manager recorded")
            return None
        if cur_raw is not None and _digest(cur_raw) == expected:
            self._discard(nxt, "a write the Manager never recorded")
            self._discard(gone, "a deletion the Manager never recorded, superseded")
            return self._open(name, path, cur_raw)
        # a recorded write whose rename did not happen; a deletion the Manager never recorded
        # (only where no .blob is: a .blob file is never replaced by anything but its write)
        candidates = [(nxt, "the write the Manager recorded completes")]
        if cur_raw is None:
            candidates.append((gone, "a deletion the Manager never recorded is undone"))
        for candidate, what in candidates:
            raw = self._read(candidate)
            if raw is not None and _digest(raw) == expected:
                plain = self._open(name, candidate, raw)
                log.info("%s: %s", path.name, what)
                os.replace(candidate, path)
                _fsync_dir(self.directory)
                self._discard(gone, "superseded")
                return plain
        if cur_raw is not None:
            raise self._unrecorded(name, path, cur_raw, none_recorded=False)
        if name != VOLATILE:
            raise StateIntegrityError(
                f"state blob {path} is missing but the Manager records it (acknowledged state "
                "lost); refusing to start, files left as they are: restore the file from a "
                "backup of the state directory"
            )
        self._discard(nxt, "a write the Manager never recorded")
        self._discard(gone, "a deletion the Manager never recorded")
        log.warning(
            "%s: the Manager records a saved volatile state but the file is missing; "
            "starting without it (the TPM needs Startup(CLEAR))",
            path,
        )
        self.journal.deleted(name)
        return None

    def _unrecorded(
        self, name: str, path: Path, raw: bytes, none_recorded: bool
    ) -> StateIntegrityError:
        """The refusal of a `.blob` file the journal does not hold (it is left as it is)."""
        try:
            self._open(name, path, raw)
        except StateIntegrityError:
            return self._refuse(path, "not the recorded digest, and it does not open")
        if none_recorded:
            return StateIntegrityError(
                f"state blob {path} is this vTPM's but the Manager records no {name} state "
                "(its database is older than the state, or was replaced); refusing to start, "
                "the file is kept: restore the Manager's database that recorded it, or move "
                "the file out of the state directory to start without it (its state is then "
                "lost)"
            )
        return StateIntegrityError(
            f"state blob {path} does not match the recorded state (an older copy put back, "
            "or a state newer than the Manager's database); refusing to start, the file is "
            "kept: put back the blob the Manager recorded, or the Manager's database that "
            "recorded this one"
        )

    def _discard(self, path: Path, why: str) -> None:
        """Remove a `.next` / `.gone` leftover of an operation in flight (never a `.blob`)."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            log.info("discarding %s: %s", path.name, why)
            _fsync_dir(self.directory)

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
            unsettled = self._unsettled.get(name)
            if unsettled is not None:
                counter, raw = self._retry_unsettled(name, data, unsettled)
            else:
                counter = self._next_counter(name, path)
                nonce = secrets.token_bytes(12)
                body = self._aead.encrypt(nonce, data, self._aad(name, counter))
                raw = HEADER.pack(MAGIC, FORMAT_VERSION, counter, nonce) + body
            tmp = path.with_name(path.name + TMP_SUFFIX)
            digest = hashlib.sha256(raw).digest()
            try:  # a full disk, a quota: the old file stays current, the write can be retried
                write_new(tmp, raw, 0o600)
                nxt = path if self.journal is None else self._next_path(name)
                os.replace(tmp, nxt)
                _fsync_dir(self.directory)
            except OSError as e:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise StateError(f"state blob {path} cannot be written: {e.strerror}") from None
            if self.journal is not None:
                # until recorded, the old file stays current; if recording fails, .next stays
                # for the next load to settle by what the journal ends up holding
                try:
                    self.journal.written(name, counter, digest)
                except BaseException:
                    self._unsettled[name] = (hashlib.sha256(data).digest(), counter, raw)
                    raise
                self._unsettled.pop(name, None)
                os.replace(nxt, path)
                _fsync_dir(self.directory)
            self._counters[name] = counter
            return BlobInfo(name, counter, digest)

    def _retry_unsettled(
        self, name: str, data: bytes, unsettled: tuple[bytes, int, bytes]
    ) -> tuple[int, bytes]:
        """The bytes of a write whose recording failed, for its retry. The journal may have
        recorded it (a lost answer): the `.next` file then must keep exactly these bytes, so
        only the same state is written again, as the same file."""
        data_digest, counter, raw = unsettled
        if hashlib.sha256(data).digest() != data_digest:
            raise StateError(
                f"state blob {name} cannot be written: an earlier write of it may or may not "
                "have been recorded by the Manager; restart the vTPM to settle it"
            )
        return counter, raw

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
            gone = self._gone_path(name)
            if self.journal is not None and existed:
                # renamed first, then recorded: a crash leaves a `.gone` file that the next
                # load restores (not recorded) or discards (recorded), never a `.blob` the
                # journal does not hold
                with contextlib.suppress(FileNotFoundError):
                    os.replace(path, gone)
                    _fsync_dir(self.directory)
                self.journal.deleted(name)
            self._unsettled.pop(name, None)
            for victim in (path, self._next_path(name), gone):
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
