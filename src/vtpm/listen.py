"""Listening sockets and the thread-per-connection server (vTPM frontends, Manager sockets).

Why threads and blocking sockets: a TPM serves few clients and executes one command at a time;
a blocking read per connection gives the shortest path from a client's bytes to libtpms, and a
long command (key generation) keeps the control channel's thread free to cancel it.

UNIX sockets are created with the requested mode (0600 default, 0660 with a group), never
world-accessible, and a stale socket file is replaced only if nothing listens on it. An `fd:N`
endpoint is a socket someone else bound and passed down already listening (the front door):
it is taken as it is (its path, mode and owner are that process's business, and closing the
server unlinks nothing), but only if it is a listening UNIX or TCP stream socket. Each
accepted UNIX peer's credentials (SO_PEERCRED) are logged; a peer whose uid is neither root nor
the socket's owner (nor in its group when 0660) is refused.

Slots: a server serves at most `max_clients` connections at once. So that one local user
cannot take them all, a UNIX peer's uid holds at most `max_per_uid` of them (root is not
counted against a limit: it owns the machine, and the Manager's deep quotes batch hundreds of
root's requests at once). TCP peers have no identity to count: any local user can connect, so
a TCP connection that stays silent for `tcp_idle_timeout` seconds is dropped (tcti-swtpm opens
one connection per command, tcti-mssim one per tool run, so a live TCP client is never silent
that long). UNIX peers get no idle limit here: QEMU keeps its control connection open and
silent for the guest's whole life (a handler may still set one, as the admin socket does).
A refused peer is logged and closed; `refuse` may first send it the reason in its protocol.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import socket
import stat
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from vtpm.endpoints import Endpoint
from vtpm.errors import ConfigError

log = logging.getLogger(__name__)

BACKLOG = 128  # connections the kernel queues before accept (a burst of CLI calls)

Handler = Callable[[socket.socket, str], None]
# a further check of an accepted peer (the label policy): None to accept, else the reason
PeerCheck = Callable[[socket.socket], "str | None"]
# tells a refused peer why, in the socket's protocol, before it is closed (must not block)
Refuse = Callable[[socket.socket, str], None]

MAX_PER_UID = 8  # default connections one non-root uid may hold on one UNIX server
TCP_IDLE_TIMEOUT = 120.0  # default seconds a TCP peer may stay silent


@dataclass(frozen=True, slots=True)
class SocketPolicy:
    """Who may connect to the UNIX sockets: owner (and group if mode is 0660)."""

    mode: int = 0o600
    uid: int | None = None
    gid: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in (0o600, 0o660):
            raise ConfigError(f"socket mode {self.mode:o} is not allowed (use 600 or 660)")


def _replace_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # nobody listens: stale
        return
    finally:
        probe.close()
    raise ConfigError(f"{path} is in use by another process")


def adopt(endpoint: Endpoint) -> socket.socket:
    """The inherited listening socket of an `fd:N` endpoint (this process then owns the fd)."""
    fd = endpoint.fd
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise ConfigError(f"{endpoint}: descriptor {fd} is not a socket ({e.strerror})") from None
    try:
        family = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        stype = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as e:
        sock.detach()
        raise ConfigError(f"{endpoint}: descriptor {fd} is not a socket ({e.strerror})") from None
    if family not in (socket.AF_UNIX, socket.AF_INET, socket.AF_INET6):
        sock.detach()
        raise ConfigError(f"{endpoint}: descriptor {fd} is not a UNIX or TCP socket")
    if stype != socket.SOCK_STREAM or not listening:
        sock.detach()
        raise ConfigError(f"{endpoint}: descriptor {fd} is not a listening stream socket")
    os.set_inheritable(fd, False)
    sock.setblocking(True)  # the accept loop blocks, whatever the passing process set
    return sock


def bind(endpoint: Endpoint, policy: SocketPolicy) -> socket.socket:
    """A listening socket for `endpoint` with the policy's ownership and mode (an `fd:N`
    endpoint's inherited socket as it is)."""
    if endpoint.kind == "fd":
        return adopt(endpoint)
    if endpoint.kind == "unix":
        _replace_stale(endpoint.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177 if policy.mode == 0o600 else 0o117)
        try:
            sock.bind(endpoint.path)
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot listen on {endpoint}: {e.strerror}") from None
        finally:
            os.umask(old)
        if policy.uid is not None or policy.gid is not None:
            os.chown(
                endpoint.path,
                -1 if policy.uid is None else policy.uid,
                -1 if policy.gid is None else policy.gid,
            )
        os.chmod(endpoint.path, policy.mode)
    else:
        try:
            family = (
                socket.AF_INET6
                if ipaddress.ip_address(endpoint.host).version == 6
                else socket.AF_INET
            )
        except ValueError:
            family = socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((endpoint.host, endpoint.port))
        except OSError as e:
            sock.close()
            raise ConfigError(f"cannot listen on {endpoint}: {e.strerror}") from None
        if not _is_loopback(endpoint.host):
            log.warning("listening on %s: TPM traffic is reachable from the network", endpoint)
    sock.listen(BACKLOG)
    return sock


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


