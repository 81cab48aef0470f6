"""The instance side of the front door, with real instance processes, libtpms and tpm2-tools:
listening sockets bound by the test and inherited as `fd:N` (UNIX control channel with a data
fd, TCP raw server + control), `--terminate`, `--migration-secret-fd` between two instances of
one vTPM, `--pcr-banks`, and TPM commands served before any control-channel INIT."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.helpers import (
    VTPM,
    free_port_pair,
    raw_call,
    stop_process,
    tcp_listener,
    tpm2,
    unix_listener,
)
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_RC
from vtpm.wire import ctrl as w
from vtpm.wire._common import NEED_DATA

pytestmark = pytest.mark.integration

NV_INDEX = "0x1500030"


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (UNIX socket paths <= 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="vid", dir="/tmp") as d:
        yield Path(d)


def keyfile(where: Path) -> Path:
    key = where / "key"
    if not key.exists():
        subprocess.run([*VTPM, "instance", "keygen", str(key)], check=True, capture_output=True)
    return key


def spawn(
    state: Path, key: Path, args: Sequence[str], pass_fds: Sequence[int] = ()
) -> subprocess.Popen[bytes]:
    cmd = [*VTPM, "instance", "run", "--state-dir", str(state), "--key-file", str(key)]
    cmd += ["--log-file", f"{state}.log", "--log-level", "debug", *args]
    return subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=tuple(pass_fds)
    )


def wait_log(
    state: Path, proc: subprocess.Popen[bytes], text: str, count: int, timeout: float = 20
) -> str:
    """The instance's log once it holds `text` `count` times (its `count`th start serves)."""
    log = Path(f"{state}.log")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = log.read_text() if log.exists() else ""
        if got.count(text) >= count:
            return got
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"instance exited with {proc.returncode}: {err}")
        time.sleep(0.05)
    raise AssertionError(f"instance did not log {text!r} within {timeout} s")


def serving(state: Path, proc: subprocess.Popen[bytes], start: int = 1) -> str:
    """The log once the instance's `start`th start on `state` serves."""
    return wait_log(state, proc, " serving ", start)


