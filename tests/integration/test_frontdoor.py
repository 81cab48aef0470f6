"""The Manager's front door end to end: a real `vtpm manager run` with compat.json, real
instance processes, and the test's own front-door client (`tests.compatclient`) in place of
the compat executables: the listening sockets are the test's, passed as descriptors."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import compatclient as cc
from tests.helpers import ctrl_call, free_port_pair, tcp_listener, tpm2, unix_listener
from tests.mgr import ManagerProc, manager, new_group, owner_key, vtpm_cli
from vtpm.manager import forkserver
from vtpm.wire import compat, ctrl

pytestmark = pytest.mark.integration

NOBODY = 65534
OTHER = 65533  # a uid the front door does not allow
NV_INDEX = "0x1500016"


@pytest.fixture
def work() -> Iterator[Path]:
    """A directory of the test's own under /tmp (short paths for sockets; uid 65534 can reach
    the front-door socket in it; not under pytest's basetemp, which a concurrent pytest
    session may prune)."""
    d = Path(tempfile.mkdtemp(prefix="vfd", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def door(work: Path) -> Iterator[tuple[ManagerProc, str, Path]]:
    """A Manager with a front door (group `guests`, socket 0660 to nogroup, uid 65534 allowed)
    and a directory for the orchestrator's state."""
    with _door(work) as d:
        yield d


@pytest.fixture(params=["1", "0"], ids=["forked", "popen"])
def door_each_start(
    request: pytest.FixtureRequest, work: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ManagerProc, str, Path, bool]]:
    """`door` with the fork server on (the default) and off (VTPM_FORKSERVER=0); and which."""
    monkeypatch.setenv(forkserver.ENV, request.param)
    with _door(work) as (m, sock, states):
        yield m, sock, states, request.param == "1"


@contextlib.contextmanager
def _door(work: Path) -> Iterator[tuple[ManagerProc, str, Path]]:
    data = work / "d"
    sock = str(work / "c.sock")
    with manager(data) as m:
        new_group(m, "guests", owner_key(work))
        vtpm_cli(
            data,
            "compat",
            "enable",
            "--group",
            "guests",
            "--socket",
            sock,
            "--socket-group",
            str(NOBODY),
            "--allow-user",
            str(NOBODY),
        )
    states = work / "vms"
    states.mkdir(mode=0o755)
    with manager(data) as m:
        yield m, sock, states


def state_dir(states: Path, name: str) -> str:
    d = states / name
    d.mkdir(mode=0o700)
    return str(d)


def audit(m: ManagerProc) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = m.json("audit", "--limit", "200")
    return out


def ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def wait_gone(pid: int, timeout: float = 30) -> None:
    """Wait until `pid` has exited (gone, or a zombie its parent has not reaped yet)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
        except FileNotFoundError:
            return
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return
        assert time.monotonic() < deadline, f"pid {pid} still runs"
        time.sleep(0.05)


def test_setup_attach_ctrl_and_close_stops_the_instance(
    door: tuple[ManagerProc, str, Path], work: Path
) -> None:
    m, sock, states = door
    vm = uuid.uuid4()
    d = state_dir(states, str(vm))
    res = cc.setup(sock, d, vm_uuid=vm, vm_name="web one", eks=("ecc256",))
    assert isinstance(res, compat.SetupResult), res
    assert res.uuid == vm and res.created and res.group == "guests"
    assert res.label == "web_one_u:vm_r:vtpm_t" and res.eks == ("ecc256",)
    assert any(n.endswith(".blob") for n in os.listdir(d))  # the state is where it was put
    shown = m.json("show", str(vm))
    assert shown["state_dir"] == d and shown["run"]["state"] == "stopped"
    assert shown["owner_uid"] == 0

    bad = cc.setup(sock, state_dir(states, "vm-bad"), eks=("rsa1024",))
    assert isinstance(bad, str) and "rsa1024" in bad  # refused before anything is made
    again = cc.setup(sock, d, vm_uuid=vm, vm_name="web one")
    assert isinstance(again, str) and "exists at" in again
    kept = cc.setup(sock, d, vm_uuid=vm, overwrite=compat.Overwrite.KEEP)
    assert isinstance(kept, compat.SetupResult) and not kept.created and kept.uuid == vm

    ctrl_path = str(work / "ctrl.sock")
    listener = unix_listener(ctrl_path)
    client, att = cc.attach(sock, d, [(compat.FdRole.CTRL, listener)])
    listener.close()  # the instance holds it now
    try:
        assert isinstance(att, compat.Attached), att
        assert att.uuid == vm and att.label == res.label
        assert ppid(att.pid) == m.proc.pid  # the Manager spawned it
        caps = ctrl_call(ctrl_path, ctrl.GetCapability())
        assert isinstance(caps, ctrl.CapabilityResult) and caps.result == 0
        assert m.json("show", str(vm))["run"]["state"] == "running"

        # a second front door for the same vTPM, while the first lives: refused
        other = unix_listener(str(work / "ctrl2.sock"))
        c2, second = cc.attach(sock, d, [(compat.FdRole.CTRL, other)])
        c2.close()
        other.close()
        assert isinstance(second, str) and "running already" in second
    finally:
        client.close()  # the front door killed: the instance is stopped

    # a second attach at once: it waits for the old instance to stop; the same vTPM, its
    # state kept; Detach ends it with Ended
    listener = unix_listener(str(work / "ctrl3.sock"))
    client, att2 = cc.attach(sock, d, [(compat.FdRole.CTRL, listener)])
    listener.close()
    try:
        assert isinstance(att2, compat.Attached), att2
        assert att2.pid != att.pid and not Path(f"/proc/{att.pid}").exists()
        client.send(compat.Detach())
        ended = client.result(compat.Ended)
        assert ended.exit_code == 0
    finally:
        client.close()
    wait_gone(att2.pid)

    # --reconfigure: the banks changed, the vTPM kept
    again2 = cc.setup(sock, d, reconfigure=True, pcr_banks=("sha256",))
    assert isinstance(again2, compat.SetupResult), again2
    assert not again2.created and again2.uuid == vm and again2.pcr_banks == ("sha256",)

    # --overwrite: the old vTPM is deleted (key erased), its blobs removed, a new one made
    before = m.json("show", str(vm))["state_blobs"]
    new = cc.setup(
        sock, d, vm_uuid=vm, vm_name="web one", eks=(), overwrite=compat.Overwrite.REPLACE
    )
    assert isinstance(new, compat.SetupResult) and new.created and new.uuid == vm, new
    assert m.json("show", str(vm))["state_blobs"] != before
    assert any(e["action"] == "compat.removed" and e["target"] == str(vm) for e in audit(m))
    listener = unix_listener(str(work / "ctrl4.sock"))
    client, att3 = cc.attach(sock, d, [(compat.FdRole.CTRL, listener)])
    listener.close()
    client.close()
    assert isinstance(att3, compat.Attached), att3
    wait_gone(att3.pid)


def _fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return out


def test_the_instance_gets_the_front_doors_descriptors_forked_or_started(
    door_each_start: tuple[ManagerProc, str, Path, bool],
) -> None:
    """Forked from the template or started by the Manager, an instance serves the listening
    sockets the front door passed and its state location, at the numbers its arguments name,
    reads the migration secret's pipe, and holds no descriptor of the template's."""
    m, sock, states, forked = door_each_start
    d = state_dir(states, "vm-fds")
    res = cc.setup(sock, d, vm_name="fds", eks=())
    assert isinstance(res, compat.SetupResult), res
    port = free_port_pair()
    server, ctl = tcp_listener(port), tcp_listener(port + 1)
    inodes = {os.fstat(s.fileno()).st_ino for s in (server, ctl)}
    client, att = cc.attach(
        sock,
        d,
        [(compat.FdRole.SERVER, server), (compat.FdRole.CTRL, ctl)],
        startup_clear=True,
        migration_secret=b"fd passphrase",
    )
    server.close()
    ctl.close()
    try:
        assert isinstance(att, compat.Attached), att
        assert ppid(att.pid) == m.proc.pid  # the Manager's child either way
        cmdline = Path(f"/proc/{att.pid}/cmdline").read_bytes().split(b"\0")
        assert (b"template" in cmdline) == forked
        argv = m.instance_argv(att.pid)
        fds = _fd_targets(att.pid)
        for flag in ("--server", "--ctrl"):
            n = int(argv[argv.index(flag) + 1].removeprefix("fd:"))
            assert fds[n] in {f"socket:[{i}]" for i in inodes}, (flag, n, fds)
        state_at = argv[argv.index("--state-dir") + 1]
        assert fds[int(state_at.removeprefix("/proc/self/fd/"))] == d
        secret_fd = int(argv[argv.index("--migration-secret-fd") + 1])
        assert secret_fd not in fds or not fds[secret_fd].startswith("pipe:")  # read, closed
        assert not any("template.log" in t for t in fds.values())
        # both sockets serve (the TCTI sets the locality over the control channel)
        assert tpm2("getrandom", "8", tcti=f"swtpm:host=127.0.0.1,port={port}").stdout
    finally:
        client.close()
    wait_gone(att.pid)
    assert m.json("show", str(res.uuid))["run"]["state"] == "stopped"  # not restarted


Run = Callable[[], tuple[cc.CompatClient, "compat.Attached | str", str]]


def _runner(sock: str, d: str) -> Run:
    """Attach the vTPM at `d` on TCP P/P+1 (tcti swtpm); the connection, the answer, the TCTI."""

    def run() -> tuple[cc.CompatClient, compat.Attached | str, str]:
        port = free_port_pair()
        server, ctl = tcp_listener(port), tcp_listener(port + 1)
        client, att = cc.attach(
            sock, d, [(compat.FdRole.SERVER, server), (compat.FdRole.CTRL, ctl)]
        )
        server.close()
        ctl.close()
        return client, att, f"swtpm:host=127.0.0.1,port={port}"

    return run


def _rolled_back(sock: str, states: Path, work: Path) -> tuple[uuid.UUID, str, Run]:
    """A vTPM whose NV index, defined after setup, persists across attaches; then the state
    as it was at setup copied back into its directory."""
    d = state_dir(states, "vm-rollback")
    res = cc.setup(sock, d, vm_name="rb", eks=())
    assert isinstance(res, compat.SetupResult), res
    old = work / "old"
    shutil.copytree(d, old)
    run = _runner(sock, d)
    client, att, tcti = run()
    try:
        assert isinstance(att, compat.Attached), att
        tpm2("startup", "-c", tcti=tcti)
        tpm2("nvdefine", NV_INDEX, "-C", "o", "-s", "8", tcti=tcti)
    finally:
        client.close()
    wait_gone(att.pid)

    client, att, tcti = run()  # the NV index is still there
    try:
        assert isinstance(att, compat.Attached), att
        tpm2("startup", "-c", tcti=tcti)
        assert NV_INDEX in tpm2("nvreadpublic", tcti=tcti).stdout.decode()
    finally:
        client.close()
    wait_gone(att.pid)

    for name in os.listdir(d):  # the older copy put back, in the same directory
        os.unlink(os.path.join(d, name))
    for name in os.listdir(old):
        shutil.copy2(old / name, os.path.join(d, name))
    return res.uuid, d, run


def test_state_persists_and_an_older_copy_is_refused_naming_accept_state(
    door: tuple[ManagerProc, str, Path], work: Path
) -> None:
    m, sock, states = door
    u, d, run = _rolled_back(sock, states, work)
    assert m.json("show", str(u))["state_dir"] == d  # the orchestrator's path
    client, refused, _ = run()
    client.close()
    assert isinstance(refused, str), refused
    assert f"vtpm accept-state {u}" in refused
    assert m.json("show", str(u))["run"]["state"] == "stopped"  # not restarted
    # vtpm start of a front-door vTPM is refused: it runs with its VM
    res = m.cli("start", str(u), check=False)
    assert res.returncode == 1 and "front door" in res.stderr


def test_accept_state_lets_the_older_copy_start_once(
    door: tuple[ManagerProc, str, Path], work: Path
) -> None:
    m, sock, states = door
    u, d, run = _rolled_back(sock, states, work)
    view = m.json("accept-state", str(u))
    assert view["state_dir"] == d
    assert any(e["action"] == "vtpm.accept-state" for e in audit(m))
    client, att, tcti = run()
    try:
        assert isinstance(att, compat.Attached), att
        tpm2("startup", "-c", tcti=tcti)
        out = tpm2("nvreadpublic", tcti=tcti, check=False).stdout.decode()
        assert NV_INDEX not in out  # the older state, accepted
    finally:
        client.close()
    wait_gone(att.pid)
    client, att, _ = run()  # accepted once: it is the recorded state now
    client.close()
    assert isinstance(att, compat.Attached), att
    wait_gone(att.pid)


def _as_user(uid: int, gid: int, fn: Any) -> str:
    """Run `fn()` in a forked child that took uid/gid first; what it returned (a string)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, only the socket work
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            out = str(fn())
        except BaseException as e:
            out = f"child failed: {e!r}"
        os.write(w, out.encode()[:60000])
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    os.waitpid(pid, 0)
    return text


