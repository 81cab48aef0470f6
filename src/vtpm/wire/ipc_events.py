"""The Manager IPC's vocabulary: message types, roles and events with their field rules.

Each event is a frozen, slotted dataclass that checks its fields on construction
(LocalProtocolError). The wire layout of each message and the codec are in `vtpm.wire.ipc`;
the JSON rules in `vtpm.wire.ipc_json`. PCR banks and their digest sizes are
`vtpm.tpm.constants.DIGEST_SIZES`.
"""

from __future__ import annotations

import enum
import re
import uuid
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from vtpm.errors import LocalProtocolError
from vtpm.tpm.constants import DIGEST_SIZES
from vtpm.tpm.ektemplates import CERT_KINDS
from vtpm.wire.ipc_json import JSONValue, check_json, check_text

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_FRAME: Final = 65536
MIN_MAX_FRAME: Final = 1025  # type byte + the longest Refused reason
MAX_LENGTH: Final = 0xFFFFFFFF
KEY_SIZE: Final = 32
DIGEST_SIZE: Final = 32
MAX_DIGESTS: Final = 8
MAX_NAME: Final = 32
MAX_REASON: Final = 1024
RESERVED_TYPES: Final = range(0x24, 0x30)
MAX_NONCE: Final = 64
MAX_EK_PUBLIC: Final = 1024  # a TPM2B_PUBLIC of an RSA 4096 key is 600 bytes
MAX_CERT: Final = 4096  # larger than any NV index of libtpms (2048)

_NAME = re.compile(r"[a-z0-9_]{1,32}")


class MessageType(enum.IntEnum):
    HELLO = 0x01
    KEY_GRANT = 0x02
    REFUSED = 0x03
    STATE_WRITTEN = 0x04
    STATE_DELETED = 0x05
    ACK = 0x06
    GOODBYE = 0x07
    READY = 0x08
    TPM_HEALTH = 0x09
    CERT_REQUEST = 0x0A
    CERT_REPLY = 0x0B
    ADMIN_REQUEST = 0x10
    ADMIN_REPLY = 0x11
    QUOTE_REQUEST = 0x20
    QUOTE_REPLY = 0x21
    PCR_REQUEST = 0x22
    PCR_REPLY = 0x23


class Role(enum.Enum):
    MANAGER = "manager"
    PEER = "peer"


# validation of field values ------------------------------------------------------------------


def _check_bytes(what: str, value: object, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        raise LocalProtocolError(f"{what} must be exactly {size} bytes")


def _check_name(what: str, name: object) -> None:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise LocalProtocolError(f"{what} {name!r} is not 1..{MAX_NAME} of [a-z0-9_]")


# events ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """An instance introduces itself and asks for its state key."""

    vtpm_uuid: uuid.UUID
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not isinstance(self.vtpm_uuid, uuid.UUID):
            raise LocalProtocolError("Hello.vtpm_uuid must be a uuid.UUID")
        if self.version != PROTOCOL_VERSION or type(self.version) is not int:
            raise LocalProtocolError(f"protocol version {self.version!r} is not {PROTOCOL_VERSION}")


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """The state key and the digest of each stored state blob, by name. The key never
    appears in the repr."""

    key: bytes = field(repr=False)
    digests: tuple[tuple[str, bytes], ...] = ()

    def __post_init__(self) -> None:
        _check_bytes("KeyGrant.key", self.key, KEY_SIZE)
        if not isinstance(self.digests, tuple):
            raise LocalProtocolError("KeyGrant.digests must be a tuple of (name, digest)")
        if len(self.digests) > MAX_DIGESTS:
            raise LocalProtocolError(f"KeyGrant carries more than {MAX_DIGESTS} digests")
        seen: set[str] = set()
        for entry in self.digests:
            if not isinstance(entry, tuple) or len(entry) != 2:
                raise LocalProtocolError("KeyGrant.digests entries must be (name, digest)")
            name, digest = entry
            _check_name("KeyGrant name", name)
            _check_bytes(f"KeyGrant digest of {name}", digest, DIGEST_SIZE)
            if name in seen:
                raise LocalProtocolError(f"KeyGrant names {name!r} twice")
            seen.add(name)


@dataclass(frozen=True, slots=True)
class Refused:
    """The Manager will not serve this instance; the reason is for the log."""

    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.reason, str):
            raise LocalProtocolError("Refused.reason must be a str")
        check_text("Refused.reason", self.reason)
        if len(self.reason.encode("utf-8")) > MAX_REASON:
            raise LocalProtocolError(f"Refused.reason is longer than {MAX_REASON} bytes")


