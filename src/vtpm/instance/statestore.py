"""A vTPM's state blobs on disk, one file per blob, each sealed under the state key.

File `<dir>/<name>.blob`, for name in permall / volatilestate / savestate, holds the sealed blob
of `vtpm.instance.stateblob` (AES-256-GCM, authenticated data binding name, vTPM uuid and write
counter: a blob renamed, copied to another vTPM, or with its counter edited fails to open).
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
  refuses to start, naming the file and what to do (`vtpm accept-state UUID` among it), and
  leaves every file as it is; started with `accept_state` (`--accept-state`, which that command
  makes the Manager pass once), such a file that opens under the key is used instead and
  reported to the journal as written, at WARNING;
- a recorded `volatilestate` that is missing is "no saved volatile state" (the TPM then needs
  Startup(CLEAR)), logged at WARNING and recorded as deleted; a recorded `permall` or
  `savestate` that is missing is refused (acknowledged state lost), except that with
  `accept_state` a missing `savestate` is recorded as deleted too.

The directory may belong to another user (the orchestrator's, whose vTPM this is) while the
instance runs as root, so nothing in it is trusted to be what its name says: blob files, their
leftovers and the lock file are opened with O_NOFOLLOW and must be regular files (a symlink or
FIFO planted as `permall.blob` is refused, never followed or blocked on), writes create their
temporary file with O_EXCL under a random name, and renames replace names, never follow them.

Clear text never reaches the disk. It lives in Python `bytes`, which cannot be wiped reliably;
the process boundary is what isolates it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
import threading
import uuid
from collections.abc import Callable
from pathlib import Path

from vtpm.errors import InstanceLockedError, StateError, StateIntegrityError
from vtpm.files import fsync_dir as _fsync_dir
from vtpm.files import write_new
from vtpm.instance.stateblob import (
    BLOB_NAMES,
    HEADER,
    PERMANENT,
    VOLATILE,
    BlobInfo,
    BlobOpenError,
    BlobSeal,
    StateJournal,
    StoreBase,
    accept_hint,
    blob_counter,
)
from vtpm.instance.stateblob import digest as _digest
from vtpm.instance.statekey import StateKey

__all__ = ["BLOB_NAMES", "HEADER", "VOLATILE", "BlobInfo", "StateJournal", "StateStore"]

log = logging.getLogger(__name__)

SUFFIX = ".blob"
NEXT_SUFFIX = ".next"
GONE_SUFFIX = ".gone"
TMP_SUFFIX = ".tmp"
MAX_BLOB = 16 * 1024 * 1024  # far above libtpms' largest state; a bound on a planted file
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def read_blob_file(path: Path, limit: int = MAX_BLOB) -> bytes | None:
    """The bytes of `path`, None if there is no such file; StateError if it is a symlink or not
    a regular file (never followed, never blocked on), unreadable, or larger than `limit`."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise StateError(
                f"state file {path} is a symbolic link; refusing to follow it "
                "(the file was left untouched)"
            ) from None
        raise StateError(f"state blob {path} cannot be read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StateError(
                f"state file {path} is not a regular file; refusing to use it "
                "(the file was left untouched)"
            )
        if st.st_size > limit:
            raise StateError(f"state blob {path} is larger than {limit} bytes; refusing it")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise StateError(f"state blob {path} cannot be read: {e.strerror}") from None
    finally:
        os.close(fd)


