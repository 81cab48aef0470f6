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
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from vtpm.errors import LocalProtocolError, RemoteProtocolError
from vtpm.wire._common import CLOSED, NEED_DATA, ReceiveBuffer, Sentinel

MAX_HASH_DATA = 4096 - 4


class CtrlCommand(enum.IntEnum):
    GET_CAPABILITY = 0x01
    INIT = 0x02
    SHUTDOWN = 0x03
    GET_TPMESTABLISHED = 0x04
    SET_LOCALITY = 0x05
    HASH_START = 0x06
    HASH_DATA = 0x07
    HASH_END = 0x08
    CANCEL_TPM_CMD = 0x09
    STORE_VOLATILE = 0x0A
    RESET_TPMESTABLISHED = 0x0B
    GET_STATEBLOB = 0x0C
    SET_STATEBLOB = 0x0D
    STOP = 0x0E
    GET_CONFIG = 0x0F
    SET_DATAFD = 0x10
    SET_BUFFERSIZE = 0x11
    GET_INFO = 0x12
    LOCK_STORAGE = 0x13


class CtrlResult(enum.IntEnum):
    """Result codes (TPM 1.2 TPM_RESULT values, as swtpm answers them)."""

    SUCCESS = 0x00
    BAD_PARAMETER = 0x03
    FAIL = 0x09
    BAD_ORDINAL = 0x0A
    IO_ERROR = 0x1F


class Capability(enum.IntFlag):
    INIT = 1 << 0
    SHUTDOWN = 1 << 1
    GET_TPMESTABLISHED = 1 << 2
    SET_LOCALITY = 1 << 3
    HASHING = 1 << 4
    CANCEL_TPM_CMD = 1 << 5
    STORE_VOLATILE = 1 << 6
    RESET_TPMESTABLISHED = 1 << 7
    GET_STATEBLOB = 1 << 8
    SET_STATEBLOB = 1 << 9
    STOP = 1 << 10
    GET_CONFIG = 1 << 11
    SET_DATAFD = 1 << 12
    SET_BUFFERSIZE = 1 << 13
    GET_INFO = 1 << 14
    SEND_COMMAND_HEADER = 1 << 15
    LOCK_STORAGE = 1 << 16


class StateBlobType(enum.IntEnum):
    PERMANENT = 1
    VOLATILE = 2
    SAVESTATE = 3


INIT_FLAG_DELETE_VOLATILE = 0x1
STATE_FLAG_DECRYPTED = 0x1
STATE_FLAG_ENCRYPTED = 0x2


def _u32(name: str, value: int) -> None:
    if not 0 <= value <= 0xFFFFFFFF:
        raise LocalProtocolError(f"{name}={value} does not fit in 32 bits")


def _locality(value: int) -> None:
    if not 0 <= value <= 4:
        raise LocalProtocolError(f"locality {value} is out of range 0..4")


# requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GetCapability:
    pass


@dataclass(frozen=True, slots=True)
class Init:
    flags: int = 0

    def __post_init__(self) -> None:
        _u32("flags", self.flags)


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class GetTpmEstablished:
    pass


@dataclass(frozen=True, slots=True)
class SetLocality:
    locality: int

    def __post_init__(self) -> None:
        if not 0 <= self.locality <= 0xFF:
            raise LocalProtocolError(f"locality {self.locality} does not fit in a byte")


@dataclass(frozen=True, slots=True)
class HashStart:
    pass


@dataclass(frozen=True, slots=True)
class HashData:
    data: bytes

    def __post_init__(self) -> None:
        if len(self.data) > MAX_HASH_DATA:
            raise LocalProtocolError(f"hash data of {len(self.data)} bytes is too long")


@dataclass(frozen=True, slots=True)
class HashEnd:
    pass


@dataclass(frozen=True, slots=True)
class CancelTpmCmd:
    pass


@dataclass(frozen=True, slots=True)
class StoreVolatile:
    pass


@dataclass(frozen=True, slots=True)
class ResetTpmEstablished:
    locality: int

    def __post_init__(self) -> None:
        if not 0 <= self.locality <= 0xFF:
            raise LocalProtocolError(f"locality {self.locality} does not fit in a byte")


@dataclass(frozen=True, slots=True)
class GetStateBlob:
    flags: int
    blob_type: int
    offset: int = 0

    def __post_init__(self) -> None:
        for name in ("flags", "blob_type", "offset"):
            _u32(name, getattr(self, name))


@dataclass(frozen=True, slots=True)
class SetStateBlob:
    flags: int
    blob_type: int
    data: bytes

    def __post_init__(self) -> None:
        _u32("flags", self.flags)
        _u32("blob_type", self.blob_type)


