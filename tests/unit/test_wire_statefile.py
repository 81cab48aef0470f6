"""The single-file state layout (wire/statefile.py): both directions, every truncation and
corruption refused cleanly (LayoutError, or TORN where a write cut short looks like that)."""

from __future__ import annotations

import hashlib
import struct
import uuid

import pytest

from vtpm.errors import LocalProtocolError, StateIntegrityError
from vtpm.wire import statefile as sf

UID = uuid.UUID("12345678-1234-5678-1234-567812345678")
SLOT = sf.MIN_SLOT
HEAD = sf.FileHeader(UID, sf.TpmCode.TPM20, SLOT)
IMAGE = sf.SlotImage(7, (("permall", b"P" * 100), ("savestate", b"S" * 3)), b"M" * 32)


def test_header_round_trip_and_exact_bytes() -> None:
    raw = sf.encode_header(HEAD)
    assert len(raw) == sf.HEADER.size
    body = (
        b"VTPMSTAT"
        + struct.pack(">HHB", 1, 2, 0x20)
        + bytes(3)
        + UID.bytes
        + struct.pack(">QQ", 4096, SLOT)
    )
    assert raw == body + hashlib.sha256(body).digest()
    assert sf.decode_header(raw) == HEAD
    assert sf.decode_header(raw + b"trailing bytes are the rest of the region") == HEAD
    assert sf.decode_header(bytes(4096)) is sf.BLANK
    assert HEAD.file_size == 4096 + 2 * SLOT and HEAD.slot_at(1) == 4096 + SLOT


def test_every_header_truncation_and_bit_flip_is_refused() -> None:
    raw = sf.encode_header(HEAD)
    for n in range(len(raw)):
        with pytest.raises(sf.LayoutError):
            sf.decode_header(raw[:n])
    for pos in range(len(raw)):
        for bit in (0x01, 0x80):
            bad = bytearray(raw)
            bad[pos] ^= bit
            with pytest.raises(sf.LayoutError):
                sf.decode_header(bytes(bad))


def _rechecksum(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        (1, 2, "format version 2"),
        (2, 3, "3 slots"),
        (3, 0x30, "header"),
        (4, b"\0\0\1", "padding"),
        (6, 100, "slot offset"),
        (7, 1000, "slot size"),
        (7, sf.MAX_SLOT + sf.ALIGN, "slot size"),
    ],
)
def test_a_header_with_a_valid_checksum_but_bad_fields_is_refused(
    field: int, value: object, why: str
) -> None:
    values = list(sf.HEADER.unpack(sf.encode_header(HEAD)))
    values[field] = value
    raw = _rechecksum(sf.HEADER.pack(*values)[:-32])
    with pytest.raises(sf.LayoutError, match=why):
        sf.decode_header(raw)


def test_not_a_state_file() -> None:
    with pytest.raises(sf.LayoutError, match="not a vTPM state file"):
        sf.decode_header(b"\x7fELF" + bytes(200))
    assert issubclass(sf.LayoutError, StateIntegrityError)


def test_slot_round_trip_and_layout() -> None:
    raw = sf.encode_slot(IMAGE, SLOT)
    assert raw[:8] == b"VTPMSLOT"
    entries = b"\x07permall" + struct.pack(">I", 100) + b"P" * 100
    entries += b"\x09savestate" + struct.pack(">I", 3) + b"SSS"
    signed = b"VTPMSLOT" + struct.pack(">HHIQ", 1, 2, len(entries), 7)
    assert (
        raw == signed + hashlib.sha256(signed + entries + b"M" * 32).digest() + entries + b"M" * 32
    )
    assert sf.slot_length(raw[: sf.SLOT_HEAD.size], SLOT) == len(raw)
    assert sf.decode_slot(raw, SLOT) == IMAGE
    assert sf.decode_slot(raw + b"old bytes of an older image", SLOT) == IMAGE
    assert IMAGE.get("permall") == b"P" * 100 and IMAGE.get("volatilestate") is None
    assert sf.decode_slot(bytes(SLOT), SLOT) is sf.BLANK
    empty = sf.SlotImage(1, ())
    assert sf.decode_slot(sf.encode_slot(empty, SLOT), SLOT) == empty
    mac_in = sf.mac_input(UID, IMAGE)
    assert mac_in == sf.MAC_CONTEXT + UID.bytes + signed + entries
    assert sf.mac_input(uuid.uuid4(), IMAGE) != mac_in


