"""Pieces every sans-IO codec in `wire/` shares.

A codec is driven like this (the h11 pattern):

    conn.receive_data(data)      # bytes read from the peer; b"" means the peer closed
    ev = conn.next_event()       # an event, NEED_DATA, or CLOSED
    out = conn.send(reply)       # bytes to write to the peer

Codecs never touch sockets, clocks or configuration. Malformed peer input raises
`RemoteProtocolError` at the point where the bytes are parsed, and nowhere else.
"""

from __future__ import annotations

import enum
import struct
from typing import Final

from vtpm.errors import RemoteProtocolError


class Sentinel(enum.Enum):
    """Non-event results of `next_event`."""

    NEED_DATA = "need-data"
    CLOSED = "closed"


NEED_DATA: Final = Sentinel.NEED_DATA
CLOSED: Final = Sentinel.CLOSED


class ReceiveBuffer:
    """Bytes received from a peer and not yet consumed, bounded by `limit`.

    The common case, one read holding exactly one message, costs no copy: a lone chunk is
    kept as the `bytes` it arrived in and handed back whole by `take`.
    """

    __slots__ = ("_buf", "_limit", "eof")

    def __init__(self, limit: int) -> None:
        self._buf: bytes | bytearray = b""
        self._limit = limit
        self.eof = False

    def feed(self, data: bytes) -> None:
        if self.eof:
            if data:
                raise RemoteProtocolError("data received after end of stream")
            return
        if not data:
            self.eof = True
            return
        if not self._buf:
            self._buf = bytes(data)
        elif isinstance(self._buf, bytearray):
            self._buf += data
        else:
            self._buf = bytearray(self._buf) + data
        if len(self._buf) > self._limit:
            raise RemoteProtocolError(
                f"peer sent more than {self._limit} bytes without a complete message"
            )

    def __len__(self) -> int:
        return len(self._buf)

    def peek(self, n: int) -> bytes | None:
        """The first `n` bytes without consuming them, or None if fewer are buffered."""
        if len(self._buf) < n:
            return None
        return bytes(self._buf[:n])

    def peek_u32(self, offset: int = 0) -> int | None:
        if len(self._buf) < offset + 4:
            return None
        value: int = struct.unpack_from(">I", self._buf, offset)[0]
        return value

    def take(self, n: int) -> bytes:
        """Consume exactly `n` bytes; the caller has checked that they are there."""
        buf = self._buf
        if n == len(buf):
            self._buf = b""
            return buf if isinstance(buf, bytes) else bytes(buf)
        out = bytes(buf[:n])
        self._buf = buf[n:]
        return out
