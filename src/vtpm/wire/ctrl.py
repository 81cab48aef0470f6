"""The swtpm control channel, sans-IO (both sides).

Layout (swtpm's `tpm_ioctl.h`, checked against a capture of QEMU 7.2 and swtpm 0.7.1): a
request is a u32 command code and a body whose layout the code fixes; a response is a u32
result and, for some commands, more fixed fields and data. Big-endian throughout. One request
is in flight at a time: the client waits for the answer before it sends more.

Rules this codec keeps:
- Request bodies are parsed by their code's layout, never by read boundaries, so every split
  of the input gives the same events.
- SET_LOCALITY and RESET_TPMESTABLISHED carry one locality byte. QEMU sends it padded to four
  bytes (the pad is not guaranteed to be zero), tpm2-tss's tcti-swtpm sends the byte alone;
  both wait for the answer. The event is emitted after the locality byte; whether three pad
  bytes follow is decided later from content: a command code always starts 00 00 00 with a
  non-zero fourth byte, so if the fourth byte after the locality is 00 the first three are pad
  (the 00 is the next code's first byte). Up to three bytes left at end of stream after such
  a command are pad too.
- Data-bearing answers sent as an error (`Result(n)` with n != 0) keep their fixed layout,
  zero-filled, so a client that reads a fixed size (QEMU does) is never left waiting.
- An unknown code cannot be skipped (its length is unknown): `RemoteProtocolError`; the
  adapter answers `error_bytes_for_unknown()` and closes.
- SHUTDOWN ends the session once answered: any byte after it is a `RemoteProtocolError`.
- HASH_DATA carries at most MAX_HASH_DATA bytes and SET_STATEBLOB at most `max_message`; a
  larger length is refused as soon as it is in, before its data.

The protocol is data: `_COMMANDS` holds one row per code, its request layout and its response
layout (`vtpm.wire._layout`), and every encoder and decoder on both sides reads that row. The
events are in `vtpm.wire.ctrl_events` (re-exported here).
"""

from __future__ import annotations

import struct
from typing import cast

from vtpm.errors import LocalProtocolError
from vtpm.wire._common import Sentinel
from vtpm.wire._layout import Exchange, Layout, RequestClient, RequestServer, code_bytes
from vtpm.wire.ctrl_events import (
    INIT_FLAG_DELETE_VOLATILE,
    MAX_HASH_DATA,
    STATE_FLAG_DECRYPTED,
    STATE_FLAG_ENCRYPTED,
    BufferSizeResult,
    CancelTpmCmd,
    Capability,
    CapabilityResult,
    ConfigResult,
    CtrlCommand,
    CtrlResult,
    EstablishedResult,
    GetCapability,
    GetConfig,
    GetInfo,
    GetStateBlob,
    GetTpmEstablished,
    HashData,
    HashEnd,
    HashStart,
    InfoResult,
    Init,
    LockStorage,
    Request,
    ResetTpmEstablished,
    Response,
    Result,
    SetBufferSize,
    SetDataFd,
    SetLocality,
    SetStateBlob,
    Shutdown,
    StateBlobResult,
    StateBlobType,
    Stop,
    StoreVolatile,
)

__all__ = [
    "BufferSizeResult",
    "CancelTpmCmd",
    "Capability",
    "CapabilityResult",
    "ConfigResult",
    "ControlClientConnection",
    "ControlServerConnection",
    "CtrlCommand",
    "CtrlResult",
    "EstablishedResult",
    "GetCapability",
    "GetConfig",
    "GetInfo",
    "GetStateBlob",
    "GetTpmEstablished",
    "HashData",
    "HashEnd",
    "HashStart",
    "INIT_FLAG_DELETE_VOLATILE",
    "InfoResult",
    "Init",
    "LockStorage",
    "MAX_HASH_DATA",
    "Request",
    "ResetTpmEstablished",
    "Response",
    "Result",
    "STATE_FLAG_DECRYPTED",
    "STATE_FLAG_ENCRYPTED",
    "SetBufferSize",
    "SetDataFd",
    "SetLocality",
    "SetStateBlob",
    "Shutdown",
    "StateBlobResult",
    "StateBlobType",
    "Stop",
    "StoreVolatile",
    "encode_request",
    "encode_response",
    "error_bytes_for_unknown",
]

# the protocol as data: per code, the request's layout and the response's ------------------

