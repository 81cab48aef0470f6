"""Security labels, the group rule (Manager and verifier, one table), the default label policy
(every pair), the uid/gid map and real peers."""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from vtpm.errors import ConfigError, LabelError, VerifyError
from vtpm.labelpolicy import (
    LabelMap,
    check_manager_peer,
    check_vtpm_peer,
    peer_context,
    resolve_peer,
)
from vtpm.labels import Label, group_permits, manager_accepts, permitted_digests, vtpm_accepts
from vtpm.verify.bundle import GroupInfo

# -- parsing ---------------------------------------------------------------------------------


def test_parse_valid() -> None:
    lab = Label.parse("guest1_u:vm_r:vtpm_t")
    assert lab == Label("guest1_u", "vm_r", "vtpm_t")
    assert str(lab) == "guest1_u:vm_r:vtpm_t"
    assert Label.parse("*:vm_r:vtpm_t").user == "*"
    assert str(Label.parse("a.b-c_D9:r:t")) == "a.b-c_D9:r:t"
    assert Label.parse("u" * 64 + ":r:t").user == "u" * 64


@pytest.mark.parametrize(
    "text",
    [
        "",
        "guest1_u",
        "guest1_u:vm_r",
        "guest1_u:vm_r:vtpm_t:s0",  # MLS is for peers' contexts only
        "a:b:c:d",
        "::",
        ":vm_r:vtpm_t",
        "guest1_u::vtpm_t",
        "guest1_u:vm_r:",
        "u" * 65 + ":r:t",
        "u:" + "r" * 65 + ":t",
        "u:r:" + "t" * 65,
        "gue st:vm_r:vtpm_t",
        "guest/u:vm_r:vtpm_t",
        "guést_u:vm_r:vtpm_t",
        "guest1_u:*:vtpm_t",
        "guest1_u:vm_r:*",
        "**:vm_r:vtpm_t",
        "guest1_u:vm_r:vtpm_t\n",
    ],
)
def test_parse_invalid(text: str) -> None:
    with pytest.raises(LabelError):
        Label.parse(text)


def test_constructor_validates() -> None:
    with pytest.raises(LabelError):
        Label("u", "r", "")
    with pytest.raises(LabelError):
        Label("u", "*", "t")


@pytest.mark.parametrize(
    "context",
    [
        "system_u:system_r:vtpm_t",
        "system_u:system_r:vtpm_t:s0",
        "system_u:system_r:vtpm_t:s0-s0:c0.c1023",
        "system_u:system_r:vtpm_t:s0:c1,c5.c9",
        "system_u:system_r:vtpm_t:s2:c3-s5:c0.c7,c9",
    ],
)
def test_from_context_drops_mls(context: str) -> None:
    assert Label.from_context(context) == Label("system_u", "system_r", "vtpm_t")


@pytest.mark.parametrize(
    "context",
    [
        "unconfined",
        "system_u:system_r",
        "system_u:system_r:vtpm_t:",
        "system_u:system_r:vtpm_t:bogus",
        "system_u:system_r:vtpm_t:s0-",
        "system_u:system_r:vtpm_t:s0:x1",
        "*:system_r:vtpm_t:s0",  # a context names a peer, never a pattern
        "system_u:system_r:vt pm_t:s0",
    ],
)
def test_from_context_invalid(context: str) -> None:
    with pytest.raises(LabelError):
        Label.from_context(context)


def test_digest_and_wildcard() -> None:
    lab = Label.parse("guest1_u:vm_r:vtpm_t")
    assert lab.digest() == hashlib.sha256(b"guest1_u:vm_r:vtpm_t").digest()
    assert lab.wildcard() == Label("*", "vm_r", "vtpm_t")
    assert lab.wildcard().digest() == hashlib.sha256(b"*:vm_r:vtpm_t").digest()
    assert lab.wildcard().wildcard() == lab.wildcard()


# -- the group rule: one table, the Manager's check and the verifier's ---------------------

WILD_VM = "*:vm_r:vtpm_t"
HWDOM = "system_u:system_r:vtpm_t"
GUEST1 = "guest1_u:vm_r:vtpm_t"

