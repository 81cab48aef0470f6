"""A small front-door client for tests: speaks `vtpm.wire.compat` to a real Manager, the
request frame's descriptors passed with `socket.send_fds`, as the compat executables do."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

from vtpm.wire import compat, ipc
from vtpm.wire._common import CLOSED, NEED_DATA


class CompatClient:
    """One front-door connection."""

    def __init__(self, path: str, timeout: float = 120.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._codec = ipc.IpcConnection(ipc.Role.PEER)

    def send(self, req: compat.Request[Any], fds: Sequence[int] = ()) -> None:
        """Send `req`; a Manager that refused this peer has written why and closed already,
        so a broken pipe here leaves that reply to read."""
        frame = self._codec.send(compat.request_frame(req))
        try:
            sent = socket.send_fds(self.sock, [frame], list(fds)) if fds else 0
            self.sock.sendall(frame[sent:])
        except (BrokenPipeError, ConnectionResetError):
            pass

    def reply(self) -> ipc.AdminReply | None:
        """The next reply; None when the Manager closed the connection."""
        while True:
            ev = self._codec.next_event()
            if ev is NEED_DATA:
                try:
                    data = self.sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                self._codec.receive_data(data)
                continue
            if ev is CLOSED:
                return None
            assert isinstance(ev, ipc.AdminReply), ev
            return ev

    def result(self, cls: type[Any]) -> Any:
        """The next reply as `cls`; AssertionError with the Manager's error otherwise."""
        r = self.reply()
        assert r is not None, "the Manager closed the front door"
        assert r.ok, r.error
        return compat.parse_result(cls, r, cls.__name__)

    def error(self) -> str:
        r = self.reply()
        assert r is not None and not r.ok, r
        return r.error

    def close(self) -> None:
        self.sock.close()


def open_state(path: str, kind: compat.StateKind = compat.StateKind.DIR) -> int:
    if kind is compat.StateKind.DIR:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    return os.open(path, os.O_RDWR)


def setup(
    sock_path: str,
    state_dir: str,
    *,
    fd: int | None = None,
    kind: compat.StateKind = compat.StateKind.DIR,
    **kw: Any,
) -> compat.SetupResult | str:
    """One Setup: its result, or the Manager's error text."""
    own = fd is None
    fd = open_state(state_dir, kind) if fd is None else fd
    c = CompatClient(sock_path)
    try:
        loc = compat.StateLocation(kind, state_dir)
        c.send(compat.Setup(loc, (compat.FdRole.STATE,), **kw), [fd])
        r = c.reply()
        assert r is not None, "the Manager closed the front door"
        if not r.ok:
            return r.error
        return compat.parse_result(compat.SetupResult, r, "SetupResult")
    finally:
        c.close()
        if own:
            os.close(fd)


def attach(
    sock_path: str,
    state_dir: str,
    sockets: Sequence[tuple[compat.FdRole, socket.socket]],
    *,
    kind: compat.StateKind = compat.StateKind.DIR,
    **kw: Any,
) -> tuple[CompatClient, compat.Attached | str]:
    """An Attach with the listening `sockets`; the connection (kept open: closing it stops the
    instance) and Attached, or the Manager's error text."""
    fd = open_state(state_dir, kind)
    try:
        c = CompatClient(sock_path)
        roles = (compat.FdRole.STATE, *(r for r, _ in sockets))
        loc = compat.StateLocation(kind, state_dir)
        c.send(compat.Attach(loc, roles, **kw), [fd, *(s.fileno() for _, s in sockets)])
    finally:
        os.close(fd)
    r = c.reply()
    assert r is not None, "the Manager closed the front door"
    if not r.ok:
        return c, r.error
    return c, compat.parse_result(compat.Attached, r, "Attached")
