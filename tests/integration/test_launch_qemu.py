"""A measured launch of a real Linux guest: Debian's kernel and a busybox initrd under QEMU (TCG),
started by `vtpm launch --config guest.cfg`. Inside the guest, Linux's TPM driver reads PCR 4
and 5 and the initrd prints them on the serial console; they must be the reference values
`vtpm launch reference` computed from the files alone."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.guest import KERNELS, build_initrd
from tests.mgr import GUEST1, ManagerProc, manager, new_group, owner_key, wait_state

pytestmark = pytest.mark.integration

BOOT_TIMEOUT = 180.0

INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t securityfs securityfs /sys/kernel/security
echo "PCR4=$(/bin/busybox cat /sys/class/tpm/tpm0/pcr-sha256/4)"
echo "PCR5=$(/bin/busybox cat /sys/class/tpm/tpm0/pcr-sha256/5)"
/bin/busybox poweroff -f
"""


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A busybox initrd whose /init prints PCR 4 and 5 as the guest's TPM driver reads them."""
    return build_initrd(tmp_path_factory.mktemp("initrd"), INIT)


@pytest.fixture
def mgr() -> Iterator[ManagerProc]:
    data = Path(tempfile.mkdtemp(prefix="vtpm-qemu-", dir="/tmp"))  # short UNIX socket paths
    try:
        with manager(data / "data") as m:
            yield m
    finally:
        shutil.rmtree(data, ignore_errors=True)


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.5)
    return False


def launch_guest(
    mgr: ManagerProc, work: Path, vtpm_uuid: str, initrd: Path, name: str
) -> tuple[dict[str, Any], dict[str, str], Path]:
    """`vtpm launch --config` of Debian's kernel with `initrd` on vTPM `vtpm_uuid`, serial
    console to a file: (launch output, the offline reference PCR 4/5, the console file)."""
    cfg = work / "guest.cfg"
    cfg.write_text(
        f'name = "{name}-{os.getpid()}"\n'
        "memory = 256\n"
        f'kernel = "{KERNELS[-1]}"\n'
        f'ramdisk = "{initrd}"\n'
        'extra = "console=ttyS0 panic=-1 quiet"\n'
        f'vtpm = ["backend=vtpmmgr,uuid={vtpm_uuid}"]\n'
    )
    reference_file = work / "reference.json"
    mgr.cli("launch", "reference", "--config", str(cfg), "-o", str(reference_file))
    reference = json.loads(reference_file.read_text())["vtpm_pcrs"]["sha256"]
    serial = work / "serial.log"
    out = mgr.json(
        "launch", "--config", str(cfg), "--vtpm-label", GUEST1,
        "--qemu", f"-accel tcg -no-reboot -serial file:{serial}",
    )  # fmt: skip
    return out, reference, serial


def test_guest_reads_the_launch_measurements_from_its_tpm(
    tmp_path: Path, mgr: ManagerProc, initrd: Path
) -> None:
    new_group(mgr, "guests", owner_key(tmp_path))
    v = mgr.json("new", "--group", "guests", "--label", GUEST1, "--start")
    u = v["uuid"]
    out, expected, serial = launch_guest(mgr, tmp_path, u, initrd, "measured")
    pid = out["guest"]["pid"]
    assert out["expected_pcrs"]["sha256"] == expected
    try:
        booted = wait_gone(pid, BOOT_TIMEOUT)
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, 9)  # the QEMU this test started
    console = serial.read_text(errors="replace") if serial.exists() else ""
    assert booted, f"the guest did not power off within {BOOT_TIMEOUT:.0f} s:\n{console[-3000:]}"
    got = {
        line.split("=", 1)[0][3:]: line.split("=", 1)[1].strip().lower()
        for line in console.splitlines()
        if line.startswith(("PCR4=", "PCR5="))
    }
    assert got == expected, console[-3000:]

    # QEMU's exit ended the launch: the vTPM runs again, plain, with no event log left
    wait_state(mgr, u, "running", timeout=60)
    assert not (mgr.data_dir / "vtpms" / f"{u}.eventlog").exists()
