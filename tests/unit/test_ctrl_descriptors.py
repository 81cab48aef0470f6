"""The control channel's passed descriptors (SCM_RIGHTS): SET_DATAFD takes the one that came
with it; any other is closed as soon as the requests of its read are answered, while the
connection stays open."""

from __future__ import annotations

import array
import os
import select
import socket
import threading
from collections.abc import Iterator

import pytest

from tests.helpers import MemoryStore
from vtpm.engine.engine import TpmVersion
from vtpm.instance.device import Device
from vtpm.instance.frontends.ctrl import ControlHandler
from vtpm.wire import ctrl as w
from vtpm.wire._common import NEED_DATA


class Served:
    """A ControlHandler serving one end of a socketpair in a thread; the test holds the other."""

    def __init__(self, device: Device) -> None:
        self.client, server = socket.socketpair()
        self.data_sockets: list[socket.socket] = []
        handler = ControlHandler(device, lambda s, _peer: self.data_sockets.append(s), lambda: None)

        def run() -> None:
            with server:
                handler(server, "test")

        self.thread = threading.Thread(target=run)
        self.thread.start()
        self.codec = w.ControlClientConnection()

    def call(self, request: w.Request, fd: int | None = None) -> object:
        data = self.codec.send(request)
        if fd is None:
            self.client.sendall(data)
        else:
            fds = array.array("i", [fd])
            self.client.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        while (ev := self.codec.next_event()) is NEED_DATA:
            self.codec.receive_data(self.client.recv(4096))
        return ev

    def close(self) -> None:
        self.client.close()
        self.thread.join(timeout=5)
        for s in self.data_sockets:
            s.close()


@pytest.fixture
def served() -> Iterator[Served]:
    device = Device(TpmVersion.TPM20, MemoryStore())
    s = Served(device)
    try:
        yield s
    finally:
        s.close()
        device.close()


def closed_elsewhere(read_end: int) -> bool:
    """True once every other copy of the pipe's write end is closed (read gives EOF)."""
    ready, _, _ = select.select([read_end], [], [], 5)
    return bool(ready) and os.read(read_end, 1) == b""


def test_a_descriptor_without_set_datafd_is_closed_once_answered(served: Served) -> None:
    r, wr = os.pipe()
    try:
        reply = served.call(w.GetCapability(), fd=wr)
        os.close(wr)  # now only the handler's copy keeps the pipe open
        assert isinstance(reply, w.CapabilityResult) and reply.result == 0
        assert closed_elsewhere(r)  # while the control connection is still open
        reply = served.call(w.GetCapability())  # and it goes on serving
        assert isinstance(reply, w.CapabilityResult)
    finally:
        os.close(r)


def test_set_datafd_takes_the_descriptor_that_came_with_it(served: Served) -> None:
    mine, theirs = socket.socketpair()
    with mine:
        with theirs:
            reply = served.call(w.SetDataFd(), fd=theirs.fileno())
        assert reply == w.Result(0)
        assert len(served.data_sockets) == 1  # handed on as the data channel, kept open
        served.data_sockets[0].sendall(b"ping")
        assert mine.recv(4) == b"ping"


def test_set_datafd_without_a_descriptor_is_refused(served: Served) -> None:
    reply = served.call(w.SetDataFd())
    assert reply == w.Result(int(w.CtrlResult.BAD_PARAMETER))
    assert served.data_sockets == []
