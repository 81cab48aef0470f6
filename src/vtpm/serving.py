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
  reported as `ConnectionLostError` so the caller can tell "gone" from "broke the protocol";
- `idle_timeout`: a peer that sends nothing for that long while the loop waits for it is
  dropped (`IdleTimeoutError`, a `ConnectionLostError`), so an idle client cannot hold a
  server slot.
`recv` replaces the plain `sock.recv` when the caller needs more than bytes from a read (the
control channel's descriptors passed with SCM_RIGHTS).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from vtpm.errors import VtpmError
from vtpm.wire._common import CLOSED, NEED_DATA, Sentinel

READ_SIZE = 65536

E_co = TypeVar("E_co", covariant=True)


class Codec(Protocol[E_co]):
    """What the loop needs of a codec: bytes in, events (or a sentinel) out."""

    def receive_data(self, data: bytes) -> None: ...

    def next_event(self) -> E_co | Sentinel: ...


class ConnectionLostError(VtpmError):
    """The peer's connection failed or was reset while the loop read from it."""


class IdleTimeoutError(ConnectionLostError):
    """The peer sent nothing within the idle timeout."""


def events(
    conn: socket.socket,
    codec: Codec[E_co],
    *,
    idle_timeout: float | None = None,
    read_size: int = READ_SIZE,
    recv: Callable[[int], bytes] | None = None,
) -> Iterator[E_co]:
    """Each event the peer sends on `conn`, until it closes its end."""
    read = conn.recv if recv is None else recv
    if idle_timeout is not None:
        conn.settimeout(idle_timeout)
    while True:
        event = codec.next_event()
        if event is NEED_DATA:
            try:
                data = read(read_size)
            except TimeoutError:
                raise IdleTimeoutError(f"no data for {idle_timeout:g} s") from None
            except OSError as e:
                raise ConnectionLostError(e.strerror or str(e)) from None
            codec.receive_data(data)
            continue
        if event is CLOSED:
            return
        assert not isinstance(event, Sentinel)
        yield event