@dataclass(frozen=True, slots=True)
class Stop:
    pass


@dataclass(frozen=True, slots=True)
class GetConfig:
    pass


@dataclass(frozen=True, slots=True)
class SetDataFd:
    pass


@dataclass(frozen=True, slots=True)
class SetBufferSize:
    size: int

    def __post_init__(self) -> None:
        _u32("size", self.size)


@dataclass(frozen=True, slots=True)
class GetInfo:
    flags: int
    offset: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.flags <= 0xFFFFFFFFFFFFFFFF:
            raise LocalProtocolError("GET_INFO flags do not fit in 64 bits")
        _u32("offset", self.offset)


@dataclass(frozen=True, slots=True)
class LockStorage:
    retries: int = 0

    def __post_init__(self) -> None:
        _u32("retries", self.retries)


Request = (
    GetCapability
    | Init
    | Shutdown
    | GetTpmEstablished
    | SetLocality
    | HashStart
    | HashData
    | HashEnd
    | CancelTpmCmd
    | StoreVolatile
    | ResetTpmEstablished
    | GetStateBlob
    | SetStateBlob
    | Stop
    | GetConfig
    | SetDataFd
    | SetBufferSize
    | GetInfo
    | LockStorage
)

# responses ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    result: int

    def __post_init__(self) -> None:
        _u32("result", self.result)


@dataclass(frozen=True, slots=True)
class CapabilityResult:
    result: int
    caps: int

    def __post_init__(self) -> None:
        _u32("result", self.result)
        _u32("caps", self.caps)


@dataclass(frozen=True, slots=True)
class EstablishedResult:
    result: int
    established: bool


@dataclass(frozen=True, slots=True)
class StateBlobResult:
    result: int
    flags: int
    total_length: int
    data: bytes

    def __post_init__(self) -> None:
        for name in ("result", "flags", "total_length"):
            _u32(name, getattr(self, name))


@dataclass(frozen=True, slots=True)
class ConfigResult:
    result: int
    flags: int


@dataclass(frozen=True, slots=True)
class BufferSizeResult:
    result: int
    size: int
    minimum: int
    maximum: int


@dataclass(frozen=True, slots=True)
class InfoResult:
    result: int
    total_length: int
    data: bytes


Response = (
    Result
    | CapabilityResult
    | EstablishedResult
    | StateBlobResult
    | ConfigResult
    | BufferSizeResult
    | InfoResult
)

# the protocol as data: per code, the request type and the response type it takes -----------

_RESPONSE_FOR: dict[type, type] = {
    GetCapability: CapabilityResult,
    GetTpmEstablished: EstablishedResult,
    GetStateBlob: StateBlobResult,
    GetConfig: ConfigResult,
    SetBufferSize: BufferSizeResult,
    GetInfo: InfoResult,
}
_NO_BODY: dict[int, type] = {
    CtrlCommand.GET_CAPABILITY: GetCapability,
    CtrlCommand.SHUTDOWN: Shutdown,
    CtrlCommand.GET_TPMESTABLISHED: GetTpmEstablished,
    CtrlCommand.HASH_START: HashStart,
    CtrlCommand.HASH_END: HashEnd,
    CtrlCommand.CANCEL_TPM_CMD: CancelTpmCmd,
    CtrlCommand.STORE_VOLATILE: StoreVolatile,
    CtrlCommand.STOP: Stop,
    CtrlCommand.GET_CONFIG: GetConfig,
    CtrlCommand.SET_DATAFD: SetDataFd,
}
_CODE_OF: dict[type, int] = {v: k for k, v in _NO_BODY.items()} | {
    Init: CtrlCommand.INIT,
    SetLocality: CtrlCommand.SET_LOCALITY,
    HashData: CtrlCommand.HASH_DATA,
    ResetTpmEstablished: CtrlCommand.RESET_TPMESTABLISHED,
    GetStateBlob: CtrlCommand.GET_STATEBLOB,
    SetStateBlob: CtrlCommand.SET_STATEBLOB,
    SetBufferSize: CtrlCommand.SET_BUFFERSIZE,
    GetInfo: CtrlCommand.GET_INFO,
    LockStorage: CtrlCommand.LOCK_STORAGE,
}
_PADDED = (SetLocality, ResetTpmEstablished)


def error_bytes_for_unknown() -> bytes:
    """What an unknown command is answered with before the connection is closed."""
    return struct.pack(">I", CtrlResult.BAD_ORDINAL)


