"""A vTPM's state in one regular file or block device (`--state-file`), two slots A/B.

The byte layout is `vtpm.wire.statefile`'s: a header naming the vTPM (uuid, TPM version) and
the slot size, then two slots, each a complete image of every blob at one moment (the sealed
blobs of `vtpm.instance.stateblob`, as a state directory holds them), with a generation, a
checksum and a MAC under a key derived from the state key. The file is never renamed, never
grown once formatted, and only ever written in the slot that is not current, so it can be a
fixed-size raw volume that backups copy byte for byte.

Writing blob `name` (or deleting it) builds the whole next image, writes it to the other slot,
fsyncs, and only then makes it current: standalone at once, under a Manager once the journal
(`StateJournal`) has recorded the blob's new digest. Loading picks the current slot once, at
`open`: under a Manager the slot whose blobs carry exactly the digests the journal holds
(the newest such), standalone the newest whole slot of this vTPM. A crash at any point leaves
the old image or the new one, never a mix: a slot cut short fails its checksum and is ignored,
and the journal never records an image before it is on disk.

Refused, with one line and the file left as it is: a file that is not a vTPM state file, of
another vTPM or TPM version, shorter than its header says, with a whole slot that is not this
vTPM's (another key, or forged); under a Manager, state the journal does not record (an older
copy of the volume put back, or a Manager's database older than the state), unless started
with `accept_state` (`--accept-state`, passed once after `vtpm accept-state UUID`): then the
newest slot of this vTPM is used and every blob in it reported as written (a recorded blob it
lacks as deleted; a recorded permanent state it lacks stays refused), at WARNING.

A new or empty regular file is extended to `DEFAULT_SIZE` (4 MiB, allocated); a block device
or a file of another size keeps its size, and one too small for two slots of `MIN_SLOT` is
refused with the size needed. A blank file is formatted only where its first 4 KiB and both
slot heads are zeros: anything else is not overwritten. The file is locked (flock on its own
open file description, so a `/proc/self/fd/N` path locks too); a block device is also opened
O_EXCL, so a mounted one is refused. The path is opened as given, symlinks followed (a volume
manager's /dev/VG/LV is one); it is the Manager's or the operator's choice, not the guest's.
"""

from __future__ import annotations

import errno
import fcntl
import hmac
import logging
import os
import stat
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vtpm.engine.engine import TpmVersion
from vtpm.errors import (
    ConfigError,
    InstanceLockedError,
    LocalProtocolError,
    StateError,
    StateIntegrityError,
)
from vtpm.instance.stateblob import (
    BLOB_NAMES,
    PERMANENT,
    BlobInfo,
    BlobOpenError,
    BlobSeal,
    StateJournal,
    StoreBase,
    accept_hint,
    blob_counter,
    digest,
)
from vtpm.instance.statekey import StateKey
from vtpm.wire import statefile as layout

log = logging.getLogger(__name__)

DEFAULT_SIZE = 4 * 1024 * 1024
MIN_SIZE = layout.HEADER_REGION + layout.SLOT_COUNT * layout.MIN_SLOT
_TPM_CODES = {TpmVersion.TPM20: layout.TpmCode.TPM20, TpmVersion.TPM12: layout.TpmCode.TPM12}
_SLOT_NAMES = "AB"


@dataclass(frozen=True, slots=True)
class _Unsettled:
    """A slot written whose recording failed: the journal may or may not hold it, so both
    slots may be current; only the same operation may be retried, as the same bytes."""

    op: tuple[str, str, bytes]  # ("store", name, digest of the clear text) or ("delete", name, b"")
    index: int
    raw: bytes
    image: dict[str, bytes]
    generation: int


