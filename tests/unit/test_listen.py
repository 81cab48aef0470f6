"""listen.peer_credentials (the one SO_PEERCRED reader), the socket policy's peer rule, and
the Server's slots: TCP peers time out when silent, UNIX peers are counted per uid.

The peers are real sockets; the other uids are real processes (`setpriv`, we run as root)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vtpm import serving
from vtpm.endpoints import Endpoint
from vtpm.listen import (
    PeerCredentials,
    Server,
    SocketPolicy,
    bind,
    peer_allowed,
    peer_credentials,
)
from vtpm.manager.admin import AdminHandler
from vtpm.wire import ipc
from vtpm.wire._common import CLOSED, NEED_DATA, Sentinel


def test_a_unix_peer_has_its_pid_uid_and_gid() -> None:
    a, b = socket.socketpair()
    with a, b:
        creds = peer_credentials(a)
    assert creds == PeerCredentials(os.getpid(), os.getuid(), os.getgid())
    assert creds is not None and creds.uid == os.getuid()


def test_no_peer_identity_off_unix_sockets() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        assert peer_credentials(s) is None


def test_the_kernels_no_id_is_none_and_is_refused() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:  # never connected: (uid_t)-1
        creds = peer_credentials(s)
    assert creds is not None and creds.uid is None and creds.gid is None
    assert not peer_allowed(creds, SocketPolicy(mode=0o660))


def test_the_policy_admits_owner_root_and_group_with_0660() -> None:
    me = os.getuid()
    other = me + 1000
    assert peer_allowed(PeerCredentials(1, me, 12345), SocketPolicy())
    assert peer_allowed(PeerCredentials(1, 0, 12345), SocketPolicy(uid=other))
    assert not peer_allowed(PeerCredentials(1, other, 7), SocketPolicy(uid=me))
    assert peer_allowed(PeerCredentials(1, other, 7), SocketPolicy(mode=0o660, uid=me, gid=7))
    assert not peer_allowed(PeerCredentials(1, other, None), SocketPolicy(mode=0o660, gid=7))
    assert peer_allowed(None, SocketPolicy())  # TCP: loopback and the port are the boundary


GROUP = 100  # a group the socket admits (0660); the test peers take it as their primary gid


class EchoCodec:
    """Each read is one event; the peer closing ends the stream."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def receive_data(self, data: bytes) -> None:
        self._chunks.append(data)

    def next_event(self) -> bytes | Sentinel:
        if not self._chunks:
            return NEED_DATA
        chunk = self._chunks.pop(0)
        return chunk if chunk else CLOSED


def echo(conn: socket.socket, peer: str) -> None:
    try:
        for data in serving.events(conn, EchoCodec()):
            conn.sendall(data)
    except serving.ConnectionLostError:
        return


def answered(sock: socket.socket) -> bool:
    """Whether the server echoes on `sock` (False: it closed it)."""
    sock.settimeout(5)
    try:
        sock.sendall(b"ping")
        return sock.recv(16) == b"ping"
    except OSError:
        return False


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vtpm-listen-"))
    d.chmod(0o755)  # other uids must reach the socket (its own mode still applies)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def tcp_server(**kw: object) -> tuple[Server, int]:
    ep = Endpoint("tcp", host="127.0.0.1", port=0)
    policy = SocketPolicy()
    lsock = bind(ep, policy)
    srv = Server("test", lsock, echo, policy, 4, ep, **kw)  # type: ignore[arg-type]
    srv.start()
    return srv, lsock.getsockname()[1]


def test_silent_tcp_peers_are_dropped_and_a_fresh_client_is_served() -> None:
    srv, port = tcp_server(tcp_idle_timeout=0.5)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
    try:
        with socket.create_connection(("127.0.0.1", port)) as fresh:
            assert not answered(fresh)  # all 4 slots are held by silent peers
        time.sleep(1.0)
        with socket.create_connection(("127.0.0.1", port)) as fresh:
            assert answered(fresh)  # the 200 are still open on their side
        assert all(s.recv(1) == b"" for s in idle[:4])  # the silent ones were closed
    finally:
        for s in idle:
            s.close()
        srv.close()