@contextlib.contextmanager
def running(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield proc
    finally:
        with contextlib.suppress(Exception):
            stop_process(proc, signal.SIGTERM, 20)


class CtrlClient:
    """One control connection kept open (as QEMU keeps it)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.codec = w.ControlClientConnection()

    def call(self, request: w.Request, fds: Sequence[int] = ()) -> object:
        data = self.codec.send(request)
        if fds:
            self.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(
                b for fd in fds for b in fd.to_bytes(4, "little")))])  # fmt: skip
        else:
            self.sock.sendall(data)
        while True:
            ev = self.codec.next_event()
            if ev is NEED_DATA:
                self.codec.receive_data(self.sock.recv(65536))
                continue
            return ev


def connect_unix(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(str(path))
    return s


def get_random(sock: socket.socket) -> bytes:
    return frames.parse_get_random(raw_call(sock, frames.get_random(16)))


def test_ctrl_on_an_inherited_unix_socket_with_a_data_fd(short_dir: Path) -> None:
    path = short_dir / "ctrl"
    lsock = unix_listener(path)
    os.chmod(path, 0o600)
    proc = spawn(short_dir / "s", keyfile(short_dir), ["--ctrl", f"fd:{lsock.fileno()}"],
                 [lsock.fileno()])  # fmt: skip
    lsock.close()  # the instance holds its copy
    with running(proc):
        log = serving(short_dir / "s", proc)
        assert "ctrl fd:" in log
        ctrl = CtrlClient(connect_unix(path))
        caps = ctrl.call(w.GetCapability())
        assert isinstance(caps, w.CapabilityResult) and caps.caps & w.Capability.SET_DATAFD
        mine, theirs = socket.socketpair()
        with mine, theirs:
            assert ctrl.call(w.SetDataFd(), [theirs.fileno()]) == w.Result(0)
            theirs.close()
            mine.settimeout(30)
            # served before any INIT: the TPM is powered, the client sends Startup itself
            assert frames.response_code(raw_call(mine, frames.startup())) == TPM_RC.SUCCESS
            assert len(get_random(mine)) == 16
            assert ctrl.call(w.Init(0)) == w.Result(0)
            assert frames.response_code(raw_call(mine, frames.startup())) == TPM_RC.SUCCESS
        ctrl.sock.close()
        assert proc.poll() is None  # without --terminate a client's leaving ends nothing
        assert stop_process(proc, signal.SIGTERM, 20) == 0
    assert path.exists(), "the instance unlinked a socket path it did not bind"


def test_raw_server_and_ctrl_on_inherited_tcp_sockets(short_dir: Path) -> None:
    port = free_port_pair()
    server, ctrl = tcp_listener(port), tcp_listener(port + 1)
    fds = [server.fileno(), ctrl.fileno()]
    args = ["--server", f"fd:{fds[0]}", "--ctrl", f"fd:{fds[1]}"]
    proc = spawn(short_dir / "s", keyfile(short_dir), args, fds)
    server.close()
    ctrl.close()
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    with running(proc):
        serving(short_dir / "s", proc)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            assert frames.response_code(raw_call(s, frames.startup())) == TPM_RC.SUCCESS
        assert tpm2("getrandom", "8", "--hex", tcti=tcti).stdout
        tpm2("nvdefine", NV_INDEX, "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite", tcti=tcti)
        tpm2("nvwrite", NV_INDEX, "-C", "o", "-i-", tcti=tcti, input_=b"tcp-fd!!")
        assert stop_process(proc, signal.SIGTERM, 20) == 0
    # the state was stored: a new instance on ports it binds itself reads it back
    proc = spawn(short_dir / "s", keyfile(short_dir),
                 ["--server", f"tcp:{port}", "--ctrl", f"tcp:{port + 1}"])  # fmt: skip
    with running(proc):
        serving(short_dir / "s", proc, 2)
        tpm2("startup", tcti=tcti)
        got = tpm2("nvread", NV_INDEX, "-C", "o", "-s", "8", tcti=tcti).stdout
        assert got == b"tcp-fd!!"


def test_a_descriptor_that_is_not_a_listening_socket_is_refused(short_dir: Path) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # bound, never listened on
    s.bind(("127.0.0.1", 0))
    with s:
        proc = spawn(short_dir / "s", keyfile(short_dir), ["--server", f"fd:{s.fileno()}"],
                     [s.fileno()])  # fmt: skip
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    text = err.decode()
    assert "is not a listening stream socket" in text and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1


def _nv_through_ctrl_and_data(ctrl: CtrlClient) -> socket.socket:
    mine, theirs = socket.socketpair()
    with theirs:
        assert ctrl.call(w.SetDataFd(), [theirs.fileno()]) == w.Result(0)
    mine.settimeout(30)
    assert frames.response_code(raw_call(mine, frames.startup())) == TPM_RC.SUCCESS
    return mine


@pytest.mark.parametrize("terminate", [True, False])
def test_terminate_when_the_control_client_leaves(short_dir: Path, terminate: bool) -> None:
    path = short_dir / "ctrl"
    args = ["--ctrl", f"unix:{path}"] + (["--terminate"] if terminate else [])
    proc = spawn(short_dir / "s", keyfile(short_dir), args)
    with running(proc):
        serving(short_dir / "s", proc)
        ctrl = CtrlClient(connect_unix(path))
        data = _nv_through_ctrl_and_data(ctrl)
        assert len(get_random(data)) == 16
        ctrl.sock.close()
        if terminate:
            assert proc.wait(20) == 0
            log = Path(f"{short_dir / 's'}.log").read_text()
            assert "stopping (--terminate)" in log and "vTPM stopped, state stored" in log
        else:
            time.sleep(1.5)
            assert proc.poll() is None
            assert len(get_random(data)) == 16  # still serving
        data.close()
        if not terminate:
            time.sleep(0.5)
            assert proc.poll() is None
            assert stop_process(proc, signal.SIGTERM, 20) == 0


def test_terminate_when_the_data_client_leaves(short_dir: Path) -> None:
    port = free_port_pair()
    args = ["--server", f"tcp:{port}", "--ctrl", f"tcp:{port + 1}", "--terminate"]
    proc = spawn(short_dir / "s", keyfile(short_dir), args)
    with running(proc):
        serving(short_dir / "s", proc)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            assert frames.response_code(raw_call(s, frames.startup())) == TPM_RC.SUCCESS
            # a TCP control client (tcti-swtpm: one connection per control command) leaving
            # ends nothing
            assert isinstance(ctrl_tcp(port, w.GetCapability()), w.CapabilityResult)
            assert ctrl_tcp(port, w.SetLocality(0)) == w.Result(0)
            time.sleep(0.5)
            assert proc.poll() is None  # the data client is still there
            assert len(get_random(s)) == 16
        assert proc.wait(20) == 0
        assert "stopping (--terminate)" in Path(f"{short_dir / 's'}.log").read_text()


# the migration secret -------------------------------------------------------------------------


def secret_pipe(secret: bytes) -> int:
    r, wr = os.pipe()
    os.write(wr, secret)
    os.close(wr)
    return r


def start_with_secret(
    state: Path, key: Path, vtpm: uuid.UUID, port: int, secret: bytes | None
) -> subprocess.Popen[bytes]:
    args = ["--uuid", str(vtpm), "--server", f"tcp:{port}", "--ctrl", f"tcp:{port + 1}"]
    if secret is None:
        proc = spawn(state, key, args)
    else:
        fd = secret_pipe(secret)
        proc = spawn(state, key, [*args, "--migration-secret-fd", str(fd)], [fd])
        os.close(fd)
    serving(state, proc)
    return proc


def ctrl_tcp(port: int, request: w.Request) -> object:
    with socket.create_connection(("127.0.0.1", port + 1), timeout=30) as s:
        return CtrlClient(s).call(request)


def test_state_blobs_under_a_migration_secret_go_back_only_with_it(short_dir: Path) -> None:
    key, vtpm, port = keyfile(short_dir), uuid.uuid4(), free_port_pair()
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    x = os.urandom(64)
    src = start_with_secret(short_dir / "a", key, vtpm, port, x)
    with running(src):
        tpm2("startup", "-c", tcti=tcti)
        tpm2("nvdefine", NV_INDEX, "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite", tcti=tcti)
        tpm2("nvwrite", NV_INDEX, "-C", "o", "-i-", tcti=tcti, input_=b"migrated")
        ans = ctrl_tcp(port, w.GetStateBlob(w.STATE_FLAG_DECRYPTED, w.StateBlobType.PERMANENT))
        assert isinstance(ans, w.StateBlobResult) and ans.result == 0
        assert ans.flags & w.STATE_FLAG_ENCRYPTED and len(ans.data) == ans.total_length
        blob = ans.data
        assert x not in Path(f"{short_dir / 'a'}.log").read_bytes()
        assert stop_process(src, signal.SIGTERM, 20) == 0

    def push(state: str, secret: bytes | None) -> int:
        dst = start_with_secret(short_dir / state, key, vtpm, port, secret)
        with running(dst):
            assert ctrl_tcp(port, w.Stop()) == w.Result(0)
            ans = ctrl_tcp(port, w.SetStateBlob(w.STATE_FLAG_ENCRYPTED, 1, blob))
            assert isinstance(ans, w.Result)
            assert ctrl_tcp(port, w.Init(w.INIT_FLAG_DELETE_VOLATILE)) == w.Result(0)
            tpm2("startup", "-c", tcti=tcti)
            nv = tpm2("nvread", NV_INDEX, "-C", "o", "-s", "8", tcti=tcti, check=False)
            if ans.result == 0:
                assert nv.stdout == b"migrated"  # tpm2-tools sees the migrated state
            else:
                assert nv.returncode != 0  # the fresh vTPM's own state runs on
            assert stop_process(dst, signal.SIGTERM, 20) == 0
        return ans.result

    assert push("y", os.urandom(64)) != 0  # another secret
    assert push("n", None) != 0  # no secret
    assert push("x", x) == 0  # the same secret


def test_a_bad_migration_secret_descriptor_is_one_clear_error(short_dir: Path) -> None:
    fd = secret_pipe(b"")
    proc = spawn(short_dir / "s", keyfile(short_dir),
                 ["--server", "tcp:1", "--migration-secret-fd", str(fd)], [fd])  # fmt: skip
    os.close(fd)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert "migration secret descriptor" in err.decode() and "Traceback" not in err.decode()


# PCR banks ------------------------------------------------------------------------------------


def pcr_banks(tcti: str) -> dict[str, str]:
    out = tpm2("getcap", "pcrs", tcti=tcti).stdout.decode()
    banks = {}
    for line in out.splitlines():
        name, sep, pcrs = line.strip().removeprefix("- ").partition(":")
        if sep and name != "selected-pcrs":
            banks[name] = pcrs.strip()
    return banks


def test_pcr_banks_are_allocated_and_kept_across_a_restart(short_dir: Path) -> None:
    port = free_port_pair()
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    args = ["--server", f"tcp:{port}", "--ctrl", f"tcp:{port + 1}"]
    state, key = short_dir / "s", keyfile(short_dir)
    full = "[ " + ", ".join(str(i) for i in range(24)) + " ]"
    proc = spawn(state, key, [*args, "--pcr-banks", "sha256"])
    with running(proc):
        serving(state, proc)
        assert "PCR banks allocated, active: sha256" in Path(f"{state}.log").read_text()
        tpm2("startup", "-c", tcti=tcti)
        banks = pcr_banks(tcti)
        assert banks["sha256"] == full
        assert {n for n, pcrs in banks.items() if pcrs != "[ ]"} == {"sha256"}
        assert stop_process(proc, signal.SIGTERM, 20) == 0
    proc = spawn(state, key, args)  # no flag: the TPM keeps its banks
    with running(proc):
        serving(state, proc, 2)
        tpm2("startup", "-c", tcti=tcti)
        banks = pcr_banks(tcti)
        assert {n for n, pcrs in banks.items() if pcrs != "[ ]"} == {"sha256"}
        assert stop_process(proc, signal.SIGTERM, 20) == 0
    proc = spawn(state, key, [*args, "--pcr-banks", "sha1,sha256"])  # and back
    with running(proc):
        serving(state, proc, 3)
        tpm2("startup", "-c", tcti=tcti)
        banks = pcr_banks(tcti)
        assert banks["sha1"] == full and banks["sha256"] == full


def test_pcr_banks_after_eks(short_dir: Path) -> None:
    port = free_port_pair()
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    args = ["--server", f"tcp:{port}", "--ctrl", f"tcp:{port + 1}"]
    proc = spawn(short_dir / "s", keyfile(short_dir),
                 [*args, "--ek", "rsa2048", "--pcr-banks", "sha384"])  # fmt: skip
    with running(proc):
        log = serving(short_dir / "s", proc)
        assert log.index("provisioned EKs") < log.index("PCR banks allocated, active: sha384")
        tpm2("startup", "-c", tcti=tcti)
        banks = pcr_banks(tcti)
        assert {n for n, pcrs in banks.items() if pcrs != "[ ]"} == {"sha384"}
        assert tpm2("readpublic", "-c", "0x81010001", tcti=tcti).returncode == 0


def test_an_unknown_pcr_bank_is_one_clear_error(short_dir: Path) -> None:
    proc = spawn(short_dir / "s", keyfile(short_dir), ["--server", "tcp:1", "--pcr-banks", "md5"])
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.decode().startswith("vtpm: error: --pcr-banks: unknown PCR bank 'md5'")
