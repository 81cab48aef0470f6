"""The one loop that drives a sans-IO codec (`vtpm.wire`) over a connected socket.

Every server and client of the project reads its peer the same way: bytes in, events out, until
the peer closes. `events()` is that loop, written once:

    for event in serving.events(conn, codec, idle_timeout=...):
        conn.sendall(codec.send(answer(event)))

Rules it keeps for every caller:
- each read is bounded (`read_size`), and the codec bounds what it buffers;
- the codec decides what the bytes mean: a protocol break is its `RemoteProtocolError`, which
  propagates to the caller (who logs it and drops that one peer);
- the peer closing ends the iteration (the codec's CLOSED); a read error or reset ends it too,
  reported as `ConnectionLostError` so the caller can tell "gone" from "broke the protocol"
  (errors of the caller's own writes stay the `OSError` they are);
- `idle_timeout`: a peer that sends nothing for that long while the loop waits for it is
  dropped (`IdleTimeoutError`, a `ConnectionLostError`), so an idle client cannot hold a
  server slot. It is set on the socket (`settimeout`), so it bounds the caller's writes too.
  Without it the socket's own timeout stays (`listen.Server` sets one on TCP peers), and
  running out of it is reported the same way.
- the codec is asked for its next event only after the caller has handled the last one (the
  loop is a generator), so a request/response codec sees strictly one request at a time.

Two hooks, for the callers that need more than the plain loop:
- `recv(n)` replaces the plain read when the caller needs more than bytes from it (the control
  channel takes the descriptors passed with SCM_RIGHTS). Without it the loop reads with
  `recv_into` a buffer it reuses: one copy per read, no fresh `read_size` allocation.
- `whole_message(data)` is the fast path for request/response codecs whose usual read holds
  exactly one whole message (raw TPM frames). The loop offers it every non-empty read; it
  claims the read only when the codec holds nothing (no bytes buffered, no message in flight)
  and the read is exactly one valid message, and then returns an event of its own, which the
  loop yields without feeding the codec; the loop then reads again (the codec still holds
  nothing). Claiming must leave the codec as if the read had gone through it
  (`FrameServerConnection.whole_command` marks the command in flight); when it returns None
  the read goes to the codec as usual.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar, overload

from vtpm.errors import VtpmError
from vtpm.wire._common import CLOSED, NEED_DATA, Sentinel

READ_SIZE = 65536

E_co = TypeVar("E_co", covariant=True)
E = TypeVar("E")
W = TypeVar("W")


class Codec(Protocol[E_co]):
    """What the loop needs of a codec: bytes in, events (or a sentinel) out.

    mypy infers the event type of a codec whose `next_event` returns one event class; for a
    union of classes it joins them to `object`. Such a caller names the type by annotating its
    codec: `requests: Codec[ctrl.Request] = codec`, then `events(conn, requests)`."""

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> E_co | Sentinel: ...


class ConnectionLostError(VtpmError):
    """The peer's connection failed or was reset while the loop read from it."""


class IdleTimeoutError(ConnectionLostError):
    """The peer sent nothing within the idle timeout."""


@overload
def events(
    conn: socket.socket,
    codec: Codec[E],
    *,
    idle_timeout: float | None = ...,
    read_size: int = ...,
    recv: Callable[[int], bytes] | None = ...,
    whole_message: None = ...,
) -> Iterator[E]: ...


@overload
def events(
    conn: socket.socket,
    codec: Codec[E],
    *,
    idle_timeout: float | None = ...,
    read_size: int = ...,
    recv: Callable[[int], bytes] | None = ...,
    whole_message: Callable[[bytes], W | None],
) -> Iterator[E | W]: ...


def events(
    conn: socket.socket,
    codec: Codec[E],
    *,
    idle_timeout: float | None = None,
    read_size: int = READ_SIZE,
    recv: Callable[[int], bytes] | None = None,
    whole_message: Callable[[bytes], W | None] | None = None,
) -> Iterator[E | W]:
    """Each event the peer sends on `conn`, until it closes its end (see the module's rules)."""
    if idle_timeout is not None:
        conn.settimeout(idle_timeout)
    next_event = codec.next_event
    receive_data = codec.receive_data
    inbox = bytearray(read_size if recv is None else 0)
    view = memoryview(inbox)
    recv_into = conn.recv_into
    while True:
        event = next_event()
        if event is NEED_DATA:
            while True:
                try:
                    data = bytes(view[: recv_into(inbox)]) if recv is None else recv(read_size)
                except TimeoutError:
                    raise IdleTimeoutError(f"no data for {conn.gettimeout() or 0:g} s") from None
                except OSError as e:
                    raise ConnectionLostError(e.strerror or str(e)) from None
                if whole_message is None or not data:
                    break
                claimed = whole_message(data)
                if claimed is None:
                    break
                yield claimed  # the codec's buffer is still empty: read again
            receive_data(data)
            continue
        if event is CLOSED:
            return
        assert not isinstance(event, Sentinel)
        yield event