def test_other_users_are_refused(door: tuple[ManagerProc, str, Path], work: Path) -> None:
    m, sock, states = door
    d = state_dir(states, "vm-root")
    res = cc.setup(sock, d, vm_name="rootvm", eks=())
    assert isinstance(res, compat.SetupResult), res
    fd = cc.open_state(d)
    ctrl_sock = unix_listener(str(work / "u.ctrl"))

    def try_attach() -> str:
        c = cc.CompatClient(sock)
        loc = compat.StateLocation(compat.StateKind.DIR, d)
        roles = (compat.FdRole.STATE, compat.FdRole.CTRL)
        c.send(compat.Attach(loc, roles), [fd, ctrl_sock.fileno()])
        r = c.reply()
        return "closed" if r is None else (r.error if not r.ok else "attached")

    try:
        # allowed on the front door, but the location is root's: the Manager would write into
        # a directory this user could not
        out = _as_user(NOBODY, NOBODY, try_attach)
        assert "not owned by uid 65534" in out, out
        # its own location now, but not the vTPM's owner (root set it up)
        os.chown(d, NOBODY, NOBODY)
        out = _as_user(NOBODY, NOBODY, try_attach)
        assert "belongs to another user" in out, out
        # not allowed on the front door at all: refused at the connection
        out = _as_user(OTHER, NOBODY, try_attach)
        assert "refused this user" in out, out
    finally:
        os.close(fd)
        ctrl_sock.close()
    entries = audit(m)
    assert any(e["action"] == "compat.connect" and e["outcome"] == "refused" for e in entries)
    assert any(
        e["action"] == "compat.attach"
        and e["outcome"] == "refused"
        and "owner" in json.loads(e["detail"])["why"]
        for e in entries
    )
    assert m.json("show", str(res.uuid))["run"]["state"] == "stopped"


