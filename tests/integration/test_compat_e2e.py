"""The compat executables end to end: a real Manager with its front door enabled, vtpm's own
`swtpm_setup` / `swtpm socket` / `swtpm_ioctl` (installed as the compat directory installs
them) run with the arguments libvirt, Proxmox, Incus, LXD and the tpm2-tools harness pass, and
real clients (swtpm_ioctl, tpm2-tools) through the sockets the front door bound."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ctrl_call, free_port_pair, stop_process, tpm2
from tests.mgr import ALL_GUESTS, ManagerProc, init_manager, new_group, owner_key, start_manager
from vtpm.compat import install
from vtpm.wire import ctrl
from vtpm.wire._common import NEED_DATA

pytestmark = pytest.mark.integration


@dataclass
class Door:
    """A Manager with its front door, and the compat programs pointed at it."""

    manager: ManagerProc
    bin: Path
    socket: Path
    work: Path

    def env(self) -> dict[str, str]:
        return dict(os.environ, VTPM_COMPAT_SOCKET=str(self.socket))

    def run(
        self, program: str, *args: str, cwd: Path | None = None, pass_fds: Sequence[int] = ()
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / program), *args],
            env=self.env(),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
            pass_fds=pass_fds,
        )

    def start(
        self, *args: str, cwd: Path | None = None, pass_fds: Sequence[int] = ()
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(self.bin / "swtpm"), *args],
            env=self.env(),
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
        )


def manager_with_door(data: Path, sock: Path) -> ManagerProc:
    """`vtpm manager run` on `data`, once its front door at `sock` listens."""
    m = start_manager(data)
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert time.monotonic() < deadline, m.log()[-3000:]
        time.sleep(0.05)
    return m


@contextlib.contextmanager
def open_door(root: Path) -> Iterator[Door]:
    """A Manager in `root/m` with its front door enabled, the compat programs in `root/bin`."""
    data = root / "m"
    data.mkdir()
    init_manager(data)
    m = start_manager(data)
    try:
        key = owner_key(root)
        new_group(m, "guests", key, labels=(ALL_GUESTS,))
        sock = root / "door.sock"
        m.cli("compat", "enable", "--group", "guests", "--socket", str(sock))
        m.stop()
        m = manager_with_door(data, sock)
        directory = root / "bin"
        install.install(directory, sys.executable)
        work = root / "w"
        work.mkdir()
        door = Door(m, directory, sock, work)
        yield door
    finally:
        with contextlib.suppress(Exception):
            door.manager.stop()
        with contextlib.suppress(Exception):
            m.stop()


@pytest.fixture(scope="module")
def door() -> Iterator[Door]:
    with tempfile.TemporaryDirectory(prefix="vtcd-") as d, open_door(Path(d)) as opened:
        yield opened


def wait_for(check: object, proc: subprocess.Popen[bytes], timeout: float = 60) -> float:
    """Seconds until `check()` holds; fails if `proc` exits first."""
    assert callable(check)
    t0 = time.monotonic()
    while not check():
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"swtpm exited with {proc.returncode}: {err}")
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)
    return time.monotonic() - t0


def answers(addr: str | tuple[str, int]) -> bool:
    try:
        got = ctrl_call(addr, ctrl.GetCapability())
    except OSError:
        return False
    return isinstance(got, ctrl.CapabilityResult) and got.result == 0


def held_call(conn: socket.socket, request: ctrl.Request) -> object:
    """One control request on a connection kept open (as QEMU keeps its own)."""
    client = ctrl.ControlClientConnection()
    conn.sendall(client.send(request))
    while True:
        ev = client.next_event()
        if ev is not NEED_DATA:
            return ev
        client.receive_data(conn.recv(65536))


def test_libvirt_setup_then_socket_then_ioctl_shutdown(door: Door) -> None:
    vm = uuid.uuid4()
    state = door.work / "libvirt" / str(vm) / "tpm2"
    state.mkdir(parents=True)
    log = door.work / f"{vm}.log"
    setup = door.run(
        "swtpm_setup",
        *("--tpm2", "--tpm-state", str(state), "--vmid", f"guest7:{vm}", "--logfile", str(log)),
        *("--createek", "--create-ek-cert", "--create-platform-cert", "--lock-nvram"),
        "--not-overwrite",
    )
    assert setup.returncode == 0, setup.stderr
    assert f"vTPM {vm} created (label guest7_u:vm_r:vtpm_t" in setup.stdout
    assert "created" in log.read_text()
    again = door.run(
        "swtpm_setup",
        *("--tpm2", "--tpm-state", str(state), "--vmid", f"guest7:{vm}", "--createek"),
        "--not-overwrite",
    )
    assert again.returncode == 0 and "kept" in again.stdout, again.stderr
    sock = str(door.work / f"{vm.hex[:8]}.sock")
    proc = door.start(
        *("socket", "--ctrl", f"type=unixio,path={sock},mode=0600"),
        *("--tpmstate", f"dir={state},mode=0600", "--log", f"file={log}", "--terminate", "--tpm2"),
    )
    try:
        bound = wait_for(lambda: os.path.exists(sock), proc)
        assert bound < 1.0
        assert oct(os.stat(sock).st_mode & 0o777) == "0o600"
        # --terminate: the instance ends when its control client leaves, so hold one (QEMU's)
        qemu = socket.socket(socket.AF_UNIX)
        qemu.settimeout(60)
        qemu.connect(sock)  # queued by the front door's socket until the instance serves
        got = held_call(qemu, ctrl.GetCapability())
        assert isinstance(got, ctrl.CapabilityResult) and got.result == 0
        got = held_call(qemu, ctrl.GetTpmEstablished())
        assert isinstance(got, ctrl.EstablishedResult) and got.result == 0
        qemu.close()  # QEMU is gone: the vTPM ends, and the front door with it
        assert proc.wait(30) == 0
        assert not os.path.exists(sock)  # the front door removed what it bound
        assert "serves, instance pid" in log.read_text()
        # libvirt's swtpm_ioctl -s after QEMU left finds nothing: one line, exit 1
        late = door.run("swtpm_ioctl", "--unix", sock, "-s")
        assert late.returncode == 1 and late.stderr.count("\n") == 1
    finally:
        stop_process(proc, signal.SIGKILL, 5)


def _daemon_pidfile_sigterm(door: Door, tpmstate: str, name: str) -> None:
    """Proxmox's `swtpm socket` (--daemon, --pid, --log prefix, --terminate), then SIGTERM."""
    sock = str(door.work / f"{name}.swtpm")
    pidfile = door.work / f"{name}.swtpm.pid"
    log = door.work / f"{name}-swtpm.log"
    started = door.run(
        *("swtpm", "socket", "--tpmstate", tpmstate),
        *("--ctrl", f"type=unixio,path={sock},mode=0600", "--pid", f"file={pidfile}"),
        *("--terminate", "--daemon", "--log", f"file={log},level=1,prefix=[id={name}]", "--tpm2"),
    )
    assert started.returncode == 0, started.stderr  # the parent, once the vTPM serves
    pid = int(pidfile.read_text())
    try:
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "swtpm"
        with socket.socket(socket.AF_UNIX) as qemu:  # held: --terminate
            qemu.settimeout(30)
            qemu.connect(sock)
            got = held_call(qemu, ctrl.GetCapability())
            assert isinstance(got, ctrl.CapabilityResult) and got.result == 0
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while Path(f"/proc/{pid}").exists():
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert not os.path.exists(sock) and not pidfile.exists()
        text = log.read_text()
        assert all(line.startswith(f"[id={name}]") for line in text.splitlines())
        assert "the vTPM ended with exit code 0" in text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_daemon_pidfile_sigterm_dir(door: Door) -> None:
    state = door.work / "pve-dir"
    setup = door.run("swtpm_setup", "--tpm2", "--tpmstate", f"dir://{state}", "--createek")
    assert setup.returncode == 0, setup.stderr
    _daemon_pidfile_sigterm(door, f"dir={state},mode=0600", "101")