@dataclass(frozen=True, slots=True)
class StateWritten:
    """The instance stored state blob `name` at `counter` with this SHA-256 digest."""

    name: str
    counter: int
    digest: bytes

    def __post_init__(self) -> None:
        _check_name("StateWritten.name", self.name)
        if type(self.counter) is not int or not 0 <= self.counter <= 0xFFFFFFFFFFFFFFFF:
            raise LocalProtocolError(f"StateWritten.counter {self.counter!r} is not a u64")
        _check_bytes("StateWritten.digest", self.digest, DIGEST_SIZE)


@dataclass(frozen=True, slots=True)
class StateDeleted:
    """The instance deleted state blob `name`."""

    name: str

    def __post_init__(self) -> None:
        _check_name("StateDeleted.name", self.name)


@dataclass(frozen=True, slots=True)
class Ack:
    """The Manager recorded a StateWritten / StateDeleted."""


@dataclass(frozen=True, slots=True)
class Goodbye:
    """The instance exits in order, all its state stored."""


def _check_mask(what: str, pcrs: object) -> None:
    if not isinstance(pcrs, tuple) or any(type(i) is not int for i in pcrs):
        raise LocalProtocolError(f"{what} must be a tuple of PCR indices")
    if list(pcrs) != sorted(set(pcrs)) or (pcrs and not 0 <= pcrs[0] <= pcrs[-1] <= 23):
        raise LocalProtocolError(f"{what} must be increasing PCR indices in 0..23")


def _check_values(what: str, bank: object, values: object) -> None:
    # an int or a TPM_ALG member (an IntEnum), never a bool
    if not isinstance(bank, int) or isinstance(bank, bool) or bank not in DIGEST_SIZES:
        raise LocalProtocolError(f"{what}: unknown PCR bank {bank!r}")
    if not isinstance(values, tuple):
        raise LocalProtocolError(f"{what} must be a tuple of (index, digest)")
    _check_mask(what, tuple(v[0] if isinstance(v, tuple) and v else -1 for v in values))
    for entry in values:
        if len(entry) != 2:
            raise LocalProtocolError(f"{what} entries are (index, digest)")
        _check_bytes(f"{what} digest", entry[1], DIGEST_SIZES[bank])


@dataclass(frozen=True, slots=True)
class QuoteRequest:
    """A deep quote asked for from inside the guest: the vTPM's own PCR values come along."""

    nonce: bytes
    host_pcrs: tuple[int, ...]
    bank: int
    pcrs: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        if not isinstance(self.nonce, bytes) or not 1 <= len(self.nonce) <= MAX_NONCE:
            raise LocalProtocolError(f"QuoteRequest.nonce must be 1..{MAX_NONCE} bytes")
        _check_mask("QuoteRequest.host_pcrs", self.host_pcrs)
        _check_values("QuoteRequest.pcrs", self.bank, self.pcrs)


@dataclass(frozen=True, slots=True)
class QuoteReply:
    """The deep-quote evidence (compact binary) or, when empty, a refusal."""

    evidence: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.evidence, bytes):
            raise LocalProtocolError("QuoteReply.evidence must be bytes")


@dataclass(frozen=True, slots=True)
class PcrRequest:
    """The Manager asks an instance for its current PCR values."""

    bank: int
    pcrs: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_values("PcrRequest", self.bank, ())
        _check_mask("PcrRequest.pcrs", self.pcrs)


@dataclass(frozen=True, slots=True)
class PcrReply:
    bank: int
    pcrs: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        _check_values("PcrReply.pcrs", self.bank, self.pcrs)


@dataclass(frozen=True, slots=True)
class Ready:
    """The instance has started its TPM and its frontends listen."""