def test_wrong_secret_refused_opaquely_and_audited(
    door: tuple[ManagerProc, str, Path], work: Path
) -> None:
    m, sock, states = door
    d = state_dir(states, "vm-secret")
    res = cc.setup(sock, d, vm_name="sec", eks=(), secret=b"right horse battery")
    assert isinstance(res, compat.SetupResult), res
    for secret in (b"wrong", None):
        listener = unix_listener(str(work / f"s{secret!r:.3}.ctrl"))
        client, out = cc.attach(sock, d, [(compat.FdRole.CTRL, listener)], secret=secret)
        client.close()
        listener.close()
        assert out == "refused"
    whys = [
        json.loads(e["detail"]).get("why")
        for e in audit(m)
        if e["action"] == "compat.attach" and e["outcome"] == "refused"
    ]
    assert "wrong secret" in whys and "the vTPM's secret is missing" in whys
    assert "right horse" not in (m.data_dir / "manager.log").read_text()

    path = str(work / "ok.ctrl")
    listener = unix_listener(path)
    client, att = cc.attach(
        sock, d, [(compat.FdRole.CTRL, listener)], secret=b"right horse battery"
    )
    listener.close()
    try:  # the state written at setup, under the key mixed with the secret, opens
        assert isinstance(att, compat.Attached), att
        assert isinstance(ctrl_call(path, ctrl.GetCapability()), ctrl.CapabilityResult)
    finally:
        client.close()
    wait_gone(att.pid)