# (label of the vTPM, the group's label list, permitted?)
GROUP_RULE: list[tuple[str, list[str], bool]] = [
    (GUEST1, [GUEST1], True),
    ("guest2_u:vm_r:vtpm_t", [GUEST1], False),
    (HWDOM, [GUEST1], False),
    (GUEST1, [WILD_VM], True),  # the user field replaced by '*'
    ("guest2_u:vm_r:vtpm_t", [WILD_VM, HWDOM], True),
    (HWDOM, [WILD_VM, HWDOM], True),
    ("guest1_u:system_r:vtpm_t", [WILD_VM, HWDOM], False),  # another role
    ("guest1_u:vm_r:guest_t", [WILD_VM], False),  # another type
    (GUEST1, [], False),
    (WILD_VM, [WILD_VM], False),  # a pattern is never a vTPM's identity
    ("Guest1_u:vm_r:vtpm_t", [GUEST1], False),  # fields are compared exactly
    ("guest1_u:vm_r", [WILD_VM], False),  # not a label
    ("guest1_u:vm_r:vtpm_t:s0", [WILD_VM], False),  # a context with MLS is not a label
    ("guest 1:vm_r:vtpm_t", [WILD_VM], False),  # not a label (a space)
    ("", [WILD_VM], False),
    # a group lists labels; the hash is computed. A 64-hex "kernel hash" entry is no label,
    # so the group is malformed and permits nothing (the Manager never stores one)
    (GUEST1, [hashlib.sha256(GUEST1.encode()).hexdigest()], False),
    (GUEST1, [GUEST1, hashlib.sha256(GUEST1.encode()).hexdigest()], False),
    (GUEST1, ["guest1_u:vm_r:vtpm_t\n"], False),
]


def _manager_permits(label: str, entries: list[str]) -> bool:
    """As the Manager decides (manager/service.py): both sides parsed as labels."""
    try:
        return group_permits(Label.parse(label), permitted_digests(entries))
    except LabelError:
        return False


def _verifier_permits(label: str, entries: list[str]) -> bool:
    """As the verifier decides a deep quote's label against its bundle's group."""
    raw = {"uuid": "6f1c5a52-4b8e-4d7e-9a0e-3a3d2b1c0f00", "labels": entries, "pcr_states": []}
    try:
        return GroupInfo.from_json(raw).permits(label)
    except VerifyError:
        return False


@pytest.mark.parametrize(("label", "entries", "permitted"), GROUP_RULE)
@pytest.mark.parametrize("check", [_manager_permits, _verifier_permits])
def test_group_rule(
    check: Callable[[str, list[str]], bool], label: str, entries: list[str], permitted: bool
) -> None:
    assert check(label, entries) is permitted


def test_a_group_of_hashes_is_refused_by_name() -> None:
    entry = hashlib.sha256(GUEST1.encode()).hexdigest()
    with pytest.raises(LabelError):
        permitted_digests([GUEST1, entry])
    raw = {"uuid": "6f1c5a52-4b8e-4d7e-9a0e-3a3d2b1c0f00", "labels": [entry], "pcr_states": []}
    with pytest.raises(VerifyError, match="bundle group labels"):
        GroupInfo.from_json(raw)


def test_group_permits_takes_hashes() -> None:
    g1 = Label.parse(GUEST1)
    assert group_permits(g1, {g1.digest()})
    assert group_permits(g1, [hashlib.sha256(WILD_VM.encode()).digest()])
    assert not group_permits(g1, [hashlib.sha256(b"guest1_u:vm_r:vtpm_t\n").digest()])
    assert not group_permits(g1.wildcard(), {g1.wildcard().digest()})


# -- the label-policy matrix -----------------------------------------------------------------

USERS = ("guest1_u", "guest2_u", "system_u")
ROLES = ("vm_r", "system_r")
TYPES = ("vtpm_t", "guest_t", "hwdom_t", "user_t")
PEERS = [Label(u, r, t) for u, r, t in itertools.product(USERS, ROLES, TYPES)]
MANAGER = "manager"
VTPMS = ("guest1_u:vm_r:vtpm_t", "guest2_u:vm_r:vtpm_t", "system_u:system_r:vtpm_t")

