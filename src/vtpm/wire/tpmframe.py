"""TPM command/response frames on a byte stream (raw sockets, QEMU's data channel).

Rules (TCG TPM 2.0 Part 1 §18 / TPM 1.2 Part 3 §1): a frame starts with a 10-byte header, tag
u16, size u32 (the whole frame, header included), code u32, all big-endian. Frames are
reassembled by the size field alone; a read may hold part of a frame or several. Tags accepted:
TPM 2.0 0x8001/0x8002 and TPM 1.2 0x00C1..0x00C6. A size below the header or above the
connection's bound, or any other tag, is a `RemoteProtocolError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vtpm.errors import LocalProtocolError, RemoteProtocolError
from vtpm.wire._common import CLOSED, NEED_DATA, ReceiveBuffer, Sentinel

HEADER = struct.Struct(">HII")
HEADER_SIZE = HEADER.size
VALID_TAGS = frozenset({0x8001, 0x8002, 0x00C1, 0x00C2, 0x00C3, 0x00C4, 0x00C5, 0x00C6})


def parse_header(data: bytes) -> tuple[int, int, int]:
    """(tag, size, code) of a frame's first 10 bytes."""
    if len(data) < HEADER_SIZE:
        raise LocalProtocolError("a TPM frame header needs 10 bytes")
    tag, size, code = HEADER.unpack_from(data)
    return tag, size, code


@dataclass(frozen=True, slots=True)
class _Frame:
    data: bytes

    def __post_init__(self) -> None:
        if len(self.data) < HEADER_SIZE:
            raise LocalProtocolError(f"a TPM frame of {len(self.data)} bytes has no header")
        tag, size, _ = HEADER.unpack_from(self.data)
        if size != len(self.data):
            raise LocalProtocolError(f"frame size field {size} != length {len(self.data)}")
        if tag not in VALID_TAGS:
            raise LocalProtocolError(f"tag {tag:#06x} is not a TPM tag")

    @property
    def tag(self) -> int:
        return parse_header(self.data)[0]

    @property
    def code(self) -> int:
        return parse_header(self.data)[2]


@dataclass(frozen=True, slots=True)
class TpmCommand(_Frame):
    """One complete TPM command."""


@dataclass(frozen=True, slots=True)
class TpmResponse(_Frame):
    """One complete TPM response."""


class _FrameReader:
    def __init__(self, max_size: int) -> None:
        if max_size < HEADER_SIZE:
            raise LocalProtocolError("max_size must allow at least a header")
        self._max = max_size
        self._buf = ReceiveBuffer(max_size + HEADER_SIZE)

    def receive_data(self, data: bytes) -> None:
        self._buf.feed(data)

    def _next_frame(self) -> bytes | Sentinel:
        head = self._buf.peek(HEADER_SIZE)
        if head is None:
            if self._buf.eof:
                if len(self._buf):
                    raise RemoteProtocolError("connection closed in the middle of a frame header")
                return CLOSED
            return NEED_DATA
        tag, size, _code = HEADER.unpack(head)
        if tag not in VALID_TAGS:
            raise RemoteProtocolError(f"tag {tag:#06x} is not a TPM frame tag")
        if size < HEADER_SIZE:
            raise RemoteProtocolError(f"frame size {size} is smaller than the header")
        if size > self._max:
            raise RemoteProtocolError(f"frame size {size} exceeds the limit of {self._max}")
        if len(self._buf) < size:
            if self._buf.eof:
                raise RemoteProtocolError("connection closed in the middle of a frame")
            return NEED_DATA
        return self._buf.take(size)


class FrameServerConnection(_FrameReader):
    """Server side: commands in, responses out, one command in flight."""

    def __init__(self, max_size: int = 4096) -> None:
        super().__init__(max_size)
        self._pending = False

    def next_event(self) -> TpmCommand | Sentinel:
        if self._pending:
            return NEED_DATA
        frame = self._next_frame()
        if isinstance(frame, Sentinel):
            return frame
        self._pending = True
        return TpmCommand(frame)

    def whole_command(self, data: bytes) -> bytes | None:
        """The fast path for the usual read: if nothing is buffered or in flight and `data` is
        exactly one valid command, take it as the command in flight and return its bytes;
        otherwise None (then `receive_data(data)` and `next_event` as usual)."""
        if self._pending or len(self._buf) or len(data) < HEADER_SIZE:
            return None
        tag, size, _code = HEADER.unpack_from(data)
        if size != len(data) or tag not in VALID_TAGS or size > self._max:
            return None
        self._pending = True
        return data

    def respond(self, response: bytes) -> bytes:
        """`send` for a response the engine produced (already a well-formed frame)."""
        if not self._pending:
            raise LocalProtocolError("no command is waiting for a response")
        self._pending = False
        return response

    def send(self, event: TpmResponse) -> bytes:
        if not isinstance(event, TpmResponse):
            raise LocalProtocolError(f"a server sends TpmResponse, not {type(event).__name__}")
        if not self._pending:
            raise LocalProtocolError("no command is waiting for a response")
        self._pending = False
        return event.data


class FrameClientConnection(_FrameReader):
    """Client side: commands out, responses in."""

    def __init__(self, max_size: int = 65536) -> None:
        super().__init__(max_size)
        self._pending = False

    def send(self, event: TpmCommand) -> bytes:
        if not isinstance(event, TpmCommand):
            raise LocalProtocolError(f"a client sends TpmCommand, not {type(event).__name__}")
        if self._pending:
            raise LocalProtocolError("a command is already in flight")
        self._pending = True
        return event.data

    def next_event(self) -> TpmResponse | Sentinel:
        frame = self._next_frame()
        if isinstance(frame, Sentinel):
            return frame
        if not self._pending:
            raise RemoteProtocolError("response without a command")
        self._pending = False
        return TpmResponse(frame)
