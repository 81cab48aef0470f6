"""Shared helpers for tests: start real `vtpm instance` processes, pick ports, run tpm2-tools."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vtpm.wire import ctrl
from vtpm.wire._common import NEED_DATA

VENV_BIN = Path(sys.executable).parent
VTPM = [sys.executable, "-m", "vtpm.cli.main"]


def free_port_pair() -> int:
    """A port P such that P and P+1 are free on 127.0.0.1, below Linux's ephemeral range
    (32768..60999): a port there can be taken by any client's connect while a vTPM that
    listened on it restarts."""
    for _ in range(200):
        port = random.randrange(10000, 32766, 2)
        ok = True
        for p in (port, port + 1):
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                ok = False
            finally:
                s.close()
        if ok:
            return port
    raise RuntimeError("no free port pair")


def stop_process(proc: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
    """Signal `proc`, wait for it (killing it after `timeout`, then raising), close its
    stderr pipe, and return its exit code."""
    try:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
    finally:
        if proc.stderr:
            proc.stderr.close()
    return proc.returncode


def wait_connectable(
    addr: str | tuple[str, int], proc: subprocess.Popen[bytes], timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = ""
            if proc.stderr:
                err = proc.stderr.read().decode()
                proc.stderr.close()
            raise RuntimeError(f"vtpm instance exited with {proc.returncode}: {err}")
        fam = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        try:
            s.connect(addr)
            return
        except OSError:
            time.sleep(0.05)
        finally:
            s.close()
    raise RuntimeError(f"vtpm instance did not listen on {addr} within {timeout}s")


@dataclass
class RunningInstance:
    proc: subprocess.Popen[bytes]
    state_dir: Path
    key_file: Path
    port: int | None = None
    ctrl_path: str | None = None
    log_file: Path | None = None
    args: list[str] = field(default_factory=list)

    @property
    def tcti_swtpm(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def tcti_mssim(self) -> str:
        assert self.port is not None
        return f"mssim:host=127.0.0.1,port={self.port + 2}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        return stop_process(self.proc, sig, timeout)

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file and self.log_file.exists() else ""


def start_instance(
    state_dir: Path,
    key_file: Path,
    *,
    tpm: str = "2.0",
    tcp: bool = True,
    mssim: bool = True,
    ctrl_unix: str | None = None,
    extra: Sequence[str] = (),
    port: int | None = None,
) -> RunningInstance:
    """`vtpm instance run` with raw+ctrl on P/P+1 and mssim on P+2/P+3 (all TCP)."""
    if not key_file.exists():
        subprocess.run(
            [*VTPM, "instance", "keygen", str(key_file)], check=True, capture_output=True
        )
    args = [
        "instance",
        "run",
        "--state-dir",
        str(state_dir),
        "--key-file",
        str(key_file),
        "--tpm",
        tpm,
        "--log-file",
        str(state_dir.parent / f"{state_dir.name}.log"),
        "--log-level",
        "debug",
    ]
    wait_for: str | tuple[str, int]
    if tcp:
        if port is None:
            port = free_port_pair()
            # mssim needs P+2/P+3 free too
            while mssim and not _pair_free(port + 2):
                port = free_port_pair()
        args += ["--server", f"tcp:127.0.0.1:{port}", "--ctrl", f"tcp:127.0.0.1:{port + 1}"]
        if mssim:
            args += ["--mssim", f"tcp:127.0.0.1:{port + 2}"]
        wait_for = ("127.0.0.1", port)
    if ctrl_unix:
        args += ["--ctrl", f"unix:{ctrl_unix}"]
        wait_for = ctrl_unix
    args += list(extra)
    proc = subprocess.Popen([*VTPM, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    inst = RunningInstance(
        proc, state_dir, key_file, port, ctrl_unix, state_dir.parent / f"{state_dir.name}.log", args
    )
    try:
        wait_connectable(wait_for, proc)
        if tcp and mssim and port is not None:
            wait_connectable(("127.0.0.1", port + 2), proc)
    except BaseException:
        with contextlib.suppress(Exception):
            inst.stop(signal.SIGKILL)
        raise
    return inst


def _pair_free(port: int) -> bool:
    for p in (port, port + 1):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            return False
        finally:
            s.close()
    return True


@contextlib.contextmanager
def instance(state_dir: Path, key_file: Path, **kw: object) -> Iterator[RunningInstance]:
    inst = start_instance(state_dir, key_file, **kw)  # type: ignore[arg-type]
    try:
        yield inst
    finally:
        with contextlib.suppress(Exception):
            inst.stop()


def tpm2(
    tool: str,
    *args: str,
    tcti: str,
    cwd: Path | None = None,
    check: bool = True,
    input_: bytes | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a tpm2-tools command against `tcti`."""
    exe = shutil.which(f"tpm2_{tool}") or f"tpm2_{tool}"
    env = dict(os.environ, TPM2TOOLS_TCTI=tcti)
    res = subprocess.run(
        [exe, *args], cwd=cwd, env=env, capture_output=True, input=input_, timeout=60, check=False
    )
    if check and res.returncode != 0:
        raise AssertionError(
            f"tpm2_{tool} {' '.join(args)} failed ({res.returncode}): "
            f"{res.stderr.decode(errors='replace')}"
        )
    return res


