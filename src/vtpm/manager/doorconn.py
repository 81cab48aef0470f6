"""One front-door connection's parts (`vtpm.manager.frontdoor`): the descriptors it passed,
who is on it, and the attached instance it holds."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field

from vtpm.listen import PeerCredentials
from vtpm.wire import compat

_ANCILLARY = socket.CMSG_SPACE(compat.FDS_MAX * array.array("i").itemsize)


class Descriptors:
    """The descriptors passed on a connection: those of the request frame are kept (`take`),
    any other is closed as soon as it arrives."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._fds: list[int] = []
        self._accepting = True
        self.truncated = False

    def recv(self, size: int) -> bytes:
        data, ancdata, flags, _addr = self._conn.recvmsg(size, _ANCILLARY)
        got = array.array("i")
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
        if flags & socket.MSG_CTRUNC:
            self.truncated = True
        if self._accepting:
            self._fds.extend(got)
        else:
            for fd in got:
                os.close(fd)
        return data

    def take(self) -> list[int]:
        """The request's descriptors (the caller closes them); later ones are closed."""
        self._accepting = False
        fds, self._fds = self._fds, []
        return fds


@dataclass
class Session:
    """One attached front door and its instance."""

    vtpm_uuid: uuid.UUID
    conn: socket.socket | None  # None: a setup's run, which no front door waits on
    closing: bool = False  # the front door left or asked to detach: the instance is stopping
    exit_code: int | None = None
    reason: str = ""
    ended: threading.Event = field(default_factory=threading.Event)

    def front_door_alive(self) -> bool:
        """Whether the front door still holds its connection (a killed one may not have been
        noticed by its reader yet: its closed end reads as end-of-file at once)."""
        if self.conn is None:
            return True
        try:
            return self.conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def exited(self, code: int, reason: str) -> None:
        """The supervisor's `on_exit`: record it and wake the connection's reader."""
        self.exit_code, self.reason = code, reason
        self.ended.set()
        if self.conn is not None:
            with contextlib.suppress(OSError):
                self.conn.shutdown(socket.SHUT_RD)


@dataclass(frozen=True, slots=True)
class Peer:
    creds: PeerCredentials
    actor: str

    @property
    def uid(self) -> int:
        assert self.creds.uid is not None
        return self.creds.uid

    @property
    def gid(self) -> int:
        return self.creds.gid if self.creds.gid is not None else self.uid
