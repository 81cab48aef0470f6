"""The Microsoft TPM 2.0 simulator protocol (tpm2-tss TCTI `mssim`), sans-IO, both sides.

Two TCP connections (checked against tpm2-tss 3.2 tcti-mssim and the reference simulator's
TCP server): the command port P and the platform port P+1. Big-endian u32 codes.

Command port: SEND_COMMAND (8) = u8 locality, u32 length, command → u32 length, response,
u32 0. HASH_START (5) / HASH_END (7) → u32 0; HASH_DATA (6) = u32 length, data → u32 0.
REMOTE_HANDSHAKE (15) = u32 client version → u32 server version, u32 flags, u32 0.
SESSION_END (20) and STOP (21) end the session without an answer.
Platform port: every signal is a bare u32 code answered by u32 0;
GET_COMMAND_RESPONSE_SIZES (25) is answered by u32 command size, u32 response size, u32 0.
tcti-mssim sends POWER_ON then NV_ON when it connects, and simply closes when done.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from vtpm.errors import LocalProtocolError, RemoteProtocolError
from vtpm.wire._common import CLOSED, NEED_DATA, ReceiveBuffer, Sentinel

ACK = b"\x00\x00\x00\x00"
HANDSHAKE_FLAGS = 0x01 | 0x08  # platform available, supports physical presence


class TpmPortCode(enum.IntEnum):
    HASH_START = 5
    HASH_DATA = 6
    HASH_END = 7
    SEND_COMMAND = 8
    REMOTE_HANDSHAKE = 15
    SESSION_END = 20
    STOP = 21


class PlatformCode(enum.IntEnum):
    POWER_ON = 1
    POWER_OFF = 2
    PHYS_PRES_ON = 3
    PHYS_PRES_OFF = 4
    CANCEL_ON = 9
    CANCEL_OFF = 10
    NV_ON = 11
    NV_OFF = 12
    KEY_CACHE_ON = 13
    KEY_CACHE_OFF = 14
    RESET = 17
    RESTART = 18
    SESSION_END = 20
    STOP = 21
    GET_COMMAND_RESPONSE_SIZES = 25


# command port -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendCommand:
    locality: int
    command: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.locality <= 0xFF:
            raise LocalProtocolError(f"locality {self.locality} does not fit in a byte")


@dataclass(frozen=True, slots=True)
class HashStart:
    pass


@dataclass(frozen=True, slots=True)
class HashData:
    data: bytes


@dataclass(frozen=True, slots=True)
class HashEnd:
    pass


@dataclass(frozen=True, slots=True)
class RemoteHandshake:
    client_version: int


@dataclass(frozen=True, slots=True)
class SessionEnd:
    pass


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class CommandResponse:
    response: bytes


@dataclass(frozen=True, slots=True)
class Ack:
    pass


@dataclass(frozen=True, slots=True)
class HandshakeResponse:
    server_version: int
    flags: int


TpmPortRequest = SendCommand | HashStart | HashData | HashEnd | RemoteHandshake | SessionEnd | Stop
TpmPortResponse = CommandResponse | Ack | HandshakeResponse

_BARE: dict[TpmPortCode, type[HashStart | HashEnd | SessionEnd | Stop]] = {
    TpmPortCode.HASH_START: HashStart,
    TpmPortCode.HASH_END: HashEnd,
    TpmPortCode.SESSION_END: SessionEnd,
    TpmPortCode.STOP: Stop,
}
_ANSWER = {
    SendCommand: CommandResponse,
    RemoteHandshake: HandshakeResponse,
    HashStart: Ack,
    HashData: Ack,
    HashEnd: Ack,
}
_ENDS = (SessionEnd, Stop)

# platform port ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PlatformSignal:
    code: PlatformCode

    def __post_init__(self) -> None:
        if self.code in (
            PlatformCode.GET_COMMAND_RESPONSE_SIZES,
            PlatformCode.SESSION_END,
            PlatformCode.STOP,
        ):
            raise LocalProtocolError(f"{self.code.name} is not a signal")


@dataclass(frozen=True, slots=True)
class GetCommandResponseSizes:
    pass


@dataclass(frozen=True, slots=True)
class PlatformSessionEnd:
    pass


@dataclass(frozen=True, slots=True)
class PlatformAck:
    pass


@dataclass(frozen=True, slots=True)
class SizesResponse:
    command_size: int
    response_size: int


PlatformRequest = PlatformSignal | GetCommandResponseSizes | PlatformSessionEnd
PlatformResponse = PlatformAck | SizesResponse


class _Server:
    def __init__(self, limit: int) -> None:
        self._buf = ReceiveBuffer(limit)
        self._pending: type | None = None
        self._ended = False

    def receive_data(self, data: bytes) -> None:
        self._buf.feed(data)

    def _header(self) -> int | Sentinel:
        """The next code, or a sentinel, honouring the end-of-session rules."""
        if self._pending is not None:
            return NEED_DATA
        if self._ended:
            if len(self._buf):
                raise RemoteProtocolError("data after the end of the session")
            return CLOSED if self._buf.eof else NEED_DATA
        code = self._buf.peek_u32()
        if code is None:
            if self._buf.eof:
                if len(self._buf):
                    raise RemoteProtocolError("connection closed inside a code")
                return CLOSED
            return NEED_DATA
        return code

    def _incomplete(self, what: str) -> Sentinel:
        if self._buf.eof:
            raise RemoteProtocolError(f"connection closed inside {what}")
        return NEED_DATA


class MssimServerConnection(_Server):
    """Command port, server side."""

    def __init__(self, max_command: int = 4096) -> None:
        super().__init__(max_command + 64)
        self._max = max_command

    def next_event(self) -> TpmPortRequest | Sentinel:
        code = self._header()
        if isinstance(code, Sentinel):
            return code
        buf = self._buf
        ev: TpmPortRequest
        if code == TpmPortCode.SEND_COMMAND:
            raw = buf.peek(9)
            if raw is None:
                return self._incomplete("SEND_COMMAND")
            loc, n = raw[4], struct.unpack_from(">I", raw, 5)[0]
            if n > self._max:
                raise RemoteProtocolError(f"command of {n} bytes exceeds {self._max}")
            if len(buf) < 9 + n:
                return self._incomplete("SEND_COMMAND")
            ev = SendCommand(loc, buf.take(9 + n)[9:])
        elif code == TpmPortCode.HASH_DATA:
            n = buf.peek_u32(4)
            if n is None or len(buf) < 8 + n:
                if n is not None and n > self._max:
                    raise RemoteProtocolError(f"hash data of {n} bytes exceeds {self._max}")
                return self._incomplete("HASH_DATA")
            ev = HashData(buf.take(8 + n)[8:])
        elif code == TpmPortCode.REMOTE_HANDSHAKE:
            raw = buf.peek(8)
            if raw is None:
                return self._incomplete("REMOTE_HANDSHAKE")
            buf.take(8)
            ev = RemoteHandshake(struct.unpack_from(">I", raw, 4)[0])
        elif code in (
            TpmPortCode.HASH_START,
            TpmPortCode.HASH_END,
            TpmPortCode.SESSION_END,
            TpmPortCode.STOP,
        ):
            buf.take(4)
            ev = _BARE[TpmPortCode(code)]()
        else:
            raise RemoteProtocolError(f"unknown simulator command {code}")
        if isinstance(ev, _ENDS):
            self._ended = True
        else:
            self._pending = type(ev)
        return ev

    def send(self, resp: TpmPortResponse) -> bytes:
        if self._pending is None:
            raise LocalProtocolError("no simulator request is waiting for an answer")
        want = _ANSWER[self._pending]
        if not isinstance(resp, want):
            raise LocalProtocolError(f"{self._pending.__name__} is answered by {want.__name__}")
        self._pending = None
        match resp:
            case CommandResponse(response=r):
                return struct.pack(">I", len(r)) + r + ACK
            case HandshakeResponse(server_version=v, flags=f):
                return struct.pack(">II", v, f) + ACK
        return ACK


class PlatformServerConnection(_Server):
    """Platform port, server side."""

    def __init__(self) -> None:
        super().__init__(4096)

    def next_event(self) -> PlatformRequest | Sentinel:
        code = self._header()
        if isinstance(code, Sentinel):
            return code
        self._buf.take(4)
        ev: PlatformRequest
        if code == PlatformCode.GET_COMMAND_RESPONSE_SIZES:
            ev = GetCommandResponseSizes()
        elif code in (PlatformCode.SESSION_END, PlatformCode.STOP):
            self._ended = True
            return PlatformSessionEnd()
        elif code in PlatformCode._value2member_map_:
            ev = PlatformSignal(PlatformCode(code))
        else:
            raise RemoteProtocolError(f"unknown platform command {code}")
        self._pending = type(ev)
        return ev

    def send(self, resp: PlatformResponse) -> bytes:
        if self._pending is None:
            raise LocalProtocolError("no platform request is waiting for an answer")
        want = SizesResponse if self._pending is GetCommandResponseSizes else PlatformAck
        if not isinstance(resp, want):
            raise LocalProtocolError(f"{self._pending.__name__} is answered by {want.__name__}")
        self._pending = None
        if isinstance(resp, SizesResponse):
            return struct.pack(">II", resp.command_size, resp.response_size) + ACK
        return ACK


# client side (tests, benchmarks) -------------------------------------------------------------


class MssimClientConnection:
    def __init__(self, max_response: int = 65536) -> None:
        self._buf = ReceiveBuffer(max_response + 64)
        self._pending: type | None = None

    def send(self, req: TpmPortRequest) -> bytes:
        if self._pending is not None:
            raise LocalProtocolError("a simulator request is already in flight")
        match req:
            case SendCommand(locality=loc, command=cmd):
                out = struct.pack(">IBI", TpmPortCode.SEND_COMMAND, loc, len(cmd)) + cmd
            case HashData(data=d):
                out = struct.pack(">II", TpmPortCode.HASH_DATA, len(d)) + d
            case RemoteHandshake(client_version=v):
                out = struct.pack(">II", TpmPortCode.REMOTE_HANDSHAKE, v)
            case HashStart():
                out = struct.pack(">I", TpmPortCode.HASH_START)
            case HashEnd():
                out = struct.pack(">I", TpmPortCode.HASH_END)
            case SessionEnd():
                return struct.pack(">I", TpmPortCode.SESSION_END)
            case Stop():
                return struct.pack(">I", TpmPortCode.STOP)
        self._pending = type(req)
        return out

    def receive_data(self, data: bytes) -> None:
        self._buf.feed(data)

    def next_event(self) -> TpmPortResponse | Sentinel:
        buf = self._buf
        if self._pending is None:
            if len(buf):
                raise RemoteProtocolError("answer without a request")
            return CLOSED if buf.eof else NEED_DATA
        if self._pending is SendCommand:
            n = buf.peek_u32()
            need = None if n is None else 8 + n
        elif self._pending is RemoteHandshake:
            need = 12
        else:
            need = 4
        if need is None or len(buf) < need:
            if buf.eof:
                raise RemoteProtocolError("connection closed inside an answer")
            return NEED_DATA
        raw = buf.take(need)
        if raw[-4:] != ACK:
            raise RemoteProtocolError("answer not followed by the 0 acknowledgement")
        kind, self._pending = self._pending, None
        if kind is SendCommand:
            return CommandResponse(raw[4:-4])
        if kind is RemoteHandshake:
            return HandshakeResponse(*struct.unpack_from(">II", raw))
        return Ack()


class PlatformClientConnection:
    def __init__(self) -> None:
        self._buf = ReceiveBuffer(4096)
        self._pending: type | None = None

    def send(self, req: PlatformRequest) -> bytes:
        if self._pending is not None:
            raise LocalProtocolError("a platform request is already in flight")
        match req:
            case PlatformSignal(code=c):
                out = struct.pack(">I", c)
            case GetCommandResponseSizes():
                out = struct.pack(">I", PlatformCode.GET_COMMAND_RESPONSE_SIZES)
            case PlatformSessionEnd():
                return struct.pack(">I", PlatformCode.SESSION_END)
        self._pending = type(req)
        return out

    def receive_data(self, data: bytes) -> None:
        self._buf.feed(data)

    def next_event(self) -> PlatformResponse | Sentinel:
        buf = self._buf
        if self._pending is None:
            if len(buf):
                raise RemoteProtocolError("answer without a request")
            return CLOSED if buf.eof else NEED_DATA
        need = 12 if self._pending is GetCommandResponseSizes else 4
        raw = buf.peek(need)
        if raw is None:
            if buf.eof:
                raise RemoteProtocolError("connection closed inside an answer")
            return NEED_DATA
        buf.take(need)
        if raw[-4:] != ACK:
            raise RemoteProtocolError(f"platform command failed with {raw[-4:].hex()}")
        kind, self._pending = self._pending, None
        if kind is GetCommandResponseSizes:
            return SizesResponse(*struct.unpack_from(">II", raw))
        return PlatformAck()