MAX_ID = 2**32 - 2  # the largest uid/gid: (uid_t)-1 means "no id"
# SO_PEERGROUPS (Linux 4.13) is 59 on every architecture; older Pythons do not export the name.
SO_PEERGROUPS: int = getattr(socket, "SO_PEERGROUPS", 59)
MAX_GROUPS = 65536  # NGROUPS_MAX


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """A UNIX-socket peer's SO_PEERCRED. `uid`/`gid` are None where the kernel reports no id
    ((uid_t)-1, e.g. a peer that never connected); `groups` are its supplementary groups
    (SO_PEERGROUPS), as the kernel recorded them when it connected."""

    pid: int
    uid: int | None
    gid: int | None
    groups: frozenset[int] = frozenset()


def peer_credentials(sock: socket.socket) -> PeerCredentials | None:
    """The credentials of a UNIX-socket peer; None for other sockets (no peer identity)."""
    if sock.family != socket.AF_UNIX:
        return None
    fmt = "=iII"  # struct ucred: pid_t, uid_t, gid_t
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(fmt))
    pid, uid, gid = struct.unpack(fmt, raw)
    return PeerCredentials(
        pid,
        uid if uid <= MAX_ID else None,
        gid if gid <= MAX_ID else None,
        _peer_groups(sock),
    )


def _peer_groups(sock: socket.socket) -> frozenset[int]:
    """The peer's supplementary groups; empty where the kernel cannot say."""
    size = 64 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as e:
            if e.errno == errno.ERANGE and size < MAX_GROUPS * 4:
                size *= 4  # more groups than the buffer holds
                continue
            return frozenset()
        count = len(raw) // 4
        return frozenset(g for g in struct.unpack(f"={count}I", raw[: count * 4]) if g <= MAX_ID)


def peer_allowed(creds: PeerCredentials | None, policy: SocketPolicy) -> bool:
    """Whether the policy admits the peer: root or the socket's owner, or its group with 0660.
    A non-UNIX peer (None) is admitted (no identity to check); a peer without ids is not."""
    if creds is None:
        return True
    owner = os.getuid() if policy.uid is None else policy.uid
    if creds.uid is not None and creds.uid in (0, owner):
        return True
    if policy.mode == 0o660:
        group = os.getgid() if policy.gid is None else policy.gid
        return creds.gid == group or group in creds.groups
    return False


def tune(sock: socket.socket) -> None:
    """Low-latency settings for a request/response connection: our answers leave at once
    (no Nagle). The peer's own Nagle is its business; see `quickack_reader` for a peer whose
    Nagle would wait for our delayed ACK."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def quickack_reader(sock: socket.socket) -> Callable[[int], bytes] | None:
    """A `serving.events` read for a peer that writes one request in several small writes
    with Nagle on (tpm2-tss tcti-mssim: code, locality, length, then the command), or None
    when `sock` is not TCP (nothing to do).

    Why: the peer's kernel holds the command back until its first small write is ACKed, and
    ours delays that ACK (up to 40 ms on Linux) while the request is incomplete and we have
    nothing to send, so every command stalls for the delayed-ACK timer. Linux clears
    TCP_QUICKACK as soon as it sees a request/response pattern, so it is set again after
    every read: that sends the ACK owed for what was just read at once, and the peer's next
    write follows without waiting. One setsockopt per read, mssim only."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    recv, setsockopt = sock.recv, sock.setsockopt
    level, opt = socket.IPPROTO_TCP, socket.TCP_QUICKACK

    def read(n: int) -> bytes:
        data = recv(n)
        if data:
            setsockopt(level, opt, 1)
        return data

    return read


