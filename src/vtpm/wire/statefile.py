"""The byte layout of a single-file vTPM state store (`vtpm.instance.statefile`), sans I/O.

One regular file or block device holds all of a vTPM's state blobs; it is never renamed and
may be of a fixed size. It starts with a file header and has two slots, A and B, each a
complete image of every blob at one moment:

    offset 0            file header (HEADER.size bytes, then zeros up to `slot_offset`)
    slot_offset         slot A (`slot_size` bytes)
    slot_offset + size  slot B (`slot_size` bytes)

File header (big-endian):

    magic "VTPMSTAT" | u16 version (1) | u16 slot count (2) | u8 TPM version (0x20: 2.0,
    0x12: 1.2) | 3 zero bytes | 16-byte vTPM uuid | u64 slot_offset | u64 slot_size |
    SHA-256 of the preceding bytes

Slot (big-endian; the rest of the slot after `length` bytes is ignored):

    magic "VTPMSLOT" | u16 version (1) | u16 blob count | u32 length of the entries | u64
    generation | SHA-256 checksum | entries | 32-byte MAC

    entry: u8 name length | name (ASCII a-z) | u32 blob length | blob (a sealed state blob)

The checksum is SHA-256 over the slot's fields before it, its entries and its MAC: it tells a
slot whose write was interrupted (`TORN`: the bytes on disk are partly old, partly new) from one
that is whole. The MAC (HMAC-SHA256 under a key derived from the state key, over `mac_input`:
the file's uuid and the slot without checksum and MAC) tells a whole slot of this vTPM from one
written under another key or forged; this module computes neither key nor MAC, it lays out the
bytes the caller signs. A slot that is all zeros where its header would be was never written
(`BLANK`).

Rules: decoding takes the bytes and a bound, never reads past them, and raises `LayoutError`
(a `StateIntegrityError`) with the reason for every malformed field: a short buffer, a wrong
magic or version, nonzero padding, an impossible size, a bad header checksum, duplicate or
malformed names, entries that do not add up to the length. Encoding refuses values the layout
cannot carry (`LocalProtocolError`).
"""

from __future__ import annotations

import enum
import hashlib
import struct
import uuid
from dataclasses import dataclass
from typing import Final

from vtpm.errors import LocalProtocolError, StateIntegrityError

FILE_MAGIC = b"VTPMSTAT"
SLOT_MAGIC = b"VTPMSLOT"
VERSION = 1
SLOT_COUNT = 2
HEADER = struct.Struct(">8sHHB3s16sQQ32s")
SLOT_HEAD = struct.Struct(">8sHHIQ32s")
_SLOT_SIGNED = struct.Struct(">8sHHIQ")  # the slot head without its checksum
MAC_SIZE = 32
ALIGN = 4096
HEADER_REGION = ALIGN  # slot A starts here in files this version formats
MIN_SLOT = 256 * 1024  # room for libtpms' largest permanent + volatile state, with margin
MAX_SLOT = 16 * 1024 * 1024  # a larger device still gets slots of this size
MAX_BLOBS = 8
MAX_NAME = 32
MAC_CONTEXT = b"vtpm state file slot v1\0"
_ZERO_DIGEST = bytes(32)


class LayoutError(StateIntegrityError):
    """Bytes that are not a valid header or slot of this layout (the reason is the message)."""


class TpmCode(enum.IntEnum):
    """The TPM version of the vTPM the file belongs to."""

    TPM12 = 0x12
    TPM20 = 0x20


class Empty(enum.Enum):
    """What a region holds when it holds no header or image."""

    BLANK = "blank"  # all zeros: never written
    TORN = "torn"  # a write that did not complete (or damage): its checksum does not match


BLANK: Final = Empty.BLANK
TORN: Final = Empty.TORN


@dataclass(frozen=True, slots=True)
class FileHeader:
    vtpm_uuid: uuid.UUID
    tpm: TpmCode
    slot_size: int
    slot_offset: int = HEADER_REGION

    def __post_init__(self) -> None:
        if not MIN_SLOT <= self.slot_size <= MAX_SLOT or self.slot_size % ALIGN:
            raise LocalProtocolError(f"slot size {self.slot_size} is not allowed")
        if self.slot_offset < HEADER.size or self.slot_offset % ALIGN:
            raise LocalProtocolError(f"slot offset {self.slot_offset} is not allowed")

    @property
    def file_size(self) -> int:
        """The least size of a file (or device) with this header."""
        return self.slot_offset + SLOT_COUNT * self.slot_size

    def slot_at(self, index: int) -> int:
        if index not in range(SLOT_COUNT):
            raise LocalProtocolError(f"slot {index} does not exist")
        return self.slot_offset + index * self.slot_size