RESULT = Layout(Result, "I", ("result",))
_RESPONSES = {
    GetCapability: Layout(CapabilityResult, "II", ("result", "caps")),
    GetTpmEstablished: Layout(
        EstablishedResult,
        "IB3x",
        ("result", "established"),
        convert=(("established", lambda bit: bool(bit & 1)),),
    ),
    GetStateBlob: Layout(
        StateBlobResult,
        "IIII",
        ("result", "flags", "total_length"),
        tail="data",
        tail_what="state blob",
    ),
    GetConfig: Layout(ConfigResult, "II", ("result", "flags")),
    SetBufferSize: Layout(BufferSizeResult, "IIII", ("result", "size", "minimum", "maximum")),
    GetInfo: Layout(InfoResult, "III", ("result", "total_length"), tail="data", tail_what="info"),
}
# code, request event, request fields after the code (struct format, names), tail, its bound
_REQUESTS: tuple[tuple[CtrlCommand, type, str, tuple[str, ...], str | None, int | None], ...] = (
    (CtrlCommand.GET_CAPABILITY, GetCapability, "", (), None, None),
    (CtrlCommand.INIT, Init, "I", ("flags",), None, None),
    (CtrlCommand.SHUTDOWN, Shutdown, "", (), None, None),
    (CtrlCommand.GET_TPMESTABLISHED, GetTpmEstablished, "", (), None, None),
    (CtrlCommand.SET_LOCALITY, SetLocality, "B", ("locality",), None, None),
    (CtrlCommand.HASH_START, HashStart, "", (), None, None),
    (CtrlCommand.HASH_DATA, HashData, "I", (), "data", MAX_HASH_DATA),
    (CtrlCommand.HASH_END, HashEnd, "", (), None, None),
    (CtrlCommand.CANCEL_TPM_CMD, CancelTpmCmd, "", (), None, None),
    (CtrlCommand.STORE_VOLATILE, StoreVolatile, "", (), None, None),
    (CtrlCommand.RESET_TPMESTABLISHED, ResetTpmEstablished, "B", ("locality",), None, None),
    (CtrlCommand.GET_STATEBLOB, GetStateBlob, "III", ("flags", "blob_type", "offset"), None, None),
    (CtrlCommand.SET_STATEBLOB, SetStateBlob, "III", ("flags", "blob_type"), "data", None),
    (CtrlCommand.STOP, Stop, "", (), None, None),
    (CtrlCommand.GET_CONFIG, GetConfig, "", (), None, None),
    (CtrlCommand.SET_DATAFD, SetDataFd, "", (), None, None),
    (CtrlCommand.SET_BUFFERSIZE, SetBufferSize, "I", ("size",), None, None),
    (CtrlCommand.GET_INFO, GetInfo, "QI4x", ("flags", "offset"), None, None),
    (CtrlCommand.LOCK_STORAGE, LockStorage, "I", ("retries",), None, None),
)
_TAIL_WHAT = {CtrlCommand.HASH_DATA: "HASH_DATA", CtrlCommand.SET_STATEBLOB: "state blob"}
_COMMANDS: dict[int, Exchange] = {
    code: Exchange(
        f"command {code:#x} ({code.name})",
        Layout(event, fmt, fields, tail, bound, _TAIL_WHAT.get(code, ""), code_bytes(code)),
        _RESPONSES.get(event, RESULT),
        ends=code == CtrlCommand.SHUTDOWN,
        code=code,
    )
    for code, event, fmt, fields, tail, bound in _REQUESTS
}
_BY_TYPE: dict[object, Exchange] = {ex.request.event: ex for ex in _COMMANDS.values()}
# one locality byte; QEMU pads it to four bytes (see the rules above)
_PADDED = frozenset({CtrlCommand.SET_LOCALITY, CtrlCommand.RESET_TPMESTABLISHED})
_PAD = bytes(3)


def error_bytes_for_unknown() -> bytes:
    """What an unknown command is answered with before the connection is closed."""
    return struct.pack(">I", CtrlResult.BAD_ORDINAL)


def _exchange(kind: object) -> Exchange:
    ex = _BY_TYPE.get(kind)
    if ex is None:
        raise LocalProtocolError(f"{kind!r} is not a control request")
    return ex


def _request_bytes(ex: Exchange, req: object, short_locality: bool) -> bytes:
    out = ex.request.encode(req)
    return out if short_locality or ex.code not in _PADDED else out + _PAD


def _answer_bytes(ex: Exchange, resp: object) -> bytes:
    layout = ex.answer
    assert layout is not None
    if isinstance(resp, Result) and layout.event is not Result:
        if resp.result == 0:
            raise LocalProtocolError(f"{ex.name} needs a {layout.name} on success")
        return layout.zero_filled(resp.result)
    if type(resp) is not layout.event:
        raise LocalProtocolError(
            f"{ex.name} is answered by {layout.name}, not {type(resp).__name__}"
        )
    return layout.encode(resp)


def encode_request(req: Request, short_locality: bool = False) -> bytes:
    return _request_bytes(_exchange(type(req)), req, short_locality)


def encode_response(resp: Response, pending: type) -> bytes:
    """Bytes of `resp` answering a request of type `pending`."""
    return _answer_bytes(_exchange(pending), resp)


class ControlServerConnection(RequestServer):
    """Decodes requests, encodes responses."""

    _protocol = "control"
    _unknown = "unknown control command {code:#x}"
    _after_end = "data after SHUTDOWN"

    def __init__(self, max_message: int = 1 << 20) -> None:
        super().__init__(_COMMANDS, max_message + 64, max_message)
        self._maybe_pad = False

    def _ready(self) -> bool:
        """Settle the pad question after a locality byte; False if more bytes are needed."""
        if not self._maybe_pad:
            return True
        buf = self._buf
        if len(buf) >= 4:
            peek = buf.peek(4)
            assert peek is not None
            if peek[3] == 0:
                buf.take(3)
        elif buf.eof:
            buf.take(len(buf))
        else:
            return False
        self._maybe_pad = False
        return True

    def next_event(self) -> Request | Sentinel:
        got = self._next()
        if isinstance(got, Sentinel):
            return got
        ex, event = got
        self._maybe_pad = ex.code in _PADDED
        return cast("Request", event)

    def _encode_answer(self, ex: Exchange, answer: object) -> bytes:
        return _answer_bytes(ex, answer)

    def send(self, resp: Response) -> bytes:
        return self._send(resp)


class ControlClientConnection(RequestClient):
    """Encodes requests, decodes responses (for tests and benchmarks)."""

    _protocol = "control"

    def __init__(self, short_locality: bool = False, max_message: int = 1 << 20) -> None:
        super().__init__(_BY_TYPE, max_message + 64, max_message)
        self._short = short_locality

    def _encode_request(self, ex: Exchange, request: object) -> bytes:
        return _request_bytes(ex, request, self._short)

    def send(self, req: Request) -> bytes:
        return self._send(req)

    def next_event(self) -> Response | Sentinel:
        return cast("Response | Sentinel", self._next())