def test_proxmox_file(door: Door) -> None:
    vol = door.work / "vm-100-disk-1.raw"
    vol.touch()
    setup = door.run(
        "swtpm_setup",
        *("--tpmstate", f"file://{vol}", "--createek", "--create-ek-cert"),
        *("--create-platform-cert", "--lock-nvram", "--config", "/etc/swtpm_setup.conf"),
        *("--runas", "0", "--not-overwrite", "--tpm2", "--ecc"),
    )
    assert setup.returncode == 0, setup.stderr
    assert "ecc256" in setup.stdout
    assert vol.stat().st_size > 0
    _daemon_pidfile_sigterm(door, f"backend-uri=file://{vol},mode=0600", "100")


def _status(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return b"zombie"


def test_incus_relative_path_sigkill(door: Door) -> None:
    cwd = door.work / "incus"
    cwd.mkdir()
    args = ("socket", "--tpm2", "--tpmstate", "dir=tpm", "--ctrl", "type=unixio,path=tpm.sock")
    proc = door.start(*args, cwd=cwd)
    sock = str(cwd / "tpm.sock")
    try:
        wait_for(lambda: answers(sock), proc)
        got = ctrl_call(sock, ctrl.GetTpmEstablished())
        assert isinstance(got, ctrl.EstablishedResult) and got.result == 0
        view = next(v for v in door.manager.json("list") if v["state_dir"] == str(cwd / "tpm"))
        pid = view["run"]["pid"]
        assert pid and Path(f"/proc/{pid}").exists()
        proc.kill()
        proc.wait(10)
        # the Manager stops the instance (state stored) once the front door's connection is gone
        deadline = time.monotonic() + 60
        while Path(f"/proc/{pid}").exists() and b"zombie" not in _status(pid):
            assert time.monotonic() < deadline, "the instance still runs"
            time.sleep(0.05)
        # the same location starts again: the vTPM and its state are the same
        again = door.start(*args, cwd=cwd)
        try:
            wait_for(lambda: answers(sock), again, timeout=60)
        finally:
            assert stop_process(again, signal.SIGTERM, 30) == 0
    finally:
        stop_process(proc, signal.SIGKILL, 5)


def test_lxd_inherited_ctrl_fd(door: Door) -> None:
    path = str(door.work / "lxd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    state = door.work / "lxd-state"
    try:
        os.set_inheritable(listener.fileno(), True)
        proc = door.start(
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={state}",
            "--ctrl",
            f"type=unixio,fd={listener.fileno()}",
            pass_fds=[listener.fileno()],
        )
        try:
            wait_for(lambda: answers(path), proc)
            assert state.is_dir() and oct(state.stat().st_mode & 0o777) == "0o700"
        finally:
            assert stop_process(proc, signal.SIGTERM, 30) == 0
    finally:
        listener.close()


def _listeners(port: int) -> str:
    return subprocess.run(
        ["ss", "-lntp4", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout


def test_tpm2_tools_harness_tcp(door: Door) -> None:
    port = free_port_pair()
    state = Path(tempfile.mkdtemp(prefix="h-", dir=door.work))
    proc = door.start(
        *("socket", "--tpm2", "--server", f"port={port}", "--ctrl", f"type=tcp,port={port + 1}"),
        *("--seccomp", "action=none", "--flags", "not-need-init", "--tpmstate", f"dir={state}"),
    )
    try:
        # how the harness waits: ss lists the pid it started under a name containing swtpm
        listed = wait_for(
            lambda: re.search(rf'"[^"]*swtpm[^"]*",pid={proc.pid},', _listeners(port)), proc, 5
        )
        assert listed < 1.0
        tcti = f"swtpm:host=127.0.0.1,port={port}"
        tpm2("startup", "-c", tcti=tcti)
        assert len(tpm2("getrandom", "--hex", "16", tcti=tcti).stdout.strip()) == 32
        pcrs = tpm2("pcrread", "sha256:0,1", tcti=tcti).stdout.decode()
        assert "0 : 0x0000000000000000000000000000000000000000000000000000000000000000" in pcrs
        # tpm2-pytss (ESAPI through tcti-swtpm): an ECC primary key made and flushed
        pytss = pytest.importorskip("tpm2_pytss", reason="tpm2-pytss: a dev dependency")
        ectx = pytss.ESAPI(pytss.TCTILdr("swtpm", f"host=127.0.0.1,port={port}"))
        try:
            assert len(bytes(ectx.get_random(16))) == 16
            handle, public, *_ = ectx.create_primary(
                pytss.TPM2B_SENSITIVE_CREATE(), "ecc256:aes128cfb"
            )
            assert public.publicArea.type == pytss.TPM2_ALG.ECC
            ectx.flush_context(handle)
        finally:
            ectx.close()
        down = door.run("swtpm_ioctl", "--tcp", f"127.0.0.1:{port + 1}", "-s")
        assert down.returncode == 0, down.stderr
        assert proc.wait(30) == 0
    finally:
        stop_process(proc, signal.SIGKILL, 5)


def test_manager_refusal_is_one_line(door: Door) -> None:
    state = door.work / "nonempty"
    state.mkdir()
    (state / "something").write_text("x")  # not empty, never set up: the Manager knows no vTPM
    sock = str(door.work / "ne.sock")
    got = door.run(
        "swtpm",
        "socket",
        "--tpm2",
        "--tpmstate",
        f"dir={state}",
        "--ctrl",
        f"type=unixio,path={sock}",
    )
    assert got.returncode == 1
    assert got.stderr.count("\n") == 1 and "swtpm_setup" in got.stderr, got.stderr
    assert not os.path.exists(sock)


def _pipe_with(data: bytes) -> int:
    rd, wr = os.pipe()
    os.write(wr, data)
    os.close(wr)
    return rd


def test_libvirt_passphrase_fds(door: Door) -> None:
    vm = uuid.uuid4()
    state = door.work / "enc" / str(vm)
    state.mkdir(parents=True)
    pwd = _pipe_with(b"s3cret passphrase")
    try:
        setup = door.run(
            *("swtpm_setup", "--tpm2", "--tpm-state", str(state), "--vmid", f"enc:{vm}"),
            *("--createek", "--pwdfile-fd", str(pwd), "--cipher", "aes-256-cbc"),
            pass_fds=[pwd],
        )
    finally:
        os.close(pwd)
    assert setup.returncode == 0, setup.stderr
    sock = str(door.work / f"e{vm.hex[:8]}.sock")

    def attach(secret: bytes) -> subprocess.Popen[bytes]:
        fd = _pipe_with(secret)
        try:
            return door.start(
                *("socket", "--tpm2", "--tpmstate", f"dir={state}"),
                *("--ctrl", f"type=unixio,path={sock}", "--key", f"pwdfd={fd},mode=aes-256-cbc"),
                pass_fds=[fd],
            )
        finally:
            os.close(fd)

    wrong = attach(b"another passphrase")
    try:
        assert wrong.wait(60) == 1
        assert wrong.stderr is not None
        err = wrong.stderr.read().decode()
        assert err.count("\n") == 1 and "refused" in err  # opaque: no reason given
        assert "s3cret" not in door.manager.log() and "another" not in door.manager.log()
    finally:
        stop_process(wrong, signal.SIGKILL, 5)
    right = attach(b"s3cret passphrase")
    try:
        wait_for(lambda: answers(sock), right)
    finally:
        assert stop_process(right, signal.SIGTERM, 30) == 0


def test_a_manager_killed_ends_its_front_doors_and_the_state_survives() -> None:
    """kill -9 of the Manager while a front-door vTPM runs: the instance (its custody link
    gone) stores its state and exits, the front door exits with an error instead of holding
    dead sockets, and after the Manager's restart the same `swtpm socket` serves the NV data
    written before."""
    with tempfile.TemporaryDirectory(prefix="vtck-") as d, open_door(Path(d)) as door:
        port = free_port_pair()
        state = Path(tempfile.mkdtemp(prefix="k-", dir=door.work))
        args = [
            *(
                "socket",
                "--tpm2",
                "--server",
                f"port={port}",
                "--ctrl",
                f"type=tcp,port={port + 1}",
            ),
            *("--flags", "not-need-init", "--tpmstate", f"dir={state}"),
        ]
        tcti = f"swtpm:host=127.0.0.1,port={port}"
        proc = door.start(*args)
        try:
            wait_for(lambda: answers(("127.0.0.1", port + 1)), proc)
            tpm2("startup", "-c", tcti=tcti)
            tpm2("nvdefine", "0x1500017", "-C", "o", "-s", "8", tcti=tcti)
            tpm2("nvwrite", "0x1500017", "-C", "o", "-i", "-", tcti=tcti, input_=b"survives")
            (shown,) = [v for v in door.manager.json("list") if v["state_dir"] == str(state)]
            instance = shown["run"]["pid"]
            door.manager.stop(signal.SIGKILL)
            assert proc.wait(30) != 0
            err = proc.stderr.read().decode() if proc.stderr else ""
            assert "the Manager closed the connection" in err, err
            deadline = time.monotonic() + 30
            while Path(f"/proc/{instance}").exists():
                assert time.monotonic() < deadline, "the instance outlived its Manager"
                time.sleep(0.05)
        finally:
            stop_process(proc, signal.SIGKILL, 5)
        door.manager = manager_with_door(Path(d) / "m", door.socket)
        again = door.start(*args)
        try:
            wait_for(lambda: answers(("127.0.0.1", port + 1)), again)
            tpm2("startup", "-c", tcti=tcti)
            out = tpm2("nvread", "0x1500017", "-C", "o", "-s", "8", tcti=tcti).stdout
            assert out == b"survives"
        finally:
            stop_process(again, signal.SIGTERM, 30)
