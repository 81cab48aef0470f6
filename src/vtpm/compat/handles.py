"""What the front door opens and hands to the Manager: listening sockets, the state location,
passphrases. Standard library only (this runs before anything heavier is imported).

- A UNIX socket: a stale socket file (nobody listens) is replaced, anything else refused; it is
  bound and listening under a temporary name in the same directory, then renamed into place,
  so a client that sees the path can connect at once. Its mode and owner are the ones asked.
- `fd=N`: an inherited socket, accepted only if it is a listening stream socket.
- The state: a directory (made 0700 if missing, opened O_RDONLY|O_DIRECTORY) or a file
  (O_RDWR, made with the asked mode if missing).
- A passphrase: all of its fd up to end of file, or the file, 1..SECRET_MAX bytes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from dataclasses import dataclass

from vtpm.compat.socket_args import Listen, ListenKind, SecretSource, StateArg

SECRET_MAX = 4096  # = vtpm.wire.compat.SECRET_MAX (not imported before the sockets exist)
BACKLOG = 128
UNIX_PATH_MAX = 107


class DoorError(Exception):
    """Setting up the front door failed; the message is the one line the user sees."""


@dataclass(frozen=True, slots=True)
class Bound:
    sock: socket.socket
    path: str = ""  # a UNIX socket file this process created (absolute), else ""
    ident: tuple[int, int] = (0, 0)  # its st_dev, st_ino: removed at exit only if unchanged


def _unix(listen: Listen, what: str) -> Bound:
    path = listen.path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise DoorError(f"{what} {path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise DoorError(f"{what} {path} is in use by another process")
        finally:
            probe.close()
    # bound and listening under a temporary name, then renamed: a client that sees the path
    # can connect at once (an orchestrator polls for the file, then QEMU connects)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}")
    if len(os.fsencode(tmp)) > UNIX_PATH_MAX:
        tmp = path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~listen.mode)
    try:
        if tmp != path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)  # left by an earlier process of this pid
        sock.bind(tmp)
    except OSError as e:
        sock.close()
        raise DoorError(f"cannot bind {what} {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    try:
        if listen.uid is not None or listen.gid is not None:
            uid = -1 if listen.uid is None else listen.uid
            os.chown(tmp, uid, -1 if listen.gid is None else listen.gid)
        os.chmod(tmp, listen.mode)
        sock.listen(BACKLOG)
        if tmp != path:
            os.rename(tmp, path)
        st = os.stat(path)
    except OSError as e:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise DoorError(f"cannot set up {what} {path}: {e.strerror}") from None
    return Bound(sock, os.path.abspath(path), (st.st_dev, st.st_ino))


def _tcp(listen: Listen, what: str) -> Bound:
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((listen.host, listen.port))
    except OSError as e:
        sock.close()
        raise DoorError(f"cannot bind {what} {listen.host}:{listen.port}: {e.strerror}") from None
    sock.listen(BACKLOG)
    return Bound(sock)


def _inherited(listen: Listen, what: str) -> Bound:
    try:
        sock = socket.socket(fileno=listen.fd)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as e:
        raise DoorError(f"{what} fd={listen.fd} is not a socket: {e.strerror}") from None
    if not listening or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise DoorError(f"{what} fd={listen.fd} is not a listening stream socket")
    return Bound(sock)


def bind(listen: Listen, what: str) -> Bound:
    if listen.kind is ListenKind.UNIX:
        return _unix(listen, what)
    if listen.kind is ListenKind.TCP:
        return _tcp(listen, what)
    return _inherited(listen, what)


def open_state(state: StateArg) -> int:
    """A descriptor of the state location: the directory (O_RDONLY|O_DIRECTORY) or the file
    (O_RDWR), created if missing."""
    try:
        if state.kind == "dir":
            os.makedirs(state.path, 0o700, exist_ok=True)
            return os.open(state.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return os.open(state.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, state.mode)
    except OSError as e:
        raise DoorError(f"cannot open the state location {state.path}: {e.strerror}") from None


def fresh(state_fd: int) -> bool:
    """Whether the state location holds nothing yet: an empty directory, an empty file."""
    st = os.fstat(state_fd)
    if stat.S_ISDIR(st.st_mode):
        return not os.listdir(state_fd)
    return stat.S_ISREG(st.st_mode) and st.st_size == 0


def read_secret(src: SecretSource, what: str) -> bytes:
    """The passphrase (or key) bytes: all of the fd up to its end (then closed), or the file."""
    try:
        if src.fd >= 0:
            chunks: list[bytes] = []
            size = 0
            while size <= SECRET_MAX:
                chunk = os.read(src.fd, SECRET_MAX + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            os.close(src.fd)
            data = b"".join(chunks)
        else:
            with open(src.path, "rb") as f:
                data = f.read(SECRET_MAX + 1)
            if src.remove:
                os.unlink(src.path)
    except OSError as e:
        raise DoorError(f"cannot read {what}: {e.strerror}") from None
    if not data:
        raise DoorError(f"{what} is empty")
    if len(data) > SECRET_MAX:
        raise DoorError(f"{what} is longer than {SECRET_MAX} bytes")
    return data


def remove_own(path: str, ident: tuple[int, int]) -> None:
    """Remove the socket file at `path` if it is still the one this process bound."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