def encode_request(req: Request, short_locality: bool = False) -> bytes:
    code = struct.pack(">I", _CODE_OF[type(req)])
    match req:
        case Init(flags=f) | SetBufferSize(size=f) | LockStorage(retries=f):
            return code + struct.pack(">I", f)
        case SetLocality(locality=loc) | ResetTpmEstablished(locality=loc):
            return code + (bytes([loc]) if short_locality else bytes([loc, 0, 0, 0]))
        case HashData(data=d):
            return code + struct.pack(">I", len(d)) + d
        case GetStateBlob(flags=f, blob_type=t, offset=o):
            return code + struct.pack(">III", f, t, o)
        case SetStateBlob(flags=f, blob_type=t, data=d):
            return code + struct.pack(">III", f, t, len(d)) + d
        case GetInfo(flags=f, offset=o):
            return code + struct.pack(">QII", f, o, 0)
    return code


def encode_response(resp: Response, pending: type) -> bytes:
    """Bytes of `resp` answering a request of type `pending`."""
    want = _RESPONSE_FOR.get(pending, Result)
    if isinstance(resp, Result) and want is not Result:
        if resp.result == 0:
            raise LocalProtocolError(f"{pending.__name__} needs a {want.__name__} on success")
        return _zero_filled(want, resp.result)
    if not isinstance(resp, want):
        raise LocalProtocolError(
            f"{pending.__name__} is answered by {want.__name__}, not {type(resp).__name__}"
        )
    match resp:
        case Result(result=r):
            return struct.pack(">I", r)
        case CapabilityResult(result=r, caps=c):
            return struct.pack(">II", r, c)
        case EstablishedResult(result=r, established=e):
            return struct.pack(">IB3x", r, int(e))
        case StateBlobResult(result=r, flags=f, total_length=t, data=d):
            return struct.pack(">IIII", r, f, t, len(d)) + d
        case ConfigResult(result=r, flags=f):
            return struct.pack(">II", r, f)
        case BufferSizeResult(result=r, size=s, minimum=lo, maximum=hi):
            return struct.pack(">IIII", r, s, lo, hi)
        case InfoResult(result=r, total_length=t, data=d):
            return struct.pack(">III", r, t, len(d)) + d
    raise LocalProtocolError(f"cannot encode {type(resp).__name__}")


_FIXED_SIZE = {
    CapabilityResult: 8,
    EstablishedResult: 8,
    ConfigResult: 8,
    BufferSizeResult: 16,
    StateBlobResult: 16,
    InfoResult: 12,
    Result: 4,
}


def _zero_filled(kind: type, result: int) -> bytes:
    return struct.pack(">I", result) + bytes(_FIXED_SIZE[kind] - 4)