def test_a_tcp_peer_that_keeps_talking_is_not_dropped() -> None:
    srv, port = tcp_server(tcp_idle_timeout=0.5)
    try:
        with socket.create_connection(("127.0.0.1", port)) as c:
            for _ in range(6):
                time.sleep(0.25)
                assert answered(c)
    finally:
        srv.close()


def test_a_silent_unix_peer_is_kept(sock_dir: Path) -> None:
    """QEMU keeps its control connection silent for the guest's whole life."""
    ep = Endpoint("unix", path=str(sock_dir / "s"))
    policy = SocketPolicy()
    srv = Server("test", bind(ep, policy), echo, policy, 4, ep, tcp_idle_timeout=0.2)
    srv.start()
    try:
        with socket.socket(socket.AF_UNIX) as c:
            c.connect(ep.path)
            time.sleep(0.8)
            assert answered(c)
    finally:
        srv.close()


PEER = textwrap.dedent(
    """
    import socket, sys
    held = []
    for _ in range(int(sys.argv[2])):
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(sys.argv[1])
        try:
            s.sendall(b"ping")
            ok = s.recv(16) == b"ping"
        except OSError:
            ok = False
        print("ok" if ok else "refused", flush=True)
        held.append(s)
    sys.stdin.read()  # hold the connections until told to go
    """
)


def as_uid(uid: int, path: str, n: int) -> subprocess.Popen[str]:
    setpriv = ["setpriv", f"--reuid={uid}", f"--regid={GROUP}", "--clear-groups"]
    return subprocess.Popen(
        [*setpriv, sys.executable, "-c", PEER, path, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )


def results(proc: subprocess.Popen[str], n: int) -> list[str]:
    assert proc.stdout is not None
    return [proc.stdout.readline().strip() for _ in range(n)]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run peers as other uids")
def test_one_uid_over_its_limit_is_refused_another_still_gets_in(sock_dir: Path) -> None:
    ep = Endpoint("unix", path=str(sock_dir / "s"))
    policy = SocketPolicy(0o660, None, GROUP)
    refusals: list[str] = []

    def refuse(conn: socket.socket, reason: str) -> None:
        refusals.append(reason)

    srv = Server("test", bind(ep, policy), echo, policy, 8, ep, max_per_uid=3, refuse=refuse)
    srv.start()
    greedy = as_uid(60001, ep.path, 5)
    try:
        assert results(greedy, 5) == ["ok"] * 3 + ["refused"] * 2
        other = as_uid(60002, ep.path, 1)
        try:
            assert results(other, 1) == ["ok"]
        finally:
            other.communicate("")
        assert refusals == ["uid 60001 already holds 3 connections"] * 2
        with socket.socket(socket.AF_UNIX) as root:  # root is not held to a per-uid limit
            root.connect(ep.path)
            assert answered(root)
    finally:
        greedy.communicate("")
        srv.close()
    # its connections closed, the uid has its slots back
    again = as_uid(60001, ep.path, 3)
    srv = Server("test", bind(ep, policy), echo, policy, 8, ep, max_per_uid=3)
    srv.start()
    try:
        assert results(again, 3) == ["ok"] * 3
    finally:
        again.communicate("")
        srv.close()


def test_an_idle_admin_client_is_dropped() -> None:
    """Between requests an admin client may not hold its slot for ever."""
    a, b = socket.socketpair()
    handler = AdminHandler(service=None, idle_timeout=0.3)  # type: ignore[arg-type]
    start = time.monotonic()
    handler(a, "test")
    assert time.monotonic() - start < 2
    a.close()
    assert b.recv(1) == b""
    b.close()


def test_the_admin_refusal_is_a_reply_the_client_can_read() -> None:
    a, b = socket.socketpair()
    AdminHandler.refuse(a, "too many clients")
    a.close()
    codec = ipc.IpcConnection(ipc.Role.PEER)
    reply = next(serving.events(b, codec))
    assert reply == ipc.AdminReply(False, error="the Manager refused this user: too many clients")
    b.close()
