"""PCR selections and values as the Manager IPC carries them (`vtpm.wire.ipc`, which documents
the layout: a u32 mask of PCRs 0..23; u16 bank | u8 n | n x (u8 index | digest)). Peer bytes
raise only RemoteProtocolError here."""

from __future__ import annotations

import struct

from vtpm.errors import RemoteProtocolError
from vtpm.tpm.constants import DIGEST_SIZES


def mask(pcrs: tuple[int, ...]) -> int:
    return sum(1 << i for i in pcrs)


def unmask(mask: int, what: str) -> tuple[int, ...]:
    if mask >> 24:
        raise RemoteProtocolError(f"{what} selects PCRs above 23")
    return tuple(i for i in range(24) if mask >> i & 1)


def values_bytes(bank: int, pcrs: tuple[tuple[int, bytes], ...]) -> bytes:
    return struct.pack(">HB", bank, len(pcrs)) + b"".join(bytes([i]) + d for i, d in pcrs)


def take_values(body: bytes, pos: int, what: str) -> tuple[int, tuple[tuple[int, bytes], ...]]:
    if pos + 3 > len(body):
        raise RemoteProtocolError(f"{what} ends before its PCR values")
    bank, count = struct.unpack_from(">HB", body, pos)
    size = DIGEST_SIZES.get(bank)
    if size is None:
        raise RemoteProtocolError(f"{what}: unknown PCR bank {bank:#06x}")
    pos += 3
    if pos + count * (1 + size) != len(body):
        raise RemoteProtocolError(f"{what}: {count} PCR values do not fill the body")
    values = tuple(
        (body[pos + k * (1 + size)], body[pos + k * (1 + size) + 1 : pos + (k + 1) * (1 + size)])
        for k in range(count)
    )
    return bank, values
