"""The compat programs' connection to the Manager's front-door socket (`vtpm.wire.compat`).

One UNIX stream, the Manager IPC framing in the PEER role; the request frame goes out with its
descriptors (SCM_RIGHTS) on the first `sendmsg`. Where the socket is: `compat.SOCKET_ENV`, else
`compat.DEFAULT_SOCKET`. Only the programs' `main` reads the environment (`socket_path`).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from vtpm.errors import ConfigError, ManagerError, RemoteProtocolError
from vtpm.wire import compat, ipc
from vtpm.wire._common import CLOSED, NEED_DATA

READ_SIZE = 65536
R = TypeVar("R")


def socket_path(environ: Mapping[str, str]) -> str:
    return environ.get(compat.SOCKET_ENV) or compat.DEFAULT_SOCKET


class Link:
    """A connected front-door conversation."""

    def __init__(self, path: str, timeout: float | None) -> None:
        self.path = path
        self._codec = ipc.IpcConnection(ipc.Role.PEER)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise ConfigError(
                f"cannot reach the vTPM Manager's front door at {path}: "
                f"{e.strerror or e}; enable it with `vtpm compat enable` and start the "
                "Manager with `vtpm manager run`"
            ) from None

    def send(self, request: compat.Request[Any], fds: Sequence[int] = ()) -> None:
        frame = self._codec.send(compat.request_frame(request))
        try:
            sent = socket.send_fds(self.sock, [frame], list(fds)) if fds else 0
            if sent < len(frame):
                self.sock.sendall(frame[sent:])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the Manager refused at once: its reason, if it gave one, is there to read
        except OSError as e:
            raise ManagerError(f"the Manager closed the front door: {e.strerror or e}") from None

    def replies(self) -> list[ipc.AdminReply | None]:
        """Read once (blocking up to the timeout): the replies now complete, then None if the
        Manager closed the connection."""
        try:
            data = self.sock.recv(READ_SIZE)
        except TimeoutError:
            raise ManagerError("the Manager did not answer in time") from None
        except OSError:
            data = b""  # reset: the Manager is gone, as if it had closed
        self._codec.receive_data(data)
        out: list[ipc.AdminReply | None] = []
        while True:
            try:
                event = self._codec.next_event()
            except RemoteProtocolError as e:
                raise ManagerError(f"the Manager broke the protocol: {e}") from None
            if event is NEED_DATA:
                return out
            if event is CLOSED:
                return [*out, None]
            if not isinstance(event, ipc.AdminReply):
                raise ManagerError(f"the Manager answered with {type(event).__name__}")
            out.append(event)

    def reply(self) -> ipc.AdminReply:
        """The next reply (blocking); ManagerError if the Manager closes first."""
        while True:
            got = self.replies()
            if got:
                if got[0] is None:
                    raise ManagerError("the Manager closed the connection without answering")
                return got[0]

    def close(self) -> None:
        self.sock.close()


def result(cls: type[R], reply: ipc.AdminReply, what: str) -> R:
    """The typed result of a reply, or ManagerError with the Manager's reason."""
    if not reply.ok:
        raise ManagerError(reply.error)
    try:
        return compat.parse_result(cls, reply, what)
    except RemoteProtocolError as e:
        raise ManagerError(str(e)) from None
