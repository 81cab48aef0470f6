"""QEMU's `-tpmdev emulator` boots its default firmware (SeaBIOS) against a vtpm instance."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import free_port_pair, instance, raw_call
from vtpm.errors import TpmResponseError
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_ALG

pytestmark = pytest.mark.integration

QEMU = shutil.which("qemu-system-x86_64")


def read_pcrs(port: int, pcrs: list[int]) -> list[bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return frames.parse_pcr_read(raw_call(s, frames.pcr_read(TPM_ALG.SHA256, pcrs)))


@pytest.mark.skipif(
    QEMU is None, reason="qemu-system-x86 is installed by ./dev install; this machine lacks it"
)
def test_seabios_startup_and_measurements_reach_the_instance(tmp_path: Path) -> None:
    assert QEMU is not None
    ctrl = str(tmp_path / "ctrl.sock")
    port = free_port_pair()
    with instance(
        tmp_path / "state",
        tmp_path / "key",
        tcp=False,
        ctrl_unix=ctrl,
        extra=["--server", f"tcp:127.0.0.1:{port}"],
    ) as inst:
        # nobody has sent TPM2_Startup yet: whatever PCR 0 holds later came from the firmware
        with pytest.raises(TpmResponseError, match="0x100"):
            read_pcrs(port, [0])
        qemu = subprocess.Popen(
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
                "-no-reboot",
                "-serial",
                "none",
                "-monitor",
                "none",
                "-nodefaults",
                "-chardev",
                f"socket,id=chrtpm,path={ctrl}",
                "-tpmdev",
                "emulator,id=tpm0,chardev=chrtpm",
                "-device",
                "tpm-tis,tpmdev=tpm0",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            values: list[bytes] = []
            while time.monotonic() < deadline:
                if qemu.poll() is not None:
                    err = qemu.stderr.read().decode() if qemu.stderr else ""
                    pytest.fail(f"QEMU exited early ({qemu.returncode}): {err}")
                time.sleep(1)
                try:
                    values = read_pcrs(port, [0, 4, 5])
                except (OSError, TpmResponseError):
                    continue  # before the firmware's TPM2_Startup, PCR_Read fails
                if values and values[0] != bytes(32):
                    break
        finally:
            qemu.terminate()
            qemu.wait(20)
            if qemu.stderr:
                qemu.stderr.close()
        assert len(values) == 3, f"PCRs not readable; instance log:\n{inst.log()}"
        assert values[0] != bytes(32), "the firmware's PCR 0 measurements did not reach the vTPM"
        log = inst.log()
        assert "data-fd" in log  # QEMU's data channel came over CMD_SET_DATAFD