def ctrl_call(addr: str | tuple[str, int], request: object) -> object:
    """Send one control-channel request (our own client codec) and return the answer."""
    fam = socket.AF_UNIX if isinstance(addr, str) else socket.AF_INET
    client = ctrl.ControlClientConnection()
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(addr)
        s.sendall(client.send(request))  # type: ignore[arg-type]
        while True:
            ev = client.next_event()
            if ev is NEED_DATA:
                client.receive_data(s.recv(65536))
                continue
            return ev


def power_cycle(inst: RunningInstance) -> None:
    """Restart the instance's TPM through its control channel (CMD_INIT)."""
    assert inst.port is not None
    ans = ctrl_call(("127.0.0.1", inst.port + 1), ctrl.Init(0))
    assert ans == ctrl.Result(0), ans


def raw_call(sock: socket.socket, command: bytes) -> bytes:
    """Send one TPM command on a raw frame socket and read its whole response."""
    sock.sendall(command)
    buf = b""
    while len(buf) < 10 or len(buf) < struct.unpack_from(">I", buf, 2)[0]:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("the instance closed the connection")
        buf += chunk
    return buf


def unix_listener(path: str | Path) -> socket.socket:
    """A listening UNIX socket at `path`, as an orchestrator's process binds it."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(8)
    return s


def tcp_listener(port: int) -> socket.socket:
    """A listening TCP socket on 127.0.0.1:`port`."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(8)
    return s


class DictJournal:
    """A `StateJournal` held in a dict: the Manager's record of blob digests, without a
    Manager (the counters recorded too)."""

    def __init__(self) -> None:
        self.digests: dict[str, bytes] = {}
        self.counters: dict[str, int] = {}
        self.deletions: list[str] = []

    def expected(self, name: str) -> bytes | None:
        return self.digests.get(name)

    def written(self, name: str, counter: int, digest: bytes) -> None:
        self.digests[name] = digest
        self.counters[name] = counter

    def deleted(self, name: str) -> None:
        self.deletions.append(name)
        self.digests.pop(name, None)


class MemoryStore:
    """Blobs held in memory: the device's state backend for tests that need no encryption or
    files (the engine and libtpms stay real)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def load(self, name: str) -> bytes | None:
        return self.blobs.get(name)

    def store(self, name: str, data: bytes) -> None:
        self.blobs[name] = data

    def delete(self, name: str, must_exist: bool) -> bool:
        return self.blobs.pop(name, None) is not None

    def exists(self, name: str) -> bool:
        return name in self.blobs