class StateFile(StoreBase):
    """Encrypted, atomic, locked storage of one vTPM's blobs in one file. Thread-safe."""

    def __init__(
        self,
        path: Path,
        wanted_uuid: uuid.UUID | None,
        tpm_version: TpmVersion,
        key: StateKey,
        journal: StateJournal | None = None,
        health: Callable[[bool, str], None] | None = None,
        accept_state: bool = False,
    ) -> None:
        """`wanted_uuid`: the vTPM's uuid (--uuid); None: the one in the file's header, or a
        new one for a blank file. `health`, `accept_state`: as for `StateStore`."""
        self.path = path
        self.journal = journal
        self._wanted = wanted_uuid
        self._tpm = tpm_version
        self._health = health
        self._accept = accept_state
        self._key = key
        self._uuid = wanted_uuid
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._header: layout.FileHeader | None = None
        self._seal: BlobSeal | None = None
        self._mac_key = b""
        self._image: dict[str, bytes] = {}  # the current slot's sealed blobs, by name
        self._current: int | None = None  # its index; None: no slot is current (blank state)
        self._generation = 0  # the highest generation in either slot
        self._counters: dict[str, int] = {}
        self._unsettled: _Unsettled | None = None

    @property
    def vtpm_uuid(self) -> uuid.UUID:
        if self._uuid is None:
            raise StateError(f"state file {self.path} is not open yet")
        return self._uuid

    # lifecycle -------------------------------------------------------------------------------

    def open(self) -> None:
        fd = self._open_locked()
        try:
            self._fd = fd
            self._resolve(fd)
        except BaseException:
            self._fd = None
            os.close(fd)
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open_locked(self) -> int:
        path = self.path
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise StateError(f"state file {path} cannot be used: {e.strerror}") from None
        flags = os.O_RDWR | os.O_CLOEXEC
        if st is None:
            flags |= os.O_CREAT | os.O_EXCL
        elif stat.S_ISBLK(st.st_mode):
            flags |= os.O_EXCL  # a block device: refused while mounted or opened exclusively
        elif not stat.S_ISREG(st.st_mode):
            raise StateError(
                f"state file {path} is not a regular file or block device; refusing to use it"
            )
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise InstanceLockedError(
                    f"state file {path} is a block device in use (mounted, or held by another "
                    "program); refusing to use it"
                ) from None
            raise StateError(f"state file {path} cannot be opened: {e.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise StateError(f"state file {path} is not a regular file or block device")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            who = f"vTPM {self._wanted} is" if self._wanted else "a vTPM is"
            raise InstanceLockedError(
                f"{who} already running on state file {path} (it is locked)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    # choosing the current slot ---------------------------------------------------------------

    def _size(self, fd: int) -> int:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
        return st.st_size

    def _resolve(self, fd: int) -> None:
        size = self._size(fd)
        head = self._pread(fd, min(size, layout.HEADER_REGION), 0)
        try:
            found = layout.decode_header(head.ljust(layout.HEADER.size, b"\0"))
        except layout.LayoutError as e:
            raise StateIntegrityError(
                f"state file {self.path} is not a vTPM state file, or its header is damaged "
                f"({e}); refusing to start (the file was left untouched)"
            ) from None
        if isinstance(found, layout.Empty):
            header = self._format(fd, size, head)
        else:
            header = self._check_header(found, size)
        self._header = header
        self._uuid = header.vtpm_uuid
        self._seal = BlobSeal(self._key, header.vtpm_uuid)
        hkdf = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"vtpm state file slot v1"
        )
        self._mac_key = hkdf.derive(self._key.secret)
        images = self._read_slots(fd, header)
        for _, img in images:
            self._generation = max(self._generation, img.generation)
            for name, raw in img.blobs:
                self._counters[name] = max(self._counters.get(name, 0), blob_counter(raw) or 0)
        chosen = self._choose(images)
        if chosen is not None:
            self._current, img = chosen
            self._image = dict(img.blobs)
            log.debug(
                "state file %s: slot %s current (generation %d)",
                self.path,
                _SLOT_NAMES[self._current],
                img.generation,
            )

    def _check_header(self, h: layout.FileHeader, size: int) -> layout.FileHeader:
        if self._wanted is not None and h.vtpm_uuid != self._wanted:
            raise ConfigError(
                f"{self.path} holds vTPM {h.vtpm_uuid}, not {self._wanted}; refusing to start"
            )
        if h.tpm != _TPM_CODES[self._tpm]:
            other = next(v for v, c in _TPM_CODES.items() if c == h.tpm)
            raise ConfigError(
                f"{self.path} holds a TPM {other.value}, not {self._tpm.value}; "
                f"pass --tpm {other.value}"
            )
        if size < h.file_size:
            raise StateIntegrityError(
                f"state file {self.path} is {size} bytes, its header says {h.file_size} "
                "(truncated?); refusing to start (the file was left untouched)"
            )
        return h

    def _format(self, fd: int, size: int, head: bytes) -> layout.FileHeader:
        """A header for a blank file (never for one that holds anything)."""
        if self.journal is not None and any(self.journal.expected(n) for n in BLOB_NAMES):
            raise StateIntegrityError(
                f"state file {self.path} holds no state but the Manager records some "
                "(acknowledged state lost, or the wrong file); refusing to start, the file was "
                "left untouched: restore it from a backup"
            )
        refuse = StateIntegrityError(
            f"state file {self.path} holds data that is not a vTPM state file; refusing to "
            "overwrite it"
        )
        if any(head):
            raise refuse
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        grow = regular and size == 0
        try:
            slot = layout.layout_for(DEFAULT_SIZE if grow else size)
        except layout.LayoutError as e:
            raise StateError(f"state file {self.path}: {e}") from None
        header = layout.FileHeader(
            self._wanted or uuid.uuid4(), _TPM_CODES[self._tpm], slot, layout.HEADER_REGION
        )
        if not grow:
            for i in range(layout.SLOT_COUNT):
                if any(self._pread(fd, layout.SLOT_HEAD.size, header.slot_at(i))):
                    raise refuse
        try:
            if grow:
                os.posix_fallocate(fd, 0, DEFAULT_SIZE)
            self._pwrite(fd, layout.encode_header(header), 0)
            os.fsync(fd)
        except OSError as e:
            raise StateError(f"state file {self.path} cannot be written: {e.strerror}") from None
        log.info(
            "state file %s formatted for vTPM %s: two slots of %d bytes",
            self.path,
            header.vtpm_uuid,
            slot,
        )
        return header

    def _read_slots(self, fd: int, header: layout.FileHeader) -> list[tuple[int, layout.SlotImage]]:
        images = []
        for i in range(layout.SLOT_COUNT):
            where = header.slot_at(i)
            try:
                total = layout.slot_length(
                    self._pread(fd, layout.SLOT_HEAD.size, where), header.slot_size
                )
                found = (
                    total
                    if isinstance(total, layout.Empty)
                    else layout.decode_slot(self._pread(fd, total, where), header.slot_size)
                )
            except layout.LayoutError as e:
                raise self._foreign(i, str(e)) from None
            if found is layout.TORN:
                log.info(
                    "state file %s: slot %s holds a write that did not complete; ignored",
                    self.path,
                    _SLOT_NAMES[i],
                )
                continue
            if isinstance(found, layout.Empty):
                continue
            if not hmac.compare_digest(found.mac, self._mac(found)):
                raise self._foreign(i, "MAC does not match")
            images.append((i, found))
        return images

    def _foreign(self, index: int, why: str) -> StateIntegrityError:
        log.debug("state file %s slot %s refused: %s", self.path, _SLOT_NAMES[index], why)
        return StateIntegrityError(
            f"state file {self.path} is corrupt or not this vTPM's (slot {_SLOT_NAMES[index]}); "
            "refusing to start (the file was left untouched)"
        )

    def _choose(
        self, images: list[tuple[int, layout.SlotImage]]
    ) -> tuple[int, layout.SlotImage] | None:
        newest = max(images, key=lambda x: x[1].generation, default=None)
        if self.journal is None:
            return newest
        want = {n: d for n in BLOB_NAMES if (d := self.journal.expected(n)) is not None}
        matching = [(i, img) for i, img in images if {n: digest(b) for n, b in img.blobs} == want]
        if matching:
            return max(matching, key=lambda x: x[1].generation)
        if newest is None:
            if want:  # a file formatted, its slots blank or torn, and the journal holds state
                raise StateIntegrityError(
                    f"state file {self.path} holds no state but the Manager records some "
                    "(acknowledged state lost); refusing to start, the file was left "
                    "untouched: restore it from a backup"
                )
            return None
        if self._accept:
            self._accept_image(newest[1], want)
            return newest
        raise StateIntegrityError(
            f"state file {self.path} does not hold the state the Manager records (an older copy "
            "of it put back, or a state newer than the Manager's database); refusing to start, "
            "the file is kept: put back the file the Manager recorded, or the Manager's "
            f"database that recorded this one, or {accept_hint(self.vtpm_uuid)}"
        )

    def _accept_image(self, img: layout.SlotImage, want: dict[str, bytes]) -> None:
        """`--accept-state`: the newest slot of this vTPM becomes the recorded state."""
        assert self.journal is not None
        if PERMANENT in want and img.get(PERMANENT) is None:
            raise StateIntegrityError(
                f"state file {self.path} holds no permanent state but the Manager records one "
                "(acknowledged state lost); refusing to start even with --accept-state: "
                "restore the file from a backup"
            )
        opened = [(name, self._open_blob(name, raw)[0], raw) for name, raw in img.blobs]
        for name, counter, raw in opened:
            if want.get(name) != digest(raw):
                self.journal.written(name, counter, digest(raw))
        for name in want:
            if img.get(name) is None:
                self.journal.deleted(name)
        log.warning(
            "state file %s: not the state the Manager recorded; generation %d accepted on "
            "purpose (--accept-state) and recorded as current",
            self.path,
            img.generation,
        )

    # I/O -------------------------------------------------------------------------------------

    def _pread(self, fd: int, n: int, offset: int) -> bytes:
        out = bytearray()
        try:
            while len(out) < n:
                chunk = os.pread(fd, n - len(out), offset + len(out))
                if not chunk:
                    break
                out += chunk
        except OSError as e:
            raise StateError(f"state file {self.path} cannot be read: {e.strerror}") from None
        return bytes(out)

    @staticmethod
    def _pwrite(fd: int, data: bytes, offset: int) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(fd, view, offset)
            view, offset = view[done:], offset + done

    def _mac(self, img: layout.SlotImage) -> bytes:
        return hmac.digest(self._mac_key, layout.mac_input(self.vtpm_uuid, img), "sha256")

    def _open_blob(self, name: str, raw: bytes) -> tuple[int, bytes]:
        assert self._seal is not None
        try:
            return self._seal.open(name, raw)
        except BlobOpenError as e:
            log.debug("state file %s blob %s refused: %s", self.path, name, e)
            raise StateIntegrityError(
                f"state file {self.path}: its {name} state is corrupt or not this vTPM's; "
                "refusing to start (the file was left untouched)"
            ) from None

    # operations ------------------------------------------------------------------------------

    @staticmethod
    def _check_name(name: str) -> None:
        if name not in BLOB_NAMES:
            raise StateError(f"unknown state blob name {name!r}")

    def exists(self, name: str) -> bool:
        self._check_name(name)
        with self._lock:
            return name in self._image

    def load(self, name: str) -> bytes | None:
        self._check_name(name)
        with self._lock:
            raw = self._image.get(name)
            return None if raw is None else self._open_blob(name, raw)[1]

    def store(self, name: str, data: bytes) -> BlobInfo:
        self._check_name(name)
        assert self._seal is not None
        with self._lock:
            op = ("store", name, digest(data))
            if self._unsettled is not None and self._unsettled.op == op:
                sealed = self._unsettled.image[name]
            else:
                counter = self._counters.get(name, 0) + 1
                sealed = self._seal.seal(name, counter, data)
            counter = blob_counter(sealed) or 0
            image = dict(self._image)
            image[name] = sealed
            info = BlobInfo(name, counter, digest(sealed))

            def report(journal: StateJournal) -> None:
                journal.written(name, counter, info.digest)

            self._commit(op, image, report)
            self._counters[name] = max(self._counters.get(name, 0), counter)
            return info

    def delete(self, name: str, must_exist: bool) -> bool:
        self._check_name(name)
        with self._lock:
            op = ("delete", name, b"")
            retry = self._unsettled is not None and self._unsettled.op == op
            if name not in self._image and not retry:
                if must_exist:
                    log.debug("state blob %s to delete does not exist", name)
                return False
            image = {n: b for n, b in self._image.items() if n != name}
            self._commit(op, image, lambda journal: journal.deleted(name))
            return True

    def _commit(
        self,
        op: tuple[str, str, bytes],
        image: dict[str, bytes],
        report: Callable[[StateJournal], None],
    ) -> None:
        """Write `image` to the slot that is not current, fsync, have the journal record it,
        then make it current. Retrying an unsettled operation rewrites its very bytes."""
        assert self._fd is not None and self._header is not None
        pending = self._unsettled
        if pending is not None and pending.op != op:
            raise StateError(
                f"state file {self.path} cannot be written: an earlier write may or may not "
                "have been recorded by the Manager; restart the vTPM to settle it"
            )
        if pending is not None:
            index, raw, generation, image = (
                pending.index,
                pending.raw,
                pending.generation,
                pending.image,
            )
        else:
            index = 0 if self._current is None else 1 - self._current
            generation = self._generation + 1
            raw = self._encode(image, generation)
        try:  # a failed write leaves the current slot as it is; the write can be retried
            self._pwrite(self._fd, raw, self._header.slot_at(index))
            os.fdatasync(self._fd)
        except OSError as e:
            raise StateError(f"state file {self.path} cannot be written: {e.strerror}") from None
        if self.journal is not None:
            try:
                report(self.journal)
            except BaseException:
                self._unsettled = _Unsettled(op, index, raw, image, generation)
                raise
        self._unsettled = None
        self._current, self._image = index, image
        self._generation = max(self._generation, generation)

    def _encode(self, image: dict[str, bytes], generation: int) -> bytes:
        assert self._header is not None
        order = {n: i for i, n in enumerate(BLOB_NAMES)}
        blobs = tuple(sorted(image.items(), key=lambda kv: order.get(kv[0], len(order))))
        unsigned = layout.SlotImage(generation, blobs)
        signed = layout.SlotImage(generation, blobs, self._mac(unsigned))
        try:
            return layout.encode_slot(signed, self._header.slot_size)
        except LocalProtocolError:
            need = len(layout.encode_slot(signed, layout.MAX_SLOT))
            raise StateError(
                f"state file {self.path} is too small for this vTPM's state: a slot needs "
                f"{need} bytes, its slots hold {self._header.slot_size} (use a file or device "
                f"of at least {layout.HEADER_REGION + layout.SLOT_COUNT * need} bytes)"
            ) from None

    # counters, for sealed transfer blobs (`vtpm.instance.transfer`) --------------------------

    def counter(self, name: str) -> int:
        """The write counter of blob `name`'s latest version in either slot (0: never)."""
        self._check_name(name)
        with self._lock:
            return self._counters.get(name, 0)

    def raise_counter(self, name: str, floor: int) -> None:
        """Make the next write of `name` carry a counter above `floor`."""
        self._check_name(name)
        with self._lock:
            self._counters[name] = max(self._counters.get(name, 0), floor)
