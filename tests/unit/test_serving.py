"""serving.events, the one read loop, over real socketpairs: events in order whatever the split,
the peer's close ends it, idle and reset are ConnectionLostError, protocol errors propagate, and
the whole-message fast path yields the same requests as the codec."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from vtpm import serving
from vtpm.errors import RemoteProtocolError
from vtpm.wire._common import CLOSED, NEED_DATA, Sentinel
from vtpm.wire.tpmframe import FrameServerConnection, TpmCommand

STARTUP = bytes.fromhex("80010000000c000001440000")
GETRANDOM = bytes.fromhex("80010000000c0000017b0020")
RESPONSE = bytes.fromhex("80010000000a00000000")


class LineCodec:
    """A minimal codec: one event per newline-terminated line; `bad` breaks the protocol."""

    def __init__(self) -> None:
        self._buf = b""
        self._eof = False
        self.fed: list[bytes] = []

    def receive_data(self, data: bytes) -> None:
        self.fed.append(data)
        if not data:
            self._eof = True
        self._buf += data

    def next_event(self) -> bytes | Sentinel:
        line, sep, rest = self._buf.partition(b"\n")
        if not sep:
            if self._eof:
                if self._buf:
                    raise RemoteProtocolError("closed in the middle of a line")
                return CLOSED
            return NEED_DATA
        if line == b"bad":
            raise RemoteProtocolError("a bad line")
        self._buf = rest
        return line


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


def send_then_close(sock: socket.socket, chunks: list[bytes]) -> threading.Thread:
    def run() -> None:
        for c in chunks:
            sock.sendall(c)
        sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=run)
    t.start()
    return t


STREAM = b"one\ntwo\n\nthree\n"


@pytest.mark.parametrize("step", [len(STREAM), 1, 2, 5])
def test_events_in_order_whatever_the_split(
    pair: tuple[socket.socket, socket.socket], step: int
) -> None:
    server, client = pair
    chunks = [STREAM[i : i + step] for i in range(0, len(STREAM), step)]
    t = send_then_close(client, chunks)
    assert list(serving.events(server, LineCodec())) == [b"one", b"two", b"", b"three"]
    t.join()


def test_each_read_is_bounded_by_read_size(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b"x" * 100 + b"\n")
    client.shutdown(socket.SHUT_WR)
    codec = LineCodec()
    assert list(serving.events(server, codec, read_size=7)) == [b"x" * 100]
    assert all(len(d) <= 7 for d in codec.fed)
    assert codec.fed[-1] == b""  # the peer's close reached the codec


def test_the_peer_closing_ends_the_iteration(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b"last\n")
    client.close()
    assert list(serving.events(server, LineCodec())) == [b"last"]


def test_a_silent_peer_is_an_idle_timeout(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    client.sendall(b"hello\n")
    it = serving.events(server, LineCodec(), idle_timeout=0.05)
    assert next(it) == b"hello"
    with pytest.raises(serving.IdleTimeoutError):
        next(it)
    assert issubclass(serving.IdleTimeoutError, serving.ConnectionLostError)


def test_a_reset_is_connection_lost(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    server.sendall(b"unread")  # the peer closes with this unread: the kernel resets
    client.close()
    with pytest.raises(serving.ConnectionLostError):
        list(serving.events(server, LineCodec()))


def test_a_protocol_error_propagates(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    t = send_then_close(client, [b"fine\nbad\nnever\n"])
    got: list[bytes] = []
    with pytest.raises(RemoteProtocolError, match="a bad line"):
        for ev in serving.events(server, LineCodec()):
            got.append(ev)
    assert got == [b"fine"]
    t.join()


def test_recv_hook_replaces_the_read(pair: tuple[socket.socket, socket.socket]) -> None:
    server, client = pair
    reads: list[int] = []

    def recv(n: int) -> bytes:
        reads.append(n)
        return server.recv(n)

    t = send_then_close(client, [b"a\nb\n"])
    assert list(serving.events(server, LineCodec(), read_size=1000, recv=recv)) == [b"a", b"b"]
    assert reads and set(reads) == {1000}
    t.join()


def serve_frames(server: socket.socket, *, fast: bool, claimed: list[bytes]) -> list[bytes]:
    """The commands a frame server sees, answering each; `claimed`: those the fast path took."""
    codec = FrameServerConnection()

    def whole(data: bytes) -> bytes | None:
        command = codec.whole_command(data)
        if command is not None:
            claimed.append(command)
        return command

    seen: list[bytes] = []
    for ev in serving.events(server, codec, whole_message=whole if fast else None):
        seen.append(ev if isinstance(ev, bytes) else ev.data)
        server.sendall(codec.respond(RESPONSE))
    return seen


def test_the_whole_message_fast_path_sees_the_same_commands(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    # one command per read (the fast path's case), then two in one read, then one split in two
    # behind another (its tail arrives while the codec holds its head)
    sends = [STARTUP, GETRANDOM, STARTUP + GETRANDOM, STARTUP + GETRANDOM[:5], GETRANDOM[5:]]
    answers = [1, 1, 2, 1, 1]  # the whole commands each send completes

    def run() -> None:
        for s, want in zip(sends, answers, strict=True):
            client.sendall(s)
            got = b""
            while len(got) < want * len(RESPONSE):
                got += client.recv(100)
        client.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=run)
    t.start()
    claimed: list[bytes] = []
    seen = serve_frames(server, fast=True, claimed=claimed)
    t.join()
    assert seen == [STARTUP, GETRANDOM, STARTUP, GETRANDOM, STARTUP, GETRANDOM]
    assert claimed == [STARTUP, GETRANDOM]  # the rest went through the codec


def test_without_the_fast_path_the_codec_yields_commands(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    server, client = pair
    client.sendall(STARTUP)
    client.shutdown(socket.SHUT_WR)
    codec = FrameServerConnection()
    it = serving.events(server, codec)
    ev = next(it)
    assert isinstance(ev, TpmCommand) and ev.data == STARTUP
    codec.respond(RESPONSE)
    assert list(it) == []