def test_the_orchestrator_removing_the_state_deletes_the_vtpm(
    door: tuple[ManagerProc, str, Path], work: Path
) -> None:
    m, sock, states = door
    gone = state_dir(states, "vm-gone")
    kept = state_dir(states, "vm-kept")
    r1 = cc.setup(sock, gone, vm_name="gone", eks=())
    r2 = cc.setup(sock, kept, vm_name="kept", eks=())
    assert isinstance(r1, compat.SetupResult) and isinstance(r2, compat.SetupResult)
    listed = {v["uuid"] for v in m.json("list")}
    assert {str(r1.uuid), str(r2.uuid)} <= listed

    shutil.rmtree(gone)  # `virsh undefine --tpm`
    listed = {v["uuid"] for v in m.json("list")}
    assert str(r1.uuid) not in listed and str(r2.uuid) in listed
    assert any(e["action"] == "compat.removed" and e["target"] == str(r1.uuid) for e in audit(m))

    # the periodic check notices it without being asked, too; a location on a disk that is
    # not mounted now (a tmpfs mounted for the test, then unmounted) keeps its vTPM
    unmounted = states / "disk"
    unmounted.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(unmounted)], check=True)
    try:
        inner = state_dir(unmounted, "vm")
        r3 = cc.setup(sock, inner, vm_name="disk", eks=())
        assert isinstance(r3, compat.SetupResult), r3
    finally:
        subprocess.run(["umount", str(unmounted)], check=True)
    assert not Path(inner).exists()
    shutil.rmtree(kept)
    deadline = time.monotonic() + 10
    while not any(
        e["action"] == "compat.removed" and e["target"] == str(r2.uuid) for e in audit(m)
    ):
        assert time.monotonic() < deadline, "the periodic check did not delete it"
        time.sleep(0.2)
    listed = {v["uuid"] for v in m.json("list")}
    assert str(r2.uuid) not in listed and str(r3.uuid) in listed


def test_an_instance_that_exits_ends_its_front_door(
    door: tuple[ManagerProc, str, Path], work: Path
) -> None:
    m, sock, states = door
    d = state_dir(states, "vm-stop")
    res = cc.setup(sock, d, vm_name="stopme", eks=())
    assert isinstance(res, compat.SetupResult), res
    listener = unix_listener(str(work / "st.ctrl"))
    client, att = cc.attach(
        sock,
        d,
        [(compat.FdRole.CTRL, listener)],
        terminate=True,
        startup_clear=True,
        migration_secret=b"migration passphrase",
    )
    listener.close()
    try:
        assert isinstance(att, compat.Attached), att
        argv = m.instance_argv(att.pid)
        for flag in ("--terminate", "--startup-clear", "--migration-secret-fd"):
            assert flag in argv
        assert "--label" not in argv  # the orchestrator's sockets: no label check
        assert "migration passphrase" not in " ".join(argv)
        assert "migration passphrase" not in m.log()
        os.kill(att.pid, signal.SIGTERM)  # the instance ends (state stored): Ended comes
        ended = client.result(compat.Ended)
        assert ended.exit_code == 0
        assert client.reply() is None
    finally:
        client.close()
    assert m.json("show", str(res.uuid))["run"]["state"] == "stopped"  # not restarted

    # the configuration as the CLI shows it; a group the running Manager does not have is
    # refused before anything is written; a written change waits for the next start
    shown = m.json("compat", "show")
    assert shown["socket"] == sock and shown["allow_uids"] == [NOBODY]
    bad = m.cli("compat", "enable", "--group", "nosuch", "--socket", sock, check=False)
    assert bad.returncode == 1 and "nosuch" in bad.stderr
    assert m.json("compat", "show")["group"] == "guests"
    out = m.cli("compat", "enable", "--group", "guests", "--socket", sock).stdout
    assert "restart the Manager" in out


def test_a_state_file_location(door: tuple[ManagerProc, str, Path], work: Path) -> None:
    """`backend-uri=file://`: one file holds the state; the instance gets --state-file."""
    m, sock, states = door
    f = states / "vm.tpmstate"
    f.write_bytes(b"")
    f.chmod(0o600)
    res = cc.setup(sock, str(f), vm_name="filevm", eks=("ecc256",), kind=compat.StateKind.FILE)
    assert isinstance(res, compat.SetupResult), res
    assert f.stat().st_size > 0
    assert m.json("show", str(res.uuid))["state_dir"] == str(f)
    path = str(work / "f.ctrl")
    listener = unix_listener(path)
    client, att = cc.attach(
        sock, str(f), [(compat.FdRole.CTRL, listener)], kind=compat.StateKind.FILE
    )
    listener.close()
    try:
        assert isinstance(att, compat.Attached), att
        argv = m.instance_argv(att.pid)
        assert "--state-file" in argv and "--state-dir" not in argv
        assert isinstance(ctrl_call(path, ctrl.GetCapability()), ctrl.CapabilityResult)
    finally:
        client.close()
    wait_gone(att.pid)
    f.unlink()  # the orchestrator removed the file: the vTPM goes with it
    assert str(res.uuid) not in {v["uuid"] for v in m.json("list")}
