"""Typed requests over the Manager IPC framing, for every protocol that has them (the admin
protocol, `vtpm.wire.admin`, and the front door's, `vtpm.wire.compat`).

A request is a frozen dataclass deriving from `Request[R]`: its `op` names it on the wire, its
`result` is the type of what answers it. It travels as `AdminRequest(op, args)` and its result as
`AdminReply(ok=True, result)`, both in the JSON form `vtpm.wire.typedjson` gives the dataclasses.
A request that fails its types is a `RequestError` (the receiving side answers it); a result that
fails them is a `RemoteProtocolError` (the peer spoke outside the protocol).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Generic, TypeVar

from vtpm.errors import RemoteProtocolError, RequestError
from vtpm.wire.ipc_events import AdminReply, AdminRequest
from vtpm.wire.typedjson import DecodeError, decode, encode

R = TypeVar("R")


class Request(Generic[R]):
    """Base of every request; `op` names it on the wire, `result` is what answers it."""

    op: ClassVar[str]
    result: ClassVar[Any]


def request_frame(req: Request[Any]) -> AdminRequest:
    """The IPC event that carries `req` (fields left at None are left out)."""
    args = encode(req)
    assert isinstance(args, dict)
    return AdminRequest(req.op, {k: v for k, v in args.items() if v is not None})


def parse_request(
    table: Mapping[str, type[Request[Any]]], frame: AdminRequest, unknown: str
) -> Request[Any]:
    """The typed request in `frame`, its class looked up in `table`; RequestError naming the
    problem (`unknown`: what an op missing from the table is called)."""
    cls = table.get(frame.op)
    if cls is None:
        raise RequestError(f"unknown {unknown} {frame.op!r}")
    try:
        req: Request[Any] = decode(dict(frame.args), cls, frame.op)
    except DecodeError as e:
        raise RequestError(f"bad request: {e}") from None
    return req


def reply_frame(result: object) -> AdminReply:
    return AdminReply(True, encode(result))


def parse_result(cls: Any, reply: AdminReply, what: str) -> Any:
    """The result of type `cls` in `reply` (ok); RemoteProtocolError if it has another form."""
    try:
        return decode(reply.result, cls, what)
    except DecodeError as e:
        raise RemoteProtocolError(f"the Manager answered outside the protocol: {e}") from None
