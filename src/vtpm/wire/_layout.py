"""Layout tables for the request/answer protocols of fixed binary fields (the swtpm control
channel and the mssim ports): one `Layout` per message, used to encode it and to decode it, and
one `Exchange` per command code (its request's layout and its answer's), so that a protocol is
written down once, as data, and both directions and both sides read the same table.

A message is: a constant prefix (the command code, for requests), fixed big-endian fields in
the order of a struct format, optionally a byte string whose u32 length is the format's last
field, and optionally a constant trailer (mssim's closing u32 0).

`Layout.decode` is the one point where peer bytes become events of these protocols: a length
above its bound is refused as soon as the fixed part is in (whether or not the rest has
arrived), a wrong trailer is refused, and an event's own `LocalProtocolError` raised by peer
values is turned into `RemoteProtocolError` there. `RequestServer` and `RequestClient` drive a
table: one request in flight, an unknown code is a `RemoteProtocolError`, a command may end the
session (with or without an answer), and nothing may follow the end.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import cast

from vtpm.errors import LocalProtocolError, RemoteProtocolError
from vtpm.wire._common import CLOSED, NEED_DATA, ReceiveBuffer, Sentinel

ACK = b"\x00\x00\x00\x00"


def check_uint(name: str, value: object, bits: int = 32) -> None:
    """LocalProtocolError unless `value` is an int that fits in `bits` unsigned bits."""
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise LocalProtocolError(f"{name}={value!r} does not fit in {bits} bits")


def code_bytes(code: int) -> bytes:
    return struct.pack(">I", code)


@dataclass(frozen=True, slots=True)
class Layout:
    """The wire layout of one message, for both directions.

    `fields` name the event's attributes packed by `fmt` (without the `>`), in order; when
    `tail` names a bytes attribute, `fmt` ends with one more u32, its length, bounded by
    `bound` (or, when None, by the connection's bound). `fixed` are constructor arguments the
    layout implies (the code of a signal), `convert` maps a decoded value to the event's.
    """

    event: Callable[..., object]
    fmt: str = ""
    fields: tuple[str, ...] = ()
    tail: str | None = None
    bound: int | None = None
    tail_what: str = "data"
    prefix: bytes = b""
    trailer: bytes = b""
    fixed: tuple[tuple[str, object], ...] = ()
    convert: tuple[tuple[str, Callable[[int], object]], ...] = ()
    head: struct.Struct = field(init=False, repr=False, compare=False)
    size: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        head = struct.Struct(">" + self.fmt)
        count = len(head.unpack(bytes(head.size)))
        if count != len(self.fields) + (self.tail is not None):
            raise LocalProtocolError(f"layout {self.fmt!r} does not match fields {self.fields}")
        object.__setattr__(self, "head", head)
        object.__setattr__(self, "size", len(self.prefix) + head.size)

    @property
    def name(self) -> str:
        return _name(self.event)

    def encode(self, ev: object) -> bytes:
        values = [getattr(ev, name) for name in self.fields]
        try:
            if self.tail is None:
                return self.prefix + self.head.pack(*values) + self.trailer
            data: bytes = getattr(ev, self.tail)
            return self.prefix + self.head.pack(*values, len(data)) + data + self.trailer
        except struct.error as exc:  # a value the event's own checks let through
            raise LocalProtocolError(f"cannot encode {type(ev).__name__}: {exc}") from exc

    def zero_filled(self, lead: int) -> bytes:
        """The layout's fixed size with `lead` as its first u32 and zeros after (an error
        answer that keeps the size a client reads)."""
        return struct.pack(">I", lead) + bytes(self.size - 4) + self.trailer

    def decode(self, buf: ReceiveBuffer, bound: int) -> object:
        """The message at the head of `buf` (its prefix already matched), or NEED_DATA."""
        raw = buf.peek(self.size)
        if raw is None:
            return NEED_DATA
        values = self.head.unpack_from(raw, len(self.prefix))
        total = self.size + len(self.trailer)
        n = 0
        if self.tail is not None:
            n = values[-1]
            limit = bound if self.bound is None else self.bound
            if n > limit:
                raise RemoteProtocolError(f"{self.tail_what} of {n} bytes exceeds {limit}")
            total += n
        if len(buf) < total:
            return NEED_DATA
        frame = buf.take(total)
        if self.trailer and frame[total - len(self.trailer) :] != self.trailer:
            got = frame[total - len(self.trailer) :].hex()
            raise RemoteProtocolError(f"answer ends with {got}, not the 0 acknowledgement")
        kwargs = dict(self.fixed)
        kwargs.update(zip(self.fields, values, strict=False))
        for name, fn in self.convert:
            kwargs[name] = fn(cast(int, kwargs[name]))
        if self.tail is not None:
            kwargs[self.tail] = frame[self.size : self.size + n]
        try:
            return self.event(**kwargs)
        except LocalProtocolError as exc:  # the event's own checks, failed by peer values
            raise RemoteProtocolError(f"bad {self.name}: {exc}") from exc


def _name(event: Callable[..., object]) -> str:
    return getattr(event, "__name__", repr(event))


@dataclass(frozen=True, slots=True)
class Exchange:
    """One command: what the request looks like, what answers it (None: nothing does) and
    whether the session ends with it (after its answer, if it has one)."""

    name: str
    request: Layout
    answer: Layout | None
    ends: bool = False
    code: int = 0


class RequestServer:
    """Decodes requests by the table's layouts, encodes their answers; one in flight."""

    _protocol = "request"
    _unknown = "unknown command {code}"
    _after_end = "data after the end of the session"

    def __init__(self, table: Mapping[int, Exchange], limit: int, bound: int) -> None:
        self._table = table
        self._buf = ReceiveBuffer(limit)
        self._bound = bound
        self._pending: Exchange | None = None
        self._ended = False

    def receive_data(self, data: bytes) -> None:
        self._buf.feed(data)

    def _ready(self) -> bool:
        """Whether the next command code may be read (a hook for stream-level rules)."""
        return True

    def _next(self) -> tuple[Exchange, object] | Sentinel:
        buf = self._buf
        if self._pending is not None:
            return NEED_DATA
        if self._ended:
            if len(buf):
                raise RemoteProtocolError(self._after_end)
            return CLOSED if buf.eof else NEED_DATA
        if not self._ready():
            return NEED_DATA
        code = buf.peek_u32()
        if code is None:
            if buf.eof:
                if len(buf):
                    raise RemoteProtocolError("connection closed inside a command code")
                return CLOSED
            return NEED_DATA
        ex = self._table.get(code)
        if ex is None:
            raise RemoteProtocolError(self._unknown.format(code=code))
        ev = ex.request.decode(buf, self._bound)
        if ev is NEED_DATA:
            if buf.eof:
                raise RemoteProtocolError(f"connection closed inside {ex.name}")
            return NEED_DATA
        if ex.answer is None:
            self._ended = self._ended or ex.ends
        else:
            self._pending = ex
        return ex, ev

    def _encode_answer(self, ex: Exchange, answer: object) -> bytes:
        layout = ex.answer
        assert layout is not None
        if type(answer) is not layout.event:
            raise LocalProtocolError(
                f"{ex.name} is answered by {layout.name}, not {type(answer).__name__}"
            )
        return layout.encode(answer)

    def _send(self, answer: object) -> bytes:
        ex = self._pending
        if ex is None:
            raise LocalProtocolError(f"no {self._protocol} request is waiting for an answer")
        out = self._encode_answer(ex, answer)
        self._ended = ex.ends
        self._pending = None
        return out