def test_every_slot_truncation_and_bit_flip_is_refused() -> None:
    """A torn write looks like a slot cut short over older bytes, or one with bytes changed:
    each is TORN (ignored) or, for a buffer too short to hold what its head says, an error;
    never an image."""
    raw = sf.encode_slot(IMAGE, SLOT)
    for n in range(len(raw)):
        try:
            got = sf.decode_slot(raw[:n], SLOT)
        except sf.LayoutError:
            continue
        assert got is sf.TORN, n
        older = raw[:n] + bytes(len(raw) - n)  # the rest of the slot as zeros
        assert sf.decode_slot(older, SLOT) is sf.TORN
    for pos in range(len(raw)):
        bad = bytearray(raw)
        bad[pos] ^= 0x04
        try:
            got = sf.decode_slot(bytes(bad) + bytes(64), SLOT)
        except sf.LayoutError:
            continue
        assert got is sf.TORN, pos


def _slot_with_entries(entries: bytes, count: int) -> bytes:
    mac = bytes(32)
    signed = b"VTPMSLOT" + struct.pack(">HHIQ", 1, count, len(entries), 1)
    return signed + hashlib.sha256(signed + entries + mac).digest() + entries + mac


@pytest.mark.parametrize(
    ("entries", "count", "why"),
    [
        (b"", 1, "inside a name length"),
        (b"\x00" + struct.pack(">I", 0), 1, "malformed blob name"),
        (b"\x03ABC" + struct.pack(">I", 0), 1, "malformed blob name"),
        (b"\x05perm", 1, "malformed blob name"),
        (b"\x04perm\x00\x00", 1, "inside a blob length"),
        (b"\x04perm" + struct.pack(">I", 9) + b"x", 1, "overruns"),
        (b"\x04perm" + struct.pack(">I", 1) + b"xy", 1, "after the last entry"),
        ((b"\x04perm" + struct.pack(">I", 1) + b"x") * 2, 2, "duplicate"),
        (b"", 9, "9 blobs"),
    ],
)
def test_a_whole_slot_with_malformed_entries_is_refused(
    entries: bytes, count: int, why: str
) -> None:
    with pytest.raises(sf.LayoutError, match=why):
        sf.decode_slot(_slot_with_entries(entries, count), SLOT)


def test_a_slot_longer_than_its_slot_is_torn() -> None:
    raw = sf.encode_slot(IMAGE, SLOT)
    assert sf.decode_slot(raw, len(raw) - 1) is sf.TORN


def test_encoding_refuses_what_the_layout_cannot_carry() -> None:
    for bad in (
        lambda: sf.SlotImage(-1, ()),
        lambda: sf.SlotImage(1 << 64, ()),
        lambda: sf.SlotImage(1, (("permall", b""), ("permall", b""))),
        lambda: sf.SlotImage(1, (("Perm", b""),)),
        lambda: sf.SlotImage(1, (("é", b""),)),
        lambda: sf.SlotImage(1, (), b"short"),
        lambda: sf.FileHeader(UID, sf.TpmCode.TPM20, SLOT + 1),
        lambda: sf.FileHeader(UID, sf.TpmCode.TPM20, sf.MIN_SLOT - sf.ALIGN),
        lambda: sf.FileHeader(UID, sf.TpmCode.TPM20, SLOT, 12),
        lambda: HEAD.slot_at(2),
        lambda: sf.encode_slot(sf.SlotImage(1, (("permall", bytes(SLOT)),)), SLOT),
    ):
        with pytest.raises(LocalProtocolError):
            bad()


def test_layout_for_sizes() -> None:
    assert sf.layout_for(4 * 1024 * 1024) == (4 * 1024 * 1024 - 4096) // 2 // 4096 * 4096
    assert sf.layout_for(1 << 40) == sf.MAX_SLOT
    least = sf.HEADER_REGION + 2 * sf.MIN_SLOT
    assert sf.layout_for(least) == sf.MIN_SLOT
    with pytest.raises(sf.LayoutError, match=f"at least {least} bytes"):
        sf.layout_for(least - 1)