@dataclass(frozen=True, slots=True)
class TpmHealth:
    """The instance's TPM cannot serve (`failed`: a state write fails, libtpms is in failure
    mode; `reason` says which, for `vtpm status`), or serves again (`failed` False, no reason).
    Sent when it changes; a new instance process starts healthy."""

    failed: bool
    reason: str = ""

    def __post_init__(self) -> None:
        if type(self.failed) is not bool:
            raise LocalProtocolError("TpmHealth.failed must be a bool")
        if not isinstance(self.reason, str):
            raise LocalProtocolError("TpmHealth.reason must be a str")
        check_text("TpmHealth.reason", self.reason)
        if len(self.reason.encode("utf-8")) > MAX_REASON:
            raise LocalProtocolError(f"TpmHealth.reason is longer than {MAX_REASON} bytes")
        if not self.failed and self.reason:
            raise LocalProtocolError("a healthy TpmHealth carries no reason")


@dataclass(frozen=True, slots=True)
class CertRequest:
    """The instance asks its group CA for a certificate: `kind` (one of
    `ektemplates.CERT_KINDS`) for the EK whose TPM2B_PUBLIC is `ek_public` (for "platform",
    the RSA EK's, the platform certificate's subject key)."""

    kind: str
    ek_public: bytes

    def __post_init__(self) -> None:
        if self.kind not in CERT_KINDS:
            raise LocalProtocolError(f"CertRequest.kind {self.kind!r} is not one of {CERT_KINDS}")
        pub = self.ek_public
        if not isinstance(pub, bytes) or not 2 < len(pub) <= MAX_EK_PUBLIC:
            raise LocalProtocolError(f"CertRequest.ek_public must be 3..{MAX_EK_PUBLIC} bytes")
        if int.from_bytes(pub[:2], "big") != len(pub) - 2:
            raise LocalProtocolError("CertRequest.ek_public is not one TPM2B_PUBLIC")


@dataclass(frozen=True, slots=True)
class CertReply:
    """The certificate (DER) the CA issued; a refusal is a `Refused`."""

    certificate: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.certificate, bytes) or not 0 < len(self.certificate) <= MAX_CERT:
            raise LocalProtocolError(f"CertReply.certificate must be 1..{MAX_CERT} bytes")


@dataclass(frozen=True, slots=True)
class AdminRequest:
    """An administrator's request: an operation name and its arguments."""

    op: str
    args: dict[str, JSONValue]

    def __post_init__(self) -> None:
        if not isinstance(self.op, str) or not self.op:
            raise LocalProtocolError("AdminRequest.op must be a non-empty str")
        check_text("AdminRequest.op", self.op)
        if type(self.args) is not dict:
            raise LocalProtocolError("AdminRequest.args must be a dict")
        check_json("AdminRequest.args", self.args)


@dataclass(frozen=True, slots=True)
class AdminReply:
    """The Manager's answer: a result on success, an error message on failure."""

    ok: bool
    result: JSONValue = None
    error: str = ""

    def __post_init__(self) -> None:
        if type(self.ok) is not bool:
            raise LocalProtocolError("AdminReply.ok must be a bool")
        if not isinstance(self.error, str):
            raise LocalProtocolError("AdminReply.error must be a str")
        if self.ok and self.error:
            raise LocalProtocolError("a successful AdminReply carries no error")
        if not self.ok and self.result is not None:
            raise LocalProtocolError("a failed AdminReply carries no result")
        check_text("AdminReply.error", self.error)
        check_json("AdminReply.result", self.result)


PeerEvent: TypeAlias = (
    Hello
    | StateWritten
    | StateDeleted
    | Goodbye
    | Ready
    | TpmHealth
    | CertRequest
    | AdminRequest
    | QuoteRequest
    | PcrReply
)
"""What a PEER sends and the MANAGER receives."""
ManagerEvent: TypeAlias = (
    KeyGrant | Refused | Ack | AdminReply | QuoteReply | PcrRequest | CertReply
)
"""What the MANAGER sends and a PEER receives."""
Event: TypeAlias = PeerEvent | ManagerEvent