class RequestClient:
    """Encodes requests by the table's layouts, decodes their answers; one in flight."""

    _protocol = "request"

    def __init__(self, by_key: Mapping[object, Exchange], limit: int, bound: int) -> None:
        self._by_key = by_key
        self._buf = ReceiveBuffer(limit)
        self._bound = bound
        self._pending: Exchange | None = None

    def _key(self, request: object) -> object:
        return type(request)

    def _encode_request(self, ex: Exchange, request: object) -> bytes:
        return ex.request.encode(request)

    def _send(self, request: object) -> bytes:
        if self._pending is not None:
            raise LocalProtocolError(f"a {self._protocol} request is already in flight")
        ex = self._by_key.get(self._key(request))
        if ex is None:
            raise LocalProtocolError(f"{type(request).__name__} is not a {self._protocol} request")
        out = self._encode_request(ex, request)
        if ex.answer is not None:
            self._pending = ex
        return out

    def receive_data(self, data: bytes) -> None:
        self._buf.feed(data)

    def _next(self) -> object:
        buf = self._buf
        ex = self._pending
        if ex is None:
            if len(buf):
                raise RemoteProtocolError("answer without a request")
            return CLOSED if buf.eof else NEED_DATA
        assert ex.answer is not None
        ev = ex.answer.decode(buf, self._bound)
        if ev is NEED_DATA:
            if buf.eof:
                raise RemoteProtocolError("connection closed inside an answer")
            return NEED_DATA
        self._pending = None
        return ev
