"""The vTPM Manager IPC protocol, sans-IO, both sides.

Two uses, one framing: (a) key custody between a vTPM instance process and the Manager over
a socketpair, (b) administrator requests to the Manager over a UNIX socket.

Framing: u32 big-endian length L, then L bytes: u8 message type and a body of L - 1 bytes.
1 <= L <= max_frame (a constructor argument, default 65536, at least 1025 so that every
custody message fits, at most 2**32 - 1). A length outside that range is refused as soon as
its 4 bytes are in, without waiting for the body; a type byte is judged as soon as it is in.
The receive buffer holds at most one incomplete frame plus one read of up to 256 KiB: an
adapter drains `next_event` after each `receive_data`.

Messages (type: layout; names are 1..32 of [a-z0-9_], multi-byte integers big-endian):
  0x01 Hello         peer → manager   u8 version (must be 1) | 16-byte vTPM UUID
  0x02 KeyGrant      manager → peer   32-byte state key | u8 n (n <= 8) |
                                      n x (u8 name length | name | 32-byte digest),
                                      no name twice
  0x03 Refused       manager → peer   UTF-8 reason, 0..1024 bytes
  0x04 StateWritten  peer → manager   u8 name length | name | u64 counter | 32-byte SHA-256
  0x05 StateDeleted  peer → manager   u8 name length | name
  0x06 Ack           manager → peer   empty
  0x07 Goodbye       peer → manager   empty (orderly exit, all state stored)
  0x08 Ready         peer → manager   empty (the instance's frontends listen)
  0x09 TpmHealth     peer → manager   u8 failed (0 or 1) | UTF-8 reason, 0..1024 bytes, empty
                                      when 0 (the TPM cannot serve / serves again)
  0x0A CertRequest   peer → manager   u8 kind length | kind | the EK's TPM2B_PUBLIC (3..1024)
  0x0B CertReply     manager → peer   the certificate, DER, 1..4096 bytes (events check both)
  0x10 AdminRequest  peer → manager   UTF-8 JSON {"args": {...}, "op": "<non-empty>"}
  0x11 AdminReply    manager → peer   UTF-8 JSON {"ok": true, "result": ...} or
                                      {"error": "...", "ok": false}
  0x20 QuoteRequest  peer → manager   u16 nonce length (1..64) | nonce | u32 host PCR mask |
                                      PCR values (a deep quote asked from inside the guest)
  0x21 QuoteReply    manager → peer   the evidence, compact binary (`vtpm.wire.evidence`)
  0x22 PcrRequest    manager → peer   u16 bank | u32 PCR mask (the vTPM's PCRs, please)
  0x23 PcrReply      peer → manager   PCR values
  PCR values: u16 bank (TPM_ALG_ID) | u8 n (<= 24) | n x (u8 index | digest of the bank's
  size), indices strictly increasing. 0x24..0x2f are reserved.

JSON is sent canonically (sorted keys, no blanks, UTF-8 rather than \\u escapes) and read
leniently as to layout, strictly as to content: exactly the keys above, no key twice in an
object, no NaN or Infinity, integers within -2**63..2**64-1, containers nested at most 32
deep inside "args" / "result", strings that are valid Unicode (`vtpm.wire.ipc_json`).

Roles: the MANAGER receives Hello, StateWritten, StateDeleted, Goodbye, Ready, TpmHealth,
CertRequest, AdminRequest, QuoteRequest, PcrReply and sends the others; the PEER (instance or
admin client) the reverse. The events and their field rules (cert kinds: `ektemplates`) are in
`vtpm.wire.ipc_events` (re-exported here); PCR banks and digest sizes: `constants.DIGEST_SIZES`.
The order of messages is the adapter's business; this codec only checks direction and layout.

Errors: bytes that break these rules (a bad length or type, a type the role does not receive,
a body of the wrong size or content, a frame cut by end of stream, bytes after it) raise
`RemoteProtocolError` from `receive_data` / `next_event`. Building an invalid event, or
sending one the role may not send or one that does not fit in max_frame, raises
`LocalProtocolError`.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Callable
from typing import Final, cast

from vtpm.errors import LocalProtocolError, RemoteProtocolError
from vtpm.wire import ipc_pcrs
from vtpm.wire._common import CLOSED, NEED_DATA, ReceiveBuffer, Sentinel
from vtpm.wire.ipc_events import (
    DEFAULT_MAX_FRAME,
    DIGEST_SIZE,
    KEY_SIZE,
    MAX_DIGESTS,
    MAX_LENGTH,
    MAX_NAME,
    MAX_NONCE,
    MAX_REASON,
    MIN_MAX_FRAME,
    PROTOCOL_VERSION,
    RESERVED_TYPES,
    Ack,
    AdminReply,
    AdminRequest,
    CertReply,
    CertRequest,
    Event,
    Goodbye,
    Hello,
    KeyGrant,
    ManagerEvent,
    MessageType,
    PcrReply,
    PcrRequest,
    PeerEvent,
    QuoteReply,
    QuoteRequest,
    Ready,
    Refused,
    Role,
    StateDeleted,
    StateWritten,
    TpmHealth,
)
from vtpm.wire.ipc_json import (
    MAX_JSON_DEPTH,
    MAX_JSON_INT,
    MIN_JSON_INT,
    JSONValue,
    check_json,
    dump_json,
    expect_keys,
    load_object,
)

__all__ = [
    "Ack",
    "AdminReply",
    "AdminRequest",
    "CertReply",
    "CertRequest",
    "DEFAULT_MAX_FRAME",
    "DIGEST_SIZE",
    "Event",
    "Goodbye",
    "Hello",
    "IpcConnection",
    "JSONValue",
    "KEY_SIZE",
    "KeyGrant",
    "MAX_DIGESTS",
    "MAX_JSON_DEPTH",
    "MAX_JSON_INT",
    "MAX_LENGTH",
    "MAX_NAME",
    "MAX_NONCE",
    "MAX_REASON",
    "MIN_JSON_INT",
    "MIN_MAX_FRAME",
    "ManagerEvent",
    "MessageType",
    "PROTOCOL_VERSION",
    "PcrReply",
    "PcrRequest",
    "PeerEvent",
    "QuoteReply",
    "QuoteRequest",
    "RESERVED_TYPES",
    "Ready",
    "Refused",
    "Role",
    "StateDeleted",
    "StateWritten",
    "TpmHealth",
]

# A sans-IO buffer cannot refuse bytes it is handed, so it bounds what it holds: one
# incomplete frame plus one read of at most 256 KiB (the adapters read 64 KiB at a time).
_MAX_READ: Final = 1 << 18
_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">IB")
_COUNTER = struct.Struct(">Q")

# encoding --------------------------------------------------------------------------------------


def _name_bytes(name: str) -> bytes:
    raw = name.encode("ascii")
    return bytes([len(raw)]) + raw


def _encode_body(event: Event) -> bytes:
    match event:
        case Hello(vtpm_uuid=vtpm_uuid, version=version):
            return bytes([version]) + vtpm_uuid.bytes
        case KeyGrant(key=key, digests=digests):
            parts = [key, bytes([len(digests)])]
            for name, digest in digests:
                parts += [_name_bytes(name), digest]
            return b"".join(parts)
        case Refused(reason=reason):
            return reason.encode("utf-8")
        case StateWritten(name=name, counter=counter, digest=digest):
            return _name_bytes(name) + _COUNTER.pack(counter) + digest
        case StateDeleted(name=name):
            return _name_bytes(name)
        case Ack() | Goodbye() | Ready():
            return b""
        case TpmHealth(failed=failed, reason=reason):
            return bytes([failed]) + reason.encode("utf-8")
        case CertRequest(kind=kind, ek_public=ek_public):
            return _name_bytes(kind) + ek_public
        case AdminRequest(op=op, args=args):
            check_json("AdminRequest.args", args)
            return dump_json("AdminRequest", {"args": args, "op": op})
        case AdminReply(ok=True, result=result):
            check_json("AdminReply.result", result)
            return dump_json("AdminReply", {"ok": True, "result": result})
        case AdminReply(error=error):
            return dump_json("AdminReply", {"error": error, "ok": False})
        case QuoteRequest(nonce=nonce, host_pcrs=host, bank=bank, pcrs=pcrs):
            head = struct.pack(">H", len(nonce)) + nonce + struct.pack(">I", ipc_pcrs.mask(host))
            return head + ipc_pcrs.values_bytes(bank, pcrs)
        case QuoteReply(evidence=raw) | CertReply(certificate=raw):
            return raw
        case PcrRequest(bank=bank, pcrs=pcrs):
            return struct.pack(">HI", bank, ipc_pcrs.mask(pcrs))
        case PcrReply(bank=bank, pcrs=pcrs):
            return ipc_pcrs.values_bytes(bank, pcrs)
    raise LocalProtocolError(f"cannot encode {type(event).__name__}")


# decoding: every function here sees only peer bytes and raises only RemoteProtocolError (or
# LocalProtocolError from an event's own checks, which `next_event` turns into the former) --


def _expect_size(body: bytes, size: int, what: str) -> None:
    if len(body) != size:
        raise RemoteProtocolError(f"{what} body is {len(body)} bytes, not {size}")


def _take_name(body: bytes, pos: int, what: str) -> tuple[str, int]:
    """The length-prefixed name at `pos` and the position after it."""
    if pos >= len(body):
        raise RemoteProtocolError(f"{what} body ends before a name length")
    end = pos + 1 + body[pos]
    if end > len(body):
        raise RemoteProtocolError(f"{what} body ends inside a name")
    try:
        name = body[pos + 1 : end].decode("ascii")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"{what} name is not ASCII") from exc
    return name, end


def _decode_hello(body: bytes) -> Hello:
    _expect_size(body, 1 + 16, "Hello")
    if body[0] != PROTOCOL_VERSION:
        raise RemoteProtocolError(f"Hello speaks protocol version {body[0]}, not 1")
    return Hello(uuid.UUID(bytes=body[1:]), body[0])


def _decode_key_grant(body: bytes) -> KeyGrant:
    if len(body) < KEY_SIZE + 1:
        raise RemoteProtocolError(f"KeyGrant body of {len(body)} bytes has no key and count")
    count = body[KEY_SIZE]
    if count > MAX_DIGESTS:
        raise RemoteProtocolError(f"KeyGrant announces {count} digests, at most {MAX_DIGESTS}")
    digests: list[tuple[str, bytes]] = []
    pos = KEY_SIZE + 1
    for _ in range(count):
        name, pos = _take_name(body, pos, "KeyGrant")
        if pos + DIGEST_SIZE > len(body):
            raise RemoteProtocolError("KeyGrant body ends inside a digest")
        digests.append((name, body[pos : pos + DIGEST_SIZE]))
        pos += DIGEST_SIZE
    if pos != len(body):
        raise RemoteProtocolError(f"KeyGrant body has {len(body) - pos} bytes too many")
    return KeyGrant(body[:KEY_SIZE], tuple(digests))


def _reason(body: bytes, what: str) -> str:
    if len(body) > MAX_REASON:
        raise RemoteProtocolError(f"{what} reason of {len(body)} bytes exceeds {MAX_REASON}")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"{what} reason is not UTF-8") from exc


def _decode_refused(body: bytes) -> Refused:
    return Refused(_reason(body, "Refused"))


def _decode_tpm_health(body: bytes) -> TpmHealth:
    if not body or body[0] > 1:
        raise RemoteProtocolError("TpmHealth body does not start with 0 or 1")
    return TpmHealth(body[0] == 1, _reason(body[1:], "TpmHealth"))


def _empty(event: type[Ack | Goodbye | Ready]) -> Callable[[bytes], Event]:
    """The decoder of a message with an empty body."""

    def decode(body: bytes) -> Event:
        _expect_size(body, 0, event.__name__)
        return event()

    return decode


def _decode_state_written(body: bytes) -> StateWritten:
    name, pos = _take_name(body, 0, "StateWritten")
    _expect_size(body, pos + _COUNTER.size + DIGEST_SIZE, "StateWritten")
    (counter,) = _COUNTER.unpack_from(body, pos)
    return StateWritten(name, counter, body[pos + _COUNTER.size :])


def _decode_state_deleted(body: bytes) -> StateDeleted:
    name, pos = _take_name(body, 0, "StateDeleted")
    _expect_size(body, pos, "StateDeleted")
    return StateDeleted(name)


def _decode_cert_request(body: bytes) -> CertRequest:
    kind, pos = _take_name(body, 0, "CertRequest")
    return CertRequest(kind, body[pos:])


def _decode_quote_request(body: bytes) -> QuoteRequest:
    if len(body) < 2:
        raise RemoteProtocolError("QuoteRequest body has no nonce length")
    (n,) = struct.unpack_from(">H", body)
    if len(body) < 2 + n + 4:
        raise RemoteProtocolError("QuoteRequest body ends inside its nonce or PCR mask")
    nonce = body[2 : 2 + n]
    (mask,) = struct.unpack_from(">I", body, 2 + n)
    bank, values = ipc_pcrs.take_values(body, 2 + n + 4, "QuoteRequest")
    return QuoteRequest(nonce, ipc_pcrs.unmask(mask, "QuoteRequest"), bank, values)


def _decode_pcr_request(body: bytes) -> PcrRequest:
    _expect_size(body, 6, "PcrRequest")
    bank, mask = struct.unpack(">HI", body)
    return PcrRequest(bank, ipc_pcrs.unmask(mask, "PcrRequest"))


def _decode_pcr_reply(body: bytes) -> PcrReply:
    bank, values = ipc_pcrs.take_values(body, 0, "PcrReply")
    return PcrReply(bank, values)


def _decode_admin_request(body: bytes) -> AdminRequest:
    obj = load_object(body, "AdminRequest")
    expect_keys(obj, {"op", "args"}, "AdminRequest")
    op, args = obj["op"], obj["args"]
    if not isinstance(op, str) or not op:
        raise RemoteProtocolError("AdminRequest op is not a non-empty string")
    if not isinstance(args, dict):
        raise RemoteProtocolError("AdminRequest args is not an object")
    return AdminRequest(op, args)


def _decode_admin_reply(body: bytes) -> AdminReply:
    obj = load_object(body, "AdminReply")
    ok = obj.get("ok")
    if ok is True:
        expect_keys(obj, {"ok", "result"}, "AdminReply")
        # AdminReply checks that the result is JSON data within the bounds
        return AdminReply(True, cast("JSONValue", obj["result"]))
    if ok is False:
        expect_keys(obj, {"ok", "error"}, "AdminReply")
        error = obj["error"]
        if not isinstance(error, str):
            raise RemoteProtocolError("AdminReply error is not a string")
        return AdminReply(False, error=error)
    raise RemoteProtocolError("AdminReply ok is not true or false")


# the protocol as data: per message type, its event, the role that sends it, its decoder -----

_MESSAGES: dict[MessageType, tuple[type[Event], Role, Callable[[bytes], Event]]] = {
    MessageType.HELLO: (Hello, Role.PEER, _decode_hello),
    MessageType.KEY_GRANT: (KeyGrant, Role.MANAGER, _decode_key_grant),
    MessageType.REFUSED: (Refused, Role.MANAGER, _decode_refused),
    MessageType.STATE_WRITTEN: (StateWritten, Role.PEER, _decode_state_written),
    MessageType.STATE_DELETED: (StateDeleted, Role.PEER, _decode_state_deleted),
    MessageType.ACK: (Ack, Role.MANAGER, _empty(Ack)),
    MessageType.GOODBYE: (Goodbye, Role.PEER, _empty(Goodbye)),
    MessageType.READY: (Ready, Role.PEER, _empty(Ready)),
    MessageType.TPM_HEALTH: (TpmHealth, Role.PEER, _decode_tpm_health),
    MessageType.CERT_REQUEST: (CertRequest, Role.PEER, _decode_cert_request),
    MessageType.CERT_REPLY: (CertReply, Role.MANAGER, CertReply),
    MessageType.ADMIN_REQUEST: (AdminRequest, Role.PEER, _decode_admin_request),
    MessageType.ADMIN_REPLY: (AdminReply, Role.MANAGER, _decode_admin_reply),
    MessageType.QUOTE_REQUEST: (QuoteRequest, Role.PEER, _decode_quote_request),
    MessageType.QUOTE_REPLY: (QuoteReply, Role.MANAGER, QuoteReply),
    MessageType.PCR_REQUEST: (PcrRequest, Role.MANAGER, _decode_pcr_request),
    MessageType.PCR_REPLY: (PcrReply, Role.PEER, _decode_pcr_reply),
}
_TYPE_OF: dict[type[Event], MessageType] = {ev: kind for kind, (ev, _, _) in _MESSAGES.items()}

# the connection --------------------------------------------------------------------------------


class IpcConnection:
    """One end of a Manager IPC stream: `role` says which messages go which way."""

    def __init__(self, role: Role, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if not isinstance(role, Role):
            raise LocalProtocolError(f"role must be a Role, not {role!r}")
        if not MIN_MAX_FRAME <= max_frame <= MAX_LENGTH:
            raise LocalProtocolError(
                f"max_frame {max_frame} is outside {MIN_MAX_FRAME}..{MAX_LENGTH}"
            )
        self.role: Final = role
        self.max_frame: Final = max_frame
        self._buf = ReceiveBuffer(_LENGTH.size + max_frame + _MAX_READ)

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the peer; b"" means the peer closed its end."""
        self._buf.feed(data)

    def next_event(self) -> Event | Sentinel:
        buf = self._buf
        length = buf.peek_u32()
        if length is None:
            if buf.eof:
                if len(buf):
                    raise RemoteProtocolError("connection closed inside a frame length")
                return CLOSED
            return NEED_DATA
        if not 1 <= length <= self.max_frame:
            raise RemoteProtocolError(f"frame length {length} is outside 1..{self.max_frame}")
        head = buf.peek(_HEADER.size)
        if head is None:
            return self._incomplete()
        kind = self._message_type(head[_LENGTH.size])
        if len(buf) < _LENGTH.size + length:
            return self._incomplete()
        body = buf.take(_LENGTH.size + length)[_HEADER.size :]
        try:
            return _MESSAGES[kind][2](body)
        except LocalProtocolError as exc:  # the event's own checks, failed by peer bytes
            raise RemoteProtocolError(f"bad {kind.name}: {exc}") from exc

    def _message_type(self, code: int) -> MessageType:
        if code in RESERVED_TYPES:
            raise RemoteProtocolError(f"message type {code:#04x} is reserved, not spoken yet")
        if code not in MessageType._value2member_map_:
            raise RemoteProtocolError(f"unknown message type {code:#04x}")
        kind = MessageType(code)
        if _MESSAGES[kind][1] is self.role:
            raise RemoteProtocolError(f"the {self.role.value} does not receive {kind.name}")
        return kind

    def _incomplete(self) -> Sentinel:
        if self._buf.eof:
            raise RemoteProtocolError("connection closed inside a frame")
        return NEED_DATA

    def send(self, event: Event) -> bytes:
        """The bytes of one frame carrying `event`."""
        kind = _TYPE_OF.get(type(event))
        if kind is None:
            raise LocalProtocolError(f"{type(event).__name__} is not a Manager IPC event")
        if _MESSAGES[kind][1] is not self.role:
            raise LocalProtocolError(f"the {self.role.value} does not send {kind.name}")
        body = _encode_body(event)
        length = 1 + len(body)
        if length > self.max_frame:
            raise LocalProtocolError(f"{kind.name} frame of {length} bytes exceeds max_frame")
        return _HEADER.pack(length, kind) + body