class Server:
    """Accepts on one listening socket; runs `handler(conn, peer)` in a thread per client."""

    def __init__(
        self,
        name: str,
        sock: socket.socket | None,
        handler: Handler,
        policy: SocketPolicy,
        max_clients: int = 32,
        endpoint: Endpoint | None = None,
        peer_check: PeerCheck | None = None,
        *,
        max_per_uid: int = MAX_PER_UID,
        tcp_idle_timeout: float | None = TCP_IDLE_TIMEOUT,
        refuse: Refuse | None = None,
    ) -> None:
        if max_per_uid < 1 or (tcp_idle_timeout is not None and not tcp_idle_timeout > 0):
            raise ConfigError(f"{name}: the per-uid limit and the idle timeout must be positive")
        self.name = name
        self._peer_check = peer_check
        self._max_per_uid = max_per_uid
        self._tcp_idle = tcp_idle_timeout
        self._refuse = refuse
        self._per_uid: dict[int, int] = {}
        self.endpoint = endpoint
        self._sock = sock
        self._handler = handler
        self._policy = policy
        self._slots = threading.BoundedSemaphore(max_clients)
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closing = False
        self._thread: threading.Thread | None = None

    @classmethod
    def detached(cls, name: str, handler: Handler, policy: SocketPolicy) -> Server:
        """A server with no listening socket: it only serves sockets handed to `spawn`."""
        return cls(name, None, handler, policy)

    def start(self) -> None:
        if self._sock is None:
            return
        self._thread = threading.Thread(
            target=self._accept_loop, args=(self._sock,), name=f"{self.name}-accept", daemon=True
        )
        self._thread.start()

    def _accept_loop(self, lsock: socket.socket) -> None:
        while not self._closing:
            try:
                conn, addr = lsock.accept()
            except OSError:
                if self._closing:
                    return
                continue
            creds = peer_credentials(conn)
            peer = f"pid={creds.pid} uid={creds.uid}" if creds else f"{addr[0]}:{addr[1]}"
            refusal = self._admit(conn, creds)
            if refusal is not None:
                log.warning("%s: refused peer %s: %s", self.name, peer, refusal)
                self._refused(conn, refusal)
                continue
            if creds is None and self._tcp_idle is not None:
                conn.settimeout(self._tcp_idle)  # `serving.events` reports it as idle
            tune(conn)
            uid = creds.uid if creds is not None and creds.uid else None
            self.spawn(conn, peer, counted=True, uid=uid)

    def _admit(self, conn: socket.socket, creds: PeerCredentials | None) -> str | None:
        """None if the peer may take a slot (it then holds it), else why not."""
        if not peer_allowed(creds, self._policy):
            return "not the socket's owner or group"
        refusal = self._peer_check(conn) if self._peer_check is not None else None
        if refusal is not None:
            return refusal
        uid = creds.uid if creds is not None else None
        with self._lock:
            if uid and self._per_uid.get(uid, 0) >= self._max_per_uid:
                return f"uid {uid} already holds {self._max_per_uid} connections"
            if not self._slots.acquire(blocking=False):
                return "too many clients"
            if uid:
                self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        return None

    def _refused(self, conn: socket.socket, reason: str) -> None:
        if self._refuse is not None:
            conn.setblocking(False)  # the accept loop never waits for a refused peer
            with contextlib.suppress(OSError):
                self._refuse(conn, reason)
        conn.close()

    def spawn(
        self, conn: socket.socket, peer: str, *, counted: bool = False, uid: int | None = None
    ) -> None:
        """Serve an already connected socket (also used for a data fd passed by QEMU).
        `counted`: the connection holds a slot (and one of `uid`'s), released when it ends."""
        with self._lock:
            self._conns.add(conn)
        threading.Thread(
            target=self._serve,
            args=(conn, peer, counted, uid),
            name=f"{self.name}-{peer}",
            daemon=True,
        ).start()

    def _serve(self, conn: socket.socket, peer: str, counted: bool, uid: int | None) -> None:
        log.debug("%s: peer %s connected", self.name, peer)
        try:
            self._handler(conn, peer)
        except Exception:
            log.exception("%s: peer %s: handler failed", self.name, peer)
        finally:
            with self._lock:
                self._conns.discard(conn)
                if uid:
                    left = self._per_uid.pop(uid) - 1
                    if left:
                        self._per_uid[uid] = left
            conn.close()
            if counted:
                self._slots.release()
            log.debug("%s: peer %s gone", self.name, peer)

    def close(self) -> None:
        self._closing = True
        if self._sock is not None:
            path = None
            owned = self.endpoint is None or self.endpoint.kind != "fd"
            with contextlib.suppress(OSError):
                name = self._sock.getsockname()
                path = name if owned and isinstance(name, str) and name else None
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            if path:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(timeout=2)