@dataclass(frozen=True, slots=True)
class SlotImage:
    """One slot's content: a generation and the sealed blobs by name (no duplicates)."""

    generation: int
    blobs: tuple[tuple[str, bytes], ...]
    mac: bytes = _ZERO_DIGEST

    def __post_init__(self) -> None:
        if not 0 <= self.generation < 1 << 64:
            raise LocalProtocolError(f"generation {self.generation} is not a u64")
        if len(self.blobs) > MAX_BLOBS:
            raise LocalProtocolError(f"{len(self.blobs)} blobs in one slot")
        names = [n for n, _ in self.blobs]
        if len(set(names)) != len(names):
            raise LocalProtocolError(f"duplicate blob names {names}")
        for name, _blob in self.blobs:
            if not _valid_name(name.encode("ascii", "replace")):
                raise LocalProtocolError(f"blob name {name!r} is not allowed")
        if len(self.mac) != MAC_SIZE:
            raise LocalProtocolError(f"MAC of {len(self.mac)} bytes")

    def get(self, name: str) -> bytes | None:
        for n, blob in self.blobs:
            if n == name:
                return blob
        return None

    @property
    def names(self) -> frozenset[str]:
        return frozenset(n for n, _ in self.blobs)


def _valid_name(raw: bytes) -> bool:
    return 0 < len(raw) <= MAX_NAME and all(0x61 <= c <= 0x7A for c in raw)


# file header -------------------------------------------------------------------------------


def encode_header(h: FileHeader) -> bytes:
    body = HEADER.pack(
        FILE_MAGIC,
        VERSION,
        SLOT_COUNT,
        h.tpm,
        bytes(3),
        h.vtpm_uuid.bytes,
        h.slot_offset,
        h.slot_size,
        _ZERO_DIGEST,
    )[: -len(_ZERO_DIGEST)]
    return body + hashlib.sha256(body).digest()


def decode_header(raw: bytes) -> FileHeader | Empty:
    """The header at the start of `raw`; BLANK if that region is all zeros."""
    if len(raw) < HEADER.size:
        raise LayoutError(f"header: {len(raw)} bytes, {HEADER.size} needed")
    head = raw[: HEADER.size]
    if not any(head):
        return BLANK
    magic, version, count, tpm, pad, raw_uuid, offset, size, digest = HEADER.unpack(head)
    if magic != FILE_MAGIC:
        raise LayoutError("header: not a vTPM state file (bad magic)")
    if hashlib.sha256(head[: -len(digest)]).digest() != digest:
        raise LayoutError("header: checksum does not match")
    if version != VERSION:
        raise LayoutError(f"header: format version {version}, this program reads {VERSION}")
    if count != SLOT_COUNT:
        raise LayoutError(f"header: {count} slots, {SLOT_COUNT} expected")
    if pad != bytes(3):
        raise LayoutError("header: nonzero padding")
    try:
        code = TpmCode(tpm)
        return FileHeader(uuid.UUID(bytes=raw_uuid), code, size, offset)
    except ValueError as e:  # an unknown TPM code; LocalProtocolError for the sizes
        raise LayoutError(f"header: {e}") from None
    except LocalProtocolError as e:
        raise LayoutError(f"header: {e}") from None


# slots -------------------------------------------------------------------------------------


def _entries(image: SlotImage) -> bytes:
    out = bytearray()
    for name, blob in image.blobs:
        raw_name = name.encode("ascii")
        out += struct.pack(">B", len(raw_name)) + raw_name + struct.pack(">I", len(blob)) + blob
    return bytes(out)


def _signed_head(image: SlotImage, length: int) -> bytes:
    return _SLOT_SIGNED.pack(SLOT_MAGIC, VERSION, len(image.blobs), length, image.generation)


