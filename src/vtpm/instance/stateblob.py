"""What both state stores share: the sealed blob, the journal, and the store's interface.

A sealed state blob (the content of `<name>.blob` in a state directory, and of each entry of a
state file's slot):

    magic "VTPMBLB1" | u32 format version (1) | u64 write counter | 12-byte nonce | ciphertext+tag

The GCM key is HKDF-SHA256(state key, info = "vtpm state blob v1"), so the raw state key is
used for one purpose only. The authenticated data is magic | version | name | vTPM uuid |
counter: a blob renamed, copied to another vTPM, or with its counter edited fails to open. Its
digest (SHA-256 of the sealed bytes, new nonce and counter each write) is what the Manager's
journal records: it names one version of one blob.

`BlobStore` is what the instance needs of a store: the device's NVRAM (load / store / delete /
exists, health), the transfer counters (`counter`, `raise_counter`), and its lifecycle. The
directory store (`vtpm.instance.statestore`) and the single-file store
(`vtpm.instance.statefile`) satisfy it.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vtpm.errors import StateIntegrityError
from vtpm.instance.statekey import StateKey

log = logging.getLogger(__name__)

VOLATILE = "volatilestate"
PERMANENT = "permall"
BLOB_NAMES = ("permall", "volatilestate", "savestate")
MAGIC = b"VTPMBLB1"
FORMAT_VERSION = 1
HEADER = struct.Struct(">8sIQ12s")
TAG_SIZE = 16


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
    digest: bytes  # SHA-256 of the sealed blob as written


class BlobStore(Protocol):
    """A vTPM's encrypted, journaled, locked state, as the instance uses it."""

    @property
    def vtpm_uuid(self) -> uuid.UUID: ...

    def open(self) -> None: ...

    def close(self) -> None: ...

    def load(self, name: str) -> bytes | None: ...

    def store(self, name: str, data: bytes) -> BlobInfo: ...

    def delete(self, name: str, must_exist: bool) -> bool: ...

    def exists(self, name: str) -> bool: ...

    def tpm_health(self, failed: bool, reason: str) -> None: ...

    def counter(self, name: str) -> int: ...

    def raise_counter(self, name: str, floor: int) -> None: ...


class StoreBase:
    """What both stores (`StateStore`, `StateFile`) do alike around their own work: the
    context-manager form of `open`/`close`, and the engine's health reports passed on to the
    `health` callback they were given, if any."""

    _health: Callable[[bool, str], None] | None

    def open(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tpm_health(self, failed: bool, reason: str) -> None:
        """`vtpm.engine.engine.HealthListener`: passed on to the `health` callback, if any."""
        if self._health is not None:
            self._health(failed, reason)


def digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def blob_counter(raw: bytes) -> int | None:
    """The write counter in a sealed blob's header (unauthenticated), None if it has none."""
    if len(raw) < HEADER.size or raw[: len(MAGIC)] != MAGIC:
        return None
    return int(HEADER.unpack_from(raw)[2])


def accept_hint(vtpm_uuid: uuid.UUID) -> str:
    """The end of every refusal of authentic state the Manager does not record."""
    return f"run `vtpm accept-state {vtpm_uuid}` to accept this state on purpose"


class BlobOpenError(StateIntegrityError):
    """A sealed blob that does not open; the message says why, for the debug log only."""


class BlobSeal:
    """Seals and opens one vTPM's state blobs under its state key."""

    def __init__(self, key: StateKey, vtpm_uuid: uuid.UUID) -> None:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"vtpm state blob v1")
        self._aead = AESGCM(hkdf.derive(key.secret))
        self.vtpm_uuid = vtpm_uuid

    def _aad(self, name: str, counter: int) -> bytes:
        return (
            MAGIC
            + struct.pack(">I", FORMAT_VERSION)
            + name.encode()
            + b"\0"
            + self.vtpm_uuid.bytes
            + struct.pack(">Q", counter)
        )

    def seal(self, name: str, counter: int, data: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        body = self._aead.encrypt(nonce, data, self._aad(name, counter))
        return HEADER.pack(MAGIC, FORMAT_VERSION, counter, nonce) + body

    def open(self, name: str, raw: bytes) -> tuple[int, bytes]:
        """(counter, clear text) of a sealed blob `name`; BlobOpenError if it does not open (the
        caller turns that into its own message: the reason is for the debug log only)."""
        refuse = BlobOpenError
        if len(raw) < HEADER.size + TAG_SIZE:
            raise refuse(f"only {len(raw)} bytes")
        magic, version, counter, nonce = HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise refuse("bad magic")
        if version != FORMAT_VERSION:
            raise refuse(f"format version {version}")
        try:
            plain = self._aead.decrypt(nonce, raw[HEADER.size :], self._aad(name, counter))
        except InvalidTag:
            raise refuse("authentication failed") from None
        return int(counter), plain
