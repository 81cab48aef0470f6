"""Real QEMU (TCG, SeaBIOS) moves a running guest and its vTPM: live migration from one QEMU +
instance to a second QEMU (`-incoming defer`) on a second instance of the same vTPM (a copy of
its state directory, same key and uuid), and save to a file then restore on the same vTPM. The
TPM state travels sealed through CMD_GET/SET_STATEBLOB; the destination answers without a new
TPM2_Startup and holds the PCR values the firmware extended at the source."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port_pair, instance, raw_call, wait_connectable
from vtpm.errors import TpmResponseError
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_ALG

pytestmark = pytest.mark.integration

QEMU = shutil.which("qemu-system-x86_64")
PCRS = [0, 1, 2, 3, 4, 5, 6, 7]

needs_qemu = pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86 is installed by ./dev install; this machine lacks it"
)


class Qmp:
    """A minimal QMP client on a UNIX socket (events are skipped)."""

    def __init__(self, path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX)
        self._sock.settimeout(30)
        try:
            self._sock.connect(str(path))
        except OSError:
            self._sock.close()
            raise
        self._file = self._sock.makefile("rb")
        self._read()  # the greeting
        self.call("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ConnectionError("QMP closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def call(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            ans = self._read()
            if "event" in ans:
                continue
            if "error" in ans:
                raise AssertionError(f"QMP {command}: {ans['error']}")
            return ans["return"]

    def close(self) -> None:
        self._file.close()
        self._sock.close()


@contextlib.contextmanager
def qemu(work: Path, name: str, ctrl: str, *extra: str) -> Iterator[Qmp]:
    """QEMU with the TPM on control socket `ctrl`, driven through QMP."""
    assert QEMU is not None
    qmp_path = work / f"{name}.qmp"
    proc = subprocess.Popen(
        [
            QEMU,
            "-machine",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "128",
            "-display",
            "none",
            "-serial",
            "none",
            "-monitor",
            "none",
            "-nodefaults",
            "-qmp",
            f"unix:{qmp_path},server=on,wait=off",
            "-chardev",
            f"socket,id=chrtpm,path={ctrl}",
            "-tpmdev",
            "emulator,id=tpm0,chardev=chrtpm",
            "-device",
            "tpm-tis,tpmdev=tpm0",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    qmp: Qmp | None = None
    try:
        deadline = time.monotonic() + 30
        while qmp is None:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"QEMU {name} exited ({proc.returncode}): {err}")
            try:
                qmp = Qmp(qmp_path)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield qmp
    finally:
        if qmp is not None:
            with contextlib.suppress(Exception):
                qmp.call("quit")
            qmp.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def read_pcrs(port: int) -> list[bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return frames.parse_pcr_read(raw_call(s, frames.pcr_read(TPM_ALG.SHA256, PCRS)))


def firmware_measured(port: int, timeout: float = 90) -> list[bytes]:
    """The PCRs once SeaBIOS has measured and gone idle (PCR 0 set, nothing changes for 3 s)."""
    deadline = time.monotonic() + timeout
    last: list[bytes] = []
    while time.monotonic() < deadline:
        time.sleep(1.5)
        try:
            now = read_pcrs(port)
        except (OSError, TpmResponseError):
            continue  # before the firmware's TPM2_Startup
        if now[0] != bytes(32) and now == last:
            return now
        last = now
    raise AssertionError("the firmware's measurements did not settle")


def wait_migrated(qmp: Qmp, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = qmp.call("query-migrate").get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise AssertionError(f"migration {status}")
        time.sleep(0.2)
    raise AssertionError("the migration did not complete")


def wait_running(qmp: Qmp, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while qmp.call("query-status")["status"] != "running":
        if time.monotonic() > deadline:
            raise AssertionError(f"the guest is {qmp.call('query-status')}")
        time.sleep(0.2)


def manufacture(state: Path, key: Path) -> None:
    """A new vTPM's state directory (started once, stopped)."""
    with instance(state, key, mssim=False):
        pass


@needs_qemu
def test_live_migration_to_a_second_instance_keeps_the_pcrs(tmp_path: Path) -> None:
    key = tmp_path / "key"
    manufacture(tmp_path / "src", key)
    shutil.copytree(tmp_path / "src", tmp_path / "dst")  # the same vTPM: uuid, state, key
    src_port, dst_port = free_port_pair(), free_port_pair()
    src_ctrl, dst_ctrl = str(tmp_path / "src.ctrl"), str(tmp_path / "dst.ctrl")
    with (
        instance(tmp_path / "src", key, tcp=False, ctrl_unix=src_ctrl,
                 extra=["--server", f"tcp:127.0.0.1:{src_port}"]) as src,
        instance(tmp_path / "dst", key, tcp=False, ctrl_unix=dst_ctrl,
                 extra=["--server", f"tcp:127.0.0.1:{dst_port}"]) as dst,
    ):  # fmt: skip
        wait_connectable(("127.0.0.1", src_port), src.proc)
        wait_connectable(("127.0.0.1", dst_port), dst.proc)
        with (
            qemu(tmp_path, "source", src_ctrl) as source,
            qemu(tmp_path, "dest", dst_ctrl, "-incoming", "defer") as dest,
        ):
            firmware_measured(src_port)
            mig_port = free_port_pair()
            dest.call("migrate-incoming", uri=f"tcp:127.0.0.1:{mig_port}")
            source.call("migrate", uri=f"tcp:127.0.0.1:{mig_port}")
            wait_migrated(source)
            wait_running(dest)
            assert source.call("query-status")["status"] == "postmigrate"
            at_source = read_pcrs(src_port)  # the source guest is stopped: its final PCRs
            at_dest = read_pcrs(dst_port)  # no TPM2_Startup at the destination: resumed
        assert at_dest == at_source, f"source log:\n{src.log()}\ndest log:\n{dst.log()}"
        assert at_dest[0] != bytes(32)
        log = dst.log()
        assert "installed" in log and "refused" not in log, log
        assert "sent sealed" in src.log()  # QEMU asked for plaintext, as it always does


@needs_qemu
def test_save_to_a_file_and_restore_on_the_same_vtpm_keeps_the_pcrs(tmp_path: Path) -> None:
    key, state = tmp_path / "key", tmp_path / "state"
    saved = tmp_path / "guest.state"
    port, ctrl = free_port_pair(), str(tmp_path / "ctrl")
    extra = ["--server", f"tcp:127.0.0.1:{port}"]
    with instance(state, key, tcp=False, ctrl_unix=ctrl, extra=extra) as first:
        wait_connectable(("127.0.0.1", port), first.proc)
        with qemu(tmp_path, "saved", ctrl) as guest:
            measured = firmware_measured(port)
            guest.call("migrate", uri=f"exec:cat > {saved}")
            wait_migrated(guest)
        first.stop(signal.SIGTERM)  # whether or not QEMU's exit already ended it
    assert saved.stat().st_size > 0
    with instance(state, key, tcp=False, ctrl_unix=ctrl, extra=extra) as second:
        wait_connectable(("127.0.0.1", port), second.proc)
        with qemu(tmp_path, "restored", ctrl, "-incoming", f"exec:cat {saved}") as guest:
            wait_running(guest)
            restored = read_pcrs(port)
        assert restored == measured, second.log()
        assert "installed" in second.log()
