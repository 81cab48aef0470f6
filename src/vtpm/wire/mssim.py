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

Rules this codec keeps: one request in flight; a length above the connection's bound
(`max_command` on the server, for SEND_COMMAND and HASH_DATA alike; `max_response` on the
client) is a `RemoteProtocolError` as soon as the length is in, whether the rest of the frame
has arrived or not; an unknown code is a `RemoteProtocolError` (its length is unknown); nothing
may follow SESSION_END or STOP; an answer must end with the u32 0.

The protocol is data: `_TPM_PORT` and `_PLATFORM_PORT` hold one row per code, its request
layout and its answer's (`vtpm.wire._layout`), read by both sides in both directions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import cast

from vtpm.errors import LocalProtocolError
from vtpm.wire._common import Sentinel
from vtpm.wire._layout import (
    ACK,
    Exchange,
    Layout,
    RequestClient,
    RequestServer,
    check_uint,
    code_bytes,
)

__all__ = [
    "ACK",
    "Ack",
    "CommandResponse",
    "GetCommandResponseSizes",
    "HANDSHAKE_FLAGS",
    "HandshakeResponse",
    "HashData",
    "HashEnd",
    "HashStart",
    "MssimClientConnection",
    "MssimServerConnection",
    "PlatformAck",
    "PlatformClientConnection",
    "PlatformCode",
    "PlatformRequest",
    "PlatformResponse",
    "PlatformServerConnection",
    "PlatformSessionEnd",
    "PlatformSignal",
    "RemoteHandshake",
    "SendCommand",
    "SessionEnd",
    "SizesResponse",
    "Stop",
    "TpmPortCode",
    "TpmPortRequest",
    "TpmPortResponse",
]

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

    def __post_init__(self) -> None:
        check_uint("client_version", self.client_version)


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

    def __post_init__(self) -> None:
        check_uint("server_version", self.server_version)
        check_uint("flags", self.flags)


TpmPortRequest = SendCommand | HashStart | HashData | HashEnd | RemoteHandshake | SessionEnd | Stop
TpmPortResponse = CommandResponse | Ack | HandshakeResponse


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

    def __post_init__(self) -> None:
        check_uint("command_size", self.command_size)
        check_uint("response_size", self.response_size)


PlatformRequest = PlatformSignal | GetCommandResponseSizes | PlatformSessionEnd
PlatformResponse = PlatformAck | SizesResponse


# the protocol as data: per code, the request's layout and the answer's ----------------------


_ACK = Layout(Ack, trailer=ACK)
_TPM_PORT: dict[int, Exchange] = {
    code: Exchange(
        code.name,
        Layout(event, fmt, fields, tail, None, what, code_bytes(code)),
        answer,
        answer is None,
        code,
    )
    for code, event, fmt, fields, tail, what, answer in (
        (
            TpmPortCode.SEND_COMMAND,
            SendCommand,
            "BI",
            ("locality",),
            "command",
            "command",
            Layout(CommandResponse, "I", (), "response", None, "response", trailer=ACK),
        ),
        (TpmPortCode.HASH_START, HashStart, "", (), None, "", _ACK),
        (TpmPortCode.HASH_DATA, HashData, "I", (), "data", "hash data", _ACK),
        (TpmPortCode.HASH_END, HashEnd, "", (), None, "", _ACK),
        (
            TpmPortCode.REMOTE_HANDSHAKE,
            RemoteHandshake,
            "I",
            ("client_version",),
            None,
            "",
            Layout(HandshakeResponse, "II", ("server_version", "flags"), trailer=ACK),
        ),
        (TpmPortCode.SESSION_END, SessionEnd, "", (), None, "", None),  # no answer: it ends
        (TpmPortCode.STOP, Stop, "", (), None, "", None),
    )
}
_TPM_PORT_BY_TYPE: dict[object, Exchange] = {ex.request.event: ex for ex in _TPM_PORT.values()}


def _platform(code: PlatformCode) -> Exchange:
    prefix = code_bytes(code)
    if code == PlatformCode.GET_COMMAND_RESPONSE_SIZES:
        sizes = Layout(SizesResponse, "II", ("command_size", "response_size"), trailer=ACK)
        return Exchange(code.name, Layout(GetCommandResponseSizes, prefix=prefix), sizes, code=code)
    if code in (PlatformCode.SESSION_END, PlatformCode.STOP):
        return Exchange(code.name, Layout(PlatformSessionEnd, prefix=prefix), None, True, code)
    signal = Layout(PlatformSignal, prefix=prefix, fixed=(("code", code),))
    return Exchange(code.name, signal, Layout(PlatformAck, trailer=ACK), code=code)


_PLATFORM_PORT: dict[int, Exchange] = {code: _platform(code) for code in PlatformCode}
# a signal is encoded by its code; the rest by event type (PlatformSessionEnd as SESSION_END)
_PLATFORM_BY_KEY: dict[object, Exchange] = {
    ex.code if ex.request.event is PlatformSignal else ex.request.event: ex
    for ex in reversed(_PLATFORM_PORT.values())
}


class MssimServerConnection(RequestServer):
    """Command port, server side."""

    _protocol = "simulator"
    _unknown = "unknown simulator command {code}"

    def __init__(self, max_command: int = 4096) -> None:
        super().__init__(_TPM_PORT, max_command + 64, max_command)

    def next_event(self) -> TpmPortRequest | Sentinel:
        got = self._next()
        return got if isinstance(got, Sentinel) else cast("TpmPortRequest", got[1])

    def send(self, resp: TpmPortResponse) -> bytes:
        return self._send(resp)


class PlatformServerConnection(RequestServer):
    """Platform port, server side."""

    _protocol = "platform"
    _unknown = "unknown platform command {code}"

    def __init__(self) -> None:
        super().__init__(_PLATFORM_PORT, 4096, 0)

    def next_event(self) -> PlatformRequest | Sentinel:
        got = self._next()
        return got if isinstance(got, Sentinel) else cast("PlatformRequest", got[1])

    def send(self, resp: PlatformResponse) -> bytes:
        return self._send(resp)


# client side (tests, benchmarks) -------------------------------------------------------------


class MssimClientConnection(RequestClient):
    _protocol = "simulator"

    def __init__(self, max_response: int = 65536) -> None:
        super().__init__(_TPM_PORT_BY_TYPE, max_response + 64, max_response)

    def send(self, req: TpmPortRequest) -> bytes:
        return self._send(req)

    def next_event(self) -> TpmPortResponse | Sentinel:
        return cast("TpmPortResponse | Sentinel", self._next())


class PlatformClientConnection(RequestClient):
    _protocol = "platform"

    def __init__(self) -> None:
        super().__init__(_PLATFORM_BY_KEY, 4096, 0)

    def _key(self, request: object) -> object:
        return request.code if isinstance(request, PlatformSignal) else type(request)

    def send(self, req: PlatformRequest) -> bytes:
        return self._send(req)

    def next_event(self) -> PlatformResponse | Sentinel:
        return cast("PlatformResponse | Sentinel", self._next())
