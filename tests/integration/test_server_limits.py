"""Idle and per-user limits on the real servers: a vTPM's TCP frontends and the Manager's admin
socket cannot be starved by idle connections (issue 11, finding 6), and a user the admin socket
refuses is told so (finding 7).

Other users are real processes run with `setpriv` (the tests run as root)."""

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

from tests.helpers import VTPM, instance, tpm2
from tests.mgr import ManagerProc, manager, vtpm_cli

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run peers as other uids"),
]

ADMINS = 100  # the admin group (0660 admin socket)
OTHER_UID = 60001


def test_idle_tcp_connections_do_not_starve_a_vtpm(tmp_path: Path) -> None:
    with instance(
        tmp_path / "st",
        tmp_path / "k.key",
        mssim=False,
        extra=["--idle-timeout", "1", "--startup-clear"],
    ) as inst:
        assert inst.port is not None
        idle = [socket.create_connection(("127.0.0.1", inst.port)) for _ in range(200)]
        try:
            time.sleep(2.0)  # the silent ones are dropped; their sockets stay open here
            out = tpm2("getrandom", "--hex", "8", tcti=inst.tcti_swtpm)
            assert len(out.stdout) == 16
            assert idle[0].recv(1) == b""  # the server closed its end
        finally:
            for s in idle:
                s.close()
        assert "connection lost: no data for 1 s" in inst.log()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data directory other users can reach the admin socket in (its mode still applies)."""
    d = Path(tempfile.mkdtemp(prefix="vtpm-limits-"))
    d.chmod(0o711)
    yield d / "data"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def mgr(data_dir: Path) -> Iterator[ManagerProc]:
    data_dir.mkdir(mode=0o711)
    with manager(data_dir, "--admin-group", str(ADMINS)) as m:
        yield m


HOLDER = textwrap.dedent(
    """
    import socket, sys
    held, refused = [], 0
    for _ in range(int(sys.argv[2])):
        s = socket.socket(socket.AF_UNIX)
        s.connect(sys.argv[1])
        held.append(s)
    for s in held:  # the refused ones are closed by the Manager at once
        s.settimeout(0.2)
        try:
            refused += s.recv(1) != b""
        except TimeoutError:
            pass
    print(refused, flush=True)
    sys.stdin.read()
    """
)


def test_idle_admin_connections_do_not_lock_administrators_out(
    mgr: ManagerProc, data_dir: Path
) -> None:
    """500 idle connections of one admin-group user: root is still served at once."""
    holder = subprocess.Popen(
        [
            *("setpriv", f"--reuid={OTHER_UID}", f"--regid={ADMINS}", "--clear-groups"),
            *(sys.executable, "-c", HOLDER, str(data_dir / "admin.sock"), "500"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        refused = int(holder.stdout.readline())
        assert refused >= 500 - 64  # the Manager's per-uid share of its slots
        start = time.monotonic()
        res = mgr.cli("manager", "status")
        assert res.stdout.startswith("Manager pid")
        assert time.monotonic() - start < 30
    finally:
        holder.communicate("")
    assert f"uid={OTHER_UID}: uid {OTHER_UID} already holds 64 connections" in mgr.log()


def _as_other(data_dir: Path, *groups: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *("setpriv", f"--reuid={OTHER_UID}", f"--regid={OTHER_UID}", *groups),
            *VTPM,
            *("manager", "status", "--data-dir", str(data_dir)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_supplementary_member_of_the_admin_group_is_served(
    mgr: ManagerProc, data_dir: Path
) -> None:
    """The socket's file mode lets in a user whose supplementary groups hold the admin group;
    the peer check agrees (SO_PEERGROUPS), so the user is served, not refused."""
    res = _as_other(data_dir, f"--groups={ADMINS}")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("Manager pid")
    assert _as_other(data_dir, "--clear-groups").returncode == 1  # not in the group: no entry


def test_a_refused_user_is_told_so(mgr: ManagerProc, data_dir: Path) -> None:
    """A user the Manager refuses after accepting the connection (here: over its per-uid share
    of the admin socket) reads one clear line, not a broken pipe."""
    holder = subprocess.Popen(
        [
            *("setpriv", f"--reuid={OTHER_UID}", f"--regid={ADMINS}", "--clear-groups"),
            *(sys.executable, "-c", HOLDER, str(data_dir / "admin.sock"), "64"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert int(holder.stdout.readline()) == 0  # all 64 held
        res = _as_other(data_dir, f"--groups={ADMINS}")
    finally:
        holder.communicate("")
    assert res.returncode == 1, res
    assert res.stderr.startswith("vtpm: error: the Manager refused this user: "), res.stderr
    assert "already holds 64 connections" in res.stderr
    assert res.stderr.count("\n") == 1 and "Broken pipe" not in res.stderr
    assert vtpm_cli(data_dir, "manager", "status").returncode == 0