class StateStore(StoreBase):
    """Encrypted, atomic, locked storage for one vTPM's state blobs. Thread-safe."""

    def __init__(
        self,
        directory: Path,
        vtpm_uuid: uuid.UUID,
        key: StateKey,
        journal: StateJournal | None = None,
        health: Callable[[bool, str], None] | None = None,
        accept_state: bool = False,
    ) -> None:
        """`health`: told when the TPM these blobs belong to cannot serve, and when it can
        again (the engine calls `tpm_health`; the Manager's link passes it on).
        `accept_state`: blobs that open under the key but that the journal does not record
        are accepted and recorded (`--accept-state`; the module docstring's rules)."""
        self.directory = directory
        self.journal = journal
        self._health = health
        self._accept = accept_state
        self._uuid = vtpm_uuid
        self._seal = BlobSeal(key, vtpm_uuid)
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        self._counters: dict[str, int] = {}
        # writes whose recording failed: (SHA-256 of the data, counter, file bytes), by name
        self._unsettled: dict[str, tuple[bytes, int, bytes]] = {}

    @property
    def vtpm_uuid(self) -> uuid.UUID:
        return self._uuid

    # lifecycle -------------------------------------------------------------------------------

    def open(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = self.directory / "lock"
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(lock, flags, 0o600)
        except OSError as e:
            why = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be opened: {e}"
            raise StateError(f"lock file {lock} {why}; refusing to start") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StateError(f"lock file {lock} is not a regular file; refusing to start")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InstanceLockedError(
                f"vTPM {self.vtpm_uuid} is already running "
                f"(state directory {self.directory} is locked)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd
        for leftover in self.directory.glob(f"*{TMP_SUFFIX}"):
            log.info("removing %s left by an interrupted write", leftover.name)
            leftover.unlink()

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # helpers ---------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        if name not in BLOB_NAMES:
            raise StateError(f"unknown state blob name {name!r}")
        return self.directory / f"{name}{SUFFIX}"

    def _next_path(self, name: str) -> Path:
        return self.directory / f"{name}{NEXT_SUFFIX}"

    def _gone_path(self, name: str) -> Path:
        return self.directory / f"{name}{GONE_SUFFIX}"

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
        return os.path.lexists(self.path(name))

    def load(self, name: str, expected_digest: bytes | None = None) -> bytes | None:
        path = self.path(name)
        with self._lock:
            if self.journal is not None:
                return self._load_journaled(name, path)
            raw = self._read(path)
            if raw is None:
                return None
            if expected_digest is not None and _digest(raw) != expected_digest:
                raise self._rolled_back(path)
            return self._open(name, path, raw)

    @staticmethod
    def _read(path: Path) -> bytes | None:
        return read_blob_file(path)

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
                if self._accept:
                    return self._accepted(name, path, cur_raw)
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
            if self._accept:
                return self._accepted(name, path, cur_raw)
            raise self._unrecorded(name, path, cur_raw, none_recorded=False)
        if name != VOLATILE and not (self._accept and name != PERMANENT):
            raise StateIntegrityError(
                f"state blob {path} is missing but the Manager records it (acknowledged state "
                "lost); refusing to start, files left as they are: restore the file from a "
                "backup of the state directory"
            )
        self._discard(nxt, "a write the Manager never recorded")
        self._discard(gone, "a deletion the Manager never recorded")
        if name == VOLATILE:
            log.warning(
                "%s: the Manager records a saved volatile state but the file is missing; "
                "starting without it (the TPM needs Startup(CLEAR))",
                path,
            )
        else:
            log.warning("%s: missing, accepted as deleted (--accept-state)", path)
        self.journal.deleted(name)
        return None

    def _accepted(self, name: str, path: Path, raw: bytes) -> bytes:
        """A `.blob` file the journal does not hold, used and recorded (`--accept-state`) if
        it opens under the key; refused as any damaged blob if not."""
        assert self.journal is not None
        counter, plain = self._open_counted(name, path, raw)
        self.journal.written(name, counter, _digest(raw))
        log.warning(
            "%s: not the state the Manager recorded; accepted on purpose (--accept-state) "
            "and recorded as current",
            path,
        )
        self._discard(self._next_path(name), "a write the Manager never recorded")
        self._discard(self._gone_path(name), "superseded by the accepted state")
        return plain

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
                "the file is kept: restore the Manager's database that recorded it, move "
                "the file out of the state directory to start without it (its state is then "
                f"lost), or {accept_hint(self.vtpm_uuid)}"
            )
        return StateIntegrityError(
            f"state blob {path} does not match the recorded state (an older copy put back, "
            "or a state newer than the Manager's database); refusing to start, the file is "
            "kept: put back the blob the Manager recorded, or the Manager's database that "
            f"recorded this one, or {accept_hint(self.vtpm_uuid)}"
        )

    def _discard(self, path: Path, why: str) -> None:
        """Remove a `.next` / `.gone` leftover of an operation in flight (never a `.blob`)."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            log.info("discarding %s: %s", path.name, why)
            _fsync_dir(self.directory)

    def _open(self, name: str, path: Path, raw: bytes) -> bytes:
        return self._open_counted(name, path, raw)[1]

    def _open_counted(self, name: str, path: Path, raw: bytes) -> tuple[int, bytes]:
        try:
            counter, plain = self._seal.open(name, raw)
        except BlobOpenError as e:
            raise self._refuse(path, str(e)) from None
        self._counters[name] = max(self._counters.get(name, 0), counter)
        return counter, plain

    def store(self, name: str, data: bytes) -> BlobInfo:
        path = self.path(name)
        with self._lock:
            unsettled = self._unsettled.get(name)
            if unsettled is not None:
                counter, raw = self._retry_unsettled(name, data, unsettled)
            else:
                counter = self._next_counter(name, path)
                raw = self._seal.seal(name, counter, data)
            # a random name: a file planted under a fixed one cannot block the write
            tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}{TMP_SUFFIX}")
            digest = _digest(raw)
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
                    self._unsettled[name] = (_digest(data), counter, raw)
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
        if _digest(data) != data_digest:
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
                    raw = read_blob_file(candidate)
                except StateError:
                    continue  # refused when loaded
                found = None if raw is None else blob_counter(raw)
                if found is not None:
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