# Written out by hand, not derived from the rules under test.
ALLOWED = {
    (MANAGER, "guest1_u:vm_r:vtpm_t"),
    (MANAGER, "guest1_u:system_r:vtpm_t"),
    (MANAGER, "guest2_u:vm_r:vtpm_t"),
    (MANAGER, "guest2_u:system_r:vtpm_t"),
    (MANAGER, "system_u:vm_r:vtpm_t"),
    (MANAGER, "system_u:system_r:vtpm_t"),
    ("guest1_u:vm_r:vtpm_t", "guest1_u:vm_r:guest_t"),
    ("guest1_u:vm_r:vtpm_t", "guest1_u:vm_r:hwdom_t"),
    ("guest1_u:vm_r:vtpm_t", "guest1_u:system_r:guest_t"),
    ("guest1_u:vm_r:vtpm_t", "guest1_u:system_r:hwdom_t"),
    ("guest2_u:vm_r:vtpm_t", "guest2_u:vm_r:guest_t"),
    ("guest2_u:vm_r:vtpm_t", "guest2_u:vm_r:hwdom_t"),
    ("guest2_u:vm_r:vtpm_t", "guest2_u:system_r:guest_t"),
    ("guest2_u:vm_r:vtpm_t", "guest2_u:system_r:hwdom_t"),
    ("system_u:system_r:vtpm_t", "system_u:vm_r:guest_t"),
    ("system_u:system_r:vtpm_t", "system_u:vm_r:hwdom_t"),
    ("system_u:system_r:vtpm_t", "system_u:system_r:guest_t"),
    ("system_u:system_r:vtpm_t", "system_u:system_r:hwdom_t"),
}


def _allowed(target: str, peer: Label | None, labels: LabelMap) -> bool:
    try:
        if target == MANAGER:
            check_manager_peer(peer, labels)
        else:
            check_vtpm_peer(peer, Label.parse(target), labels)
    except LabelError as e:
        assert str(e) == "peer refused by the label policy"
        return False
    return True


def _pairs() -> Iterator[tuple[str, Label]]:
    for target in (MANAGER, *VTPMS):
        for peer in PEERS:
            yield target, peer


@pytest.mark.parametrize("labels", [LabelMap.empty(), LabelMap(unlabeled="refuse")])
def test_label_policy_matrix(labels: LabelMap) -> None:
    assert len(PEERS) == 24
    seen = set()
    for target, peer in _pairs():
        pair = (target, str(peer))
        expected = pair in ALLOWED
        assert _allowed(target, peer, labels) is expected, pair
        if target == MANAGER:
            assert manager_accepts(peer) is expected, pair
        else:
            assert vtpm_accepts(peer, Label.parse(target)) is expected, pair
        if expected:
            seen.add(pair)
    assert seen == ALLOWED  # every hand-listed pair is a real pair of the matrix


def test_unlabeled_peer_follows_the_map_setting() -> None:
    for target in (MANAGER, *VTPMS):
        assert _allowed(target, None, LabelMap(unlabeled="allow"))
        assert not _allowed(target, None, LabelMap(unlabeled="refuse"))
        assert not _allowed(target, None, LabelMap())  # the default is to refuse


def test_wildcard_peer_is_refused() -> None:
    # a wildcard is a group's pattern; a peer never holds it (constructed here by hand)
    assert not manager_accepts(Label("*", "vm_r", "vtpm_t"))
    assert not vtpm_accepts(Label("*", "vm_r", "guest_t"), Label("*", "vm_r", "vtpm_t"))
    assert not vtpm_accepts(Label("*", "vm_r", "guest_t"), Label.parse("guest1_u:vm_r:vtpm_t"))


# -- the uid/gid map -------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_labelmap_load(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'unlabeled = "allow"\n'
        "[uid]\n"
        '1000 = "guest1_u:vm_r:guest_t"\n'
        '0 = "system_u:system_r:hwdom_t"\n'
        "[gid]\n"
        '107 = "guest2_u:vm_r:guest_t"\n'
        '1000 = "guest2_u:vm_r:guest_t"\n',
    )
    m = LabelMap.load(path)
    assert m.unlabeled == "allow"
    assert m.label_for(1000, 5) == Label.parse("guest1_u:vm_r:guest_t")
    assert m.label_for(1000, 107) == Label.parse("guest1_u:vm_r:guest_t")  # uid first
    assert m.label_for(5, 107) == Label.parse("guest2_u:vm_r:guest_t")
    assert m.label_for(0, 0) == Label.parse("system_u:system_r:hwdom_t")
    assert m.label_for(5, 5) is None
    assert LabelMap.load(_write(tmp_path, "")) == LabelMap(unlabeled="refuse")