def mac_input(vtpm_uuid: uuid.UUID, image: SlotImage) -> bytes:
    """The bytes the slot's MAC covers: context, the file's uuid, the slot head (without its
    checksum) and the entries."""
    entries = _entries(image)
    return MAC_CONTEXT + vtpm_uuid.bytes + _signed_head(image, len(entries)) + entries


def encode_slot(image: SlotImage, slot_size: int) -> bytes:
    """The slot's bytes (shorter than `slot_size`; the rest of the slot is left as it is)."""
    entries = _entries(image)
    signed = _signed_head(image, len(entries))
    checksum = hashlib.sha256(signed + entries + image.mac).digest()
    raw = signed + checksum + entries + image.mac
    if len(raw) > slot_size:
        raise LocalProtocolError(f"a slot image of {len(raw)} bytes, the slot holds {slot_size}")
    return raw


def slot_length(head: bytes, slot_size: int) -> int | Empty:
    """From a slot's first SLOT_HEAD.size bytes: how many bytes the whole slot image takes
    (read that many, then `decode_slot`), or BLANK / TORN."""
    if len(head) < SLOT_HEAD.size:
        raise LayoutError(f"slot: {len(head)} bytes, {SLOT_HEAD.size} needed")
    head = head[: SLOT_HEAD.size]
    if not any(head):
        return BLANK
    magic, version, _count, length, _gen, _digest = SLOT_HEAD.unpack(head)
    total = SLOT_HEAD.size + int(length) + MAC_SIZE
    if magic != SLOT_MAGIC or version != VERSION or total > slot_size:
        return TORN  # never written whole by this program: a write cut short, or damage
    return total


def decode_slot(raw: bytes, slot_size: int) -> SlotImage | Empty:
    """The image at the start of `raw` (at least `slot_length` bytes of it); BLANK or TORN.
    A slot whose checksum matches but whose content is malformed raises LayoutError."""
    total = slot_length(raw, slot_size)
    if isinstance(total, Empty):
        return total
    if len(raw) < total:
        raise LayoutError(f"slot: {len(raw)} bytes of an image of {total}")
    _magic, _version, count, length, generation, digest = SLOT_HEAD.unpack_from(raw)
    entries = raw[SLOT_HEAD.size : SLOT_HEAD.size + length]
    mac = raw[SLOT_HEAD.size + length : total]
    signed = raw[: _SLOT_SIGNED.size]
    if hashlib.sha256(signed + entries + mac).digest() != digest:
        return TORN
    blobs = _decode_entries(entries, count)
    try:
        return SlotImage(generation, blobs, mac)
    except LocalProtocolError as e:
        raise LayoutError(f"slot: {e}") from None


def _decode_entries(entries: bytes, count: int) -> tuple[tuple[str, bytes], ...]:
    if count > MAX_BLOBS:
        raise LayoutError(f"slot: {count} blobs")
    blobs: list[tuple[str, bytes]] = []
    pos = 0
    for _ in range(count):
        if pos + 1 > len(entries):
            raise LayoutError("slot: entries end inside a name length")
        n = entries[pos]
        raw_name = entries[pos + 1 : pos + 1 + n]
        if len(raw_name) != n or not _valid_name(raw_name):
            raise LayoutError("slot: a malformed blob name")
        pos += 1 + n
        if pos + 4 > len(entries):
            raise LayoutError("slot: entries end inside a blob length")
        (size,) = struct.unpack_from(">I", entries, pos)
        pos += 4
        if pos + size > len(entries):
            raise LayoutError(f"slot: a blob of {size} bytes overruns the entries")
        blobs.append((raw_name.decode("ascii"), entries[pos : pos + size]))
        pos += size
    if pos != len(entries):
        raise LayoutError(f"slot: {len(entries) - pos} bytes after the last entry")
    return tuple(blobs)


def layout_for(size: int) -> int:
    """The slot size this version formats a file or device of `size` bytes with; LayoutError
    naming the least size when it is too small."""
    slot = min((size - HEADER_REGION) // SLOT_COUNT // ALIGN * ALIGN, MAX_SLOT)
    if slot < MIN_SLOT:
        raise LayoutError(
            f"{size} bytes is too small for a vTPM state file: at least "
            f"{HEADER_REGION + SLOT_COUNT * MIN_SLOT} bytes are needed"
        )
    return slot
