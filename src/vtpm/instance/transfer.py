"""Sealed transfer blobs: the only form in which a vTPM's state leaves or enters it through
the control channel (CMD_GET_STATEBLOB / CMD_SET_STATEBLOB: QEMU's migration, save/restore).

A codec, no I/O. Format (all integers big-endian):

    offset  size  field
    0       8     magic "VTPMXFR1"
    8       4     format version (1)
    12      16    vTPM uuid (RFC 4122 bytes)
    28      4     blob type: 1 permanent, 2 volatile, 4 savestate (libtpms' TPMLIB_StateType)
    32      8     generation: the write counter of the vTPM's permanent blob at export
    40      12    nonce (random)
    52      ...   AES-256-GCM ciphertext of the libtpms blob, then its 16-byte tag

The authenticated data is the whole 52-byte header, so a blob whose uuid, type, generation (or
anything else) was changed does not open. The GCM key is HKDF-SHA256(state key, no salt,
info = "vtpm transfer blob v1"): a key of its own, separate from the one that seals blobs on
disk (`statestore`), known only to a process that holds the vTPM's state key. Under a Manager
that is the vTPM's own instance (the Manager releases the state key to it alone, wrapped
under the group key), so no other vTPM and no other Manager can open or forge them.

A migration secret (`--migration-secret-fd`: 1..4096 bytes an orchestrator hands the source
and the destination of one migration) is mixed in: the key is then HKDF-SHA256(state key,
salt = the secret, info = "vtpm transfer blob v1 with migration secret"). A blob sealed with
secret X opens only in a process given X: not with another secret, and not without one (the
info strings differ, so no secret, not even HKDF's default all-zero salt, stands for "none").
The secret is never logged and not kept once the key is derived.

The generation is the permanent state's counter for every blob type: a volatile state taken
from a running TPM has no write counter of its own, and it only makes sense together with the
permanent state it was taken with. Whoever opens a blob decides what an acceptable generation
is (the device refuses one older than its current permanent state: a rollback).
"""

from __future__ import annotations

import logging
import secrets
import struct
import uuid
from dataclasses import dataclass, field
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vtpm.engine.engine import StateType
from vtpm.errors import RequestError
from vtpm.instance.statekey import StateKey

log = logging.getLogger(__name__)

MAGIC = b"VTPMXFR1"
FORMAT_VERSION = 1
HKDF_INFO = b"vtpm transfer blob v1"
HKDF_INFO_SECRET = b"vtpm transfer blob v1 with migration secret"
MAX_SECRET = 4096  # bytes of a migration secret
HEADER = struct.Struct(">8sI16sIQ12s")
TAG_SIZE = 16
MAX_GENERATION = (1 << 64) - 1

# what a peer learns when a blob does not open, whatever the reason
REFUSED = "the state blob is not a sealed state blob of this vTPM"


@dataclass(frozen=True, slots=True)
class TransferBlob:
    """One state blob with what its seal binds to it."""

    vtpm_uuid: uuid.UUID
    state_type: StateType
    generation: int
    data: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.generation <= MAX_GENERATION:
            raise RequestError(f"generation {self.generation} is out of range")


class TransferKey:
    """Seals and opens transfer blobs for holders of one state key (and migration secret)."""

    def __init__(self, state_key: StateKey, migration_secret: bytes | None = None) -> None:
        if migration_secret is None:
            hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO)
        else:
            if not 1 <= len(migration_secret) <= MAX_SECRET:
                raise RequestError(f"a migration secret has 1..{MAX_SECRET} bytes")
            hkdf = HKDF(
                algorithm=hashes.SHA256(), length=32, salt=migration_secret, info=HKDF_INFO_SECRET
            )
        self._aead = AESGCM(hkdf.derive(state_key.secret))

    def seal(self, blob: TransferBlob) -> bytes:
        header = HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            blob.vtpm_uuid.bytes,
            int(blob.state_type),
            blob.generation,
            secrets.token_bytes(12),
        )
        return header + self._aead.encrypt(header[-12:], blob.data, header)

    def open(self, raw: bytes, vtpm_uuid: uuid.UUID, state_type: StateType) -> TransferBlob:
        """The blob in `raw` if it is a sealed `state_type` blob of vTPM `vtpm_uuid`; else a
        RequestError that does not say which check failed (the reason is logged at debug)."""
        if len(raw) < HEADER.size + TAG_SIZE:
            raise _refused(f"only {len(raw)} bytes")
        magic, version, raw_uuid, kind, generation, nonce = HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise _refused("bad magic")
        if version != FORMAT_VERSION:
            raise _refused(f"format version {version}")
        if raw_uuid != vtpm_uuid.bytes:
            raise _refused(f"sealed for vTPM {uuid.UUID(bytes=raw_uuid)}")
        if kind != int(state_type):
            raise _refused(f"a blob of type {kind}, not {int(state_type)}")
        try:
            data = self._aead.decrypt(nonce, raw[HEADER.size :], raw[: HEADER.size])
        except InvalidTag:
            raise _refused("authentication failed (another key, or altered)") from None
        return TransferBlob(vtpm_uuid, state_type, generation, data)


class Generations(Protocol):
    """Write counters of the stored blobs (the instance's `StateStore`)."""

    def counter(self, name: str) -> int: ...

    def raise_counter(self, name: str, floor: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Transfer:
    """What a device needs to let state leave and enter it sealed (`Device.export_state`)."""

    key: TransferKey
    vtpm_uuid: uuid.UUID
    generations: Generations
    plaintext_export: bool = False  # a standalone instance's --export-plaintext-state


@dataclass(frozen=True, slots=True)
class ExportedBlob:
    data: bytes = field(repr=False)
    sealed: bool


def _refused(why: str) -> RequestError:
    log.debug("transfer blob refused: %s", why)
    return RequestError(REFUSED)
