"""listen.peer_credentials (the one SO_PEERCRED reader) and the socket policy's peer rule."""

from __future__ import annotations

import os
import socket

from vtpm.listen import PeerCredentials, SocketPolicy, peer_allowed, peer_credentials


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