class ControlServerConnection:
    """Decodes requests, encodes responses."""

    def __init__(self, max_message: int = 1 << 20) -> None:
        self._buf = ReceiveBuffer(max_message + 64)
        self._max = max_message
        self._pending: type | None = None
        self._maybe_pad = False
        self._done = False

    def receive_data(self, data: bytes) -> None:
        self._buf.feed(data)

    def _skip_pad(self) -> bool:
        """Settle the pad question after a locality byte; False if more bytes are needed."""
        if not self._maybe_pad:
            return True
        if len(self._buf) >= 4:
            peek = self._buf.peek(4)
            assert peek is not None
            if peek[3] == 0:
                self._buf.take(3)
            self._maybe_pad = False
            return True
        if self._buf.eof:
            self._buf.take(len(self._buf))
            self._maybe_pad = False
            return True
        return False

    def next_event(self) -> Request | Sentinel:
        if self._pending is not None:
            return NEED_DATA
        if self._done:
            if len(self._buf):
                raise RemoteProtocolError("data after SHUTDOWN")
            return CLOSED if self._buf.eof else NEED_DATA
        if not self._skip_pad():
            return NEED_DATA
        code = self._buf.peek_u32()
        if code is None:
            if self._buf.eof:
                if len(self._buf):
                    raise RemoteProtocolError("connection closed inside a command code")
                return CLOSED
            return NEED_DATA
        event = self._parse(code)
        if event is NEED_DATA:
            if self._buf.eof:
                raise RemoteProtocolError(f"connection closed inside command {code:#x}")
            return NEED_DATA
        assert not isinstance(event, Sentinel)
        self._pending = type(event)
        if isinstance(event, _PADDED):
            self._maybe_pad = True
        return event

    def _parse(self, code: int) -> Request | Sentinel:
        buf = self._buf
        if code in _NO_BODY:
            buf.take(4)
            ev: Request = _NO_BODY[code]()
            return ev
        if code in (CtrlCommand.INIT, CtrlCommand.SET_BUFFERSIZE, CtrlCommand.LOCK_STORAGE):
            raw = buf.peek(8)
            if raw is None:
                return NEED_DATA
            buf.take(8)
            (value,) = struct.unpack_from(">I", raw, 4)
            if code == CtrlCommand.INIT:
                return Init(value)
            if code == CtrlCommand.SET_BUFFERSIZE:
                return SetBufferSize(value)
            return LockStorage(value)
        if code in (CtrlCommand.SET_LOCALITY, CtrlCommand.RESET_TPMESTABLISHED):
            raw = buf.peek(5)
            if raw is None:
                return NEED_DATA
            buf.take(5)
            if code == CtrlCommand.SET_LOCALITY:
                return SetLocality(raw[4])
            return ResetTpmEstablished(raw[4])
        if code == CtrlCommand.HASH_DATA:
            n = buf.peek_u32(4)
            if n is None:
                return NEED_DATA
            if n > MAX_HASH_DATA:
                raise RemoteProtocolError(f"HASH_DATA of {n} bytes exceeds {MAX_HASH_DATA}")
            if len(buf) < 8 + n:
                return NEED_DATA
            return HashData(buf.take(8 + n)[8:])
        if code == CtrlCommand.GET_STATEBLOB:
            raw = buf.peek(16)
            if raw is None:
                return NEED_DATA
            buf.take(16)
            return GetStateBlob(*struct.unpack_from(">III", raw, 4))
        if code == CtrlCommand.SET_STATEBLOB:
            raw = buf.peek(16)
            if raw is None:
                return NEED_DATA
            flags, kind, n = struct.unpack_from(">III", raw, 4)
            if n > self._max:
                raise RemoteProtocolError(f"state blob of {n} bytes exceeds {self._max}")
            if len(buf) < 16 + n:
                return NEED_DATA
            return SetStateBlob(flags, kind, buf.take(16 + n)[16:])
        if code == CtrlCommand.GET_INFO:
            raw = buf.peek(20)
            if raw is None:
                return NEED_DATA
            buf.take(20)
            flags, offset, _pad = struct.unpack_from(">QII", raw, 4)
            return GetInfo(flags, offset)
        raise RemoteProtocolError(f"unknown control command {code:#x}")

    def send(self, resp: Response) -> bytes:
        if self._pending is None:
            raise LocalProtocolError("no control request is waiting for an answer")
        out = encode_response(resp, self._pending)
        if self._pending is Shutdown:
            self._done = True
        self._pending = None
        return out


class ControlClientConnection:
    """Encodes requests, decodes responses (for tests and benchmarks)."""

    def __init__(self, short_locality: bool = False, max_message: int = 1 << 20) -> None:
        self._buf = ReceiveBuffer(max_message + 64)
        self._short = short_locality
        self._pending: type | None = None

    def send(self, req: Request) -> bytes:
        if self._pending is not None:
            raise LocalProtocolError("a control request is already in flight")
        self._pending = type(req)
        return encode_request(req, self._short)

    def receive_data(self, data: bytes) -> None:
        self._buf.feed(data)

    def next_event(self) -> Response | Sentinel:
        buf = self._buf
        if self._pending is None:
            if len(buf):
                raise RemoteProtocolError("answer without a request")
            return CLOSED if buf.eof else NEED_DATA
        want = _RESPONSE_FOR.get(self._pending, Result)
        raw = buf.peek(_FIXED_SIZE[want])
        if raw is None:
            if buf.eof:
                raise RemoteProtocolError("connection closed inside an answer")
            return NEED_DATA
        result = struct.unpack_from(">I", raw)[0]
        resp: Response
        if want in (StateBlobResult, InfoResult):
            n = struct.unpack_from(">I", raw, len(raw) - 4)[0]
            if len(buf) < len(raw) + n:
                if buf.eof:
                    raise RemoteProtocolError("connection closed inside an answer")
                return NEED_DATA
            data = buf.take(len(raw) + n)[len(raw) :]
            if want is StateBlobResult:
                _r, flags, total, _n = struct.unpack_from(">IIII", raw)
                resp = StateBlobResult(result, flags, total, data)
            else:
                resp = InfoResult(result, struct.unpack_from(">I", raw, 4)[0], data)
        else:
            buf.take(len(raw))
            match want:
                case _ if want is CapabilityResult:
                    resp = CapabilityResult(result, struct.unpack_from(">I", raw, 4)[0])
                case _ if want is EstablishedResult:
                    resp = EstablishedResult(result, bool(raw[4] & 1))
                case _ if want is ConfigResult:
                    resp = ConfigResult(result, struct.unpack_from(">I", raw, 4)[0])
                case _ if want is BufferSizeResult:
                    resp = BufferSizeResult(result, *struct.unpack_from(">III", raw, 4))
                case _:
                    resp = Result(result)
        self._pending = None
        return resp