def test_labelmap_empty_and_frozen() -> None:
    m = LabelMap.empty()
    assert m.unlabeled == "allow"
    assert m.label_for(os.getuid(), os.getgid()) is None
    source = {1: Label.parse("a:b:c")}
    m2 = LabelMap(uid=source)
    source[2] = Label.parse("d:e:f")
    assert m2.label_for(2, 2) is None  # the map kept its own copy
    hash(m2)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[uid]\n1000 = "guest1_u:vm_r"\n', "[uid] 1000: a label is user:role:type"),
        ('[gid]\n107 = "guest1_u:vm r:guest_t"\n', "[gid] 107: label role"),
        ('[uid]\n1000 = "*:vm_r:guest_t"\n', "cannot have the user '*'"),
        ("[uid]\n1000 = 5\n", "must be a string"),
        ('[uid]\nalice = "guest1_u:vm_r:guest_t"\n', "[uid] key 'alice' is not a numeric uid"),
        ('[uid]\n-1 = "guest1_u:vm_r:guest_t"\n', "[uid] key '-1'"),
        ('[uid]\n4294967295 = "guest1_u:vm_r:guest_t"\n', "[uid] key '4294967295'"),
        ('[uid]\n1 = "a:b:c"\n01 = "a:b:c"\n', "[uid] lists 1 twice"),
        ('uid = "x"\n', "[uid] must be a table"),
        ('unlabeled = "maybe"\n', "unlabeled must be 'refuse' or 'allow', not 'maybe'"),
        ("unlabeled = true\n", "unlabeled must be"),
        ('unlabelled = "allow"\n', "unknown setting(s): unlabelled"),
        ("[uid\n", "is not valid TOML"),
    ],
)
def test_labelmap_load_errors(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        LabelMap.load(path)
    assert str(path) in str(e.value)
    assert message in str(e.value)


def test_labelmap_load_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=r"cannot read label policy .*nope\.toml"):
        LabelMap.load(path)


def test_labelmap_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_bytes(b'unlabeled = "\xff"\n')
    with pytest.raises(ConfigError, match=r"p\.toml"):
        LabelMap.load(path)


# -- real peers ------------------------------------------------------------------------------

ME = Label.parse("guest1_u:vm_r:guest_t")
MY_GROUP = Label.parse("guest2_u:vm_r:guest_t")


def _kernel_label(sock: socket.socket) -> Label | None:
    """What the kernel says about the peer, if it says anything SELinux-style."""
    context = peer_context(sock)
    if context is not None and ":" in context:
        return Label.from_context(context)
    return None


def _check_peer(sock: socket.socket) -> None:
    kernel = _kernel_label(sock)
    by_uid = LabelMap(uid={os.getuid(): ME}, gid={os.getgid(): MY_GROUP})
    by_gid = LabelMap(gid={os.getgid(): MY_GROUP})
    other = LabelMap(uid={os.getuid() + 1: ME}, gid={os.getgid() + 1: MY_GROUP})
    if kernel is None:  # the usual case here: no SELinux
        assert resolve_peer(sock, by_uid) == ME
        assert resolve_peer(sock, by_gid) == MY_GROUP
        assert resolve_peer(sock, other) is None
        assert resolve_peer(sock, LabelMap.empty()) is None
    else:  # the kernel's label wins over the map
        for m in (by_uid, by_gid, other, LabelMap.empty()):
            assert resolve_peer(sock, m) == kernel


def test_resolve_peer_socketpair() -> None:
    a, b = socket.socketpair()
    with closing(a), closing(b):
        context = peer_context(a)
        assert context is None or (context and context != "unlabeled")
        _check_peer(a)
        _check_peer(b)


def test_resolve_peer_unix_listener(tmp_path: Path) -> None:
    path = str(tmp_path / "mgr.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen(1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(path)
            conn, _ = server.accept()
            with conn:
                _check_peer(conn)
                peer = resolve_peer(conn, LabelMap(uid={os.getuid(): ME}, unlabeled="refuse"))
                if _kernel_label(conn) is None:
                    check_vtpm_peer(peer, Label.parse("guest1_u:vm_r:vtpm_t"), LabelMap())
                    with pytest.raises(LabelError):
                        check_vtpm_peer(peer, Label.parse("guest2_u:vm_r:vtpm_t"), LabelMap())
                    with pytest.raises(LabelError):
                        check_manager_peer(peer, LabelMap())


def test_resolve_peer_tcp_has_no_credentials() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname()) as client:
            conn, _ = server.accept()
            with conn:
                kernel = _kernel_label(conn)
                got = resolve_peer(conn, LabelMap(uid={os.getuid(): ME}))
                assert got == kernel  # never the map: TCP carries no uid
                _ = client
