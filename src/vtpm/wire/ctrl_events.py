"""The swtpm control channel's vocabulary: command codes, result codes, capability bits and
the request and response events with their field rules.

Each event is a frozen, slotted dataclass that checks its fields on construction
(LocalProtocolError). The wire layout of each command and the codec are in `vtpm.wire.ctrl`,
which re-exports every name here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vtpm.errors import LocalProtocolError
from vtpm.wire._layout import check_uint

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
    check_uint(name, value, 32)


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

    def __post_init__(self) -> None:
        _u32("result", self.result)


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

    def __post_init__(self) -> None:
        for name in ("result", "flags"):
            _u32(name, getattr(self, name))


@dataclass(frozen=True, slots=True)
class BufferSizeResult:
    result: int
    size: int
    minimum: int
    maximum: int

    def __post_init__(self) -> None:
        for name in ("result", "size", "minimum", "maximum"):
            _u32(name, getattr(self, name))


@dataclass(frozen=True, slots=True)
class InfoResult:
    result: int
    total_length: int
    data: bytes

    def __post_init__(self) -> None:
        for name in ("result", "total_length"):
            _u32(name, getattr(self, name))


Response = (
    Result
    | CapabilityResult
    | EstablishedResult
    | StateBlobResult
    | ConfigResult
    | BufferSizeResult
    | InfoResult
)
