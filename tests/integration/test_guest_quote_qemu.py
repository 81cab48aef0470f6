"""A deep quote asked by a real Linux guest: Debian's kernel and a busybox initrd under QEMU
(TCG), launched with `vtpm launch --config`. The initrd's /init writes the vendor-specific
deep-quote command (TPM_CC 0x20000101) to the kernel's raw TPM device /dev/tpm0 (the resource
manager, /dev/tpmrm0, refuses unknown command codes), reads the response from it and prints it
in hex on the serial console. The test decodes the evidence and `vtpm verify` checks it
against the group's provisioning bundle and the nonce baked into /init; the vTPM PCRs it
carries (4 and 5) must be the launch's reference values."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest import build_initrd, octal
from tests.integration.test_launch_qemu import BOOT_TIMEOUT, launch_guest, wait_gone
from tests.mgr import GUEST1, ManagerProc, manager, new_group, owner_key, wait_state
from vtpm.instance import vendor
from vtpm.wire.evidence import decode_evidence

pytestmark = pytest.mark.integration

NONCE = bytes.fromhex("5d1c0a7e93f24b6881e0c4d2a9b37f15e6084c2d")  # fixed, made for this test
VTPM_PCR_MASK = 0x30  # the vTPM's PCR 4 and 5: the launch's measurements
HOST_PCR_MASK = 0  # the group's default host PCRs
MARKER = "DQ="


def deep_quote_command(nonce: bytes, host_mask: int, vtpm_mask: int) -> bytes:
    """The command as vtpm.instance.vendor's docstring specifies it, built independently."""
    body = struct.pack(">H", len(nonce)) + nonce + struct.pack(">II", host_mask, vtpm_mask)
    return struct.pack(">HII", 0x8001, 10 + len(body), 0x20000101) + body


def init_script(command: bytes) -> str:
    # fd 3 keeps /dev/tpm0 open between the write and the read: the kernel drops a response
    # whose file is closed. printf's output reaches the device in one write(), one command.
    return f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec 3<>/dev/tpm0
/bin/busybox printf '{octal(command)}' >&3
echo "{MARKER}$(/bin/busybox dd bs=4096 count=1 <&3 2>/dev/null \\
    | /bin/busybox hexdump -v -e '1/1 "%02x"')"
exec 3<&-
/bin/busybox poweroff -f
"""


@pytest.fixture
def mgr() -> Iterator[ManagerProc]:
    data = Path(tempfile.mkdtemp(prefix="vtpm-gq-", dir="/tmp"))  # short UNIX socket paths
    try:
        with manager(data / "data") as m:
            yield m
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_guest_asks_its_vtpm_for_a_deep_quote_through_dev_tpm0(
    tmp_path: Path, mgr: ManagerProc
) -> None:
    command = deep_quote_command(NONCE, HOST_PCR_MASK, VTPM_PCR_MASK)
    assert command == vendor.command(NONCE, [], [4, 5])
    initrd = build_initrd(tmp_path, init_script(command))

    new_group(mgr, "guests", owner_key(tmp_path))
    v = mgr.json("new", "--group", "guests", "--label", GUEST1, "--start")
    u = v["uuid"]
    bundle = tmp_path / "bundle.json"
    mgr.cli("group", "provision", "guests", "-o", str(bundle))
    out, reference, serial = launch_guest(mgr, tmp_path, u, initrd, "deepquote")
    pid = out["guest"]["pid"]
    try:
        booted = wait_gone(pid, BOOT_TIMEOUT)
    finally:
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, 9)  # the QEMU this test started
    console = serial.read_text(errors="replace") if serial.exists() else ""
    assert booted, f"the guest did not power off within {BOOT_TIMEOUT:.0f} s:\n{console[-3000:]}"
    printed = [
        line[len(MARKER) :].strip() for line in console.splitlines() if line.startswith(MARKER)
    ]
    assert len(printed) == 1, console[-3000:]
    assert re.fullmatch(r"(?:[0-9a-f]{2})+", printed[0]), console[-3000:]
    response = bytes.fromhex(printed[0])
    tag, size, rc = struct.unpack_from(">HII", response)
    assert (tag, size, rc) == (0x8001, len(response), 0), (response.hex(), mgr.log()[-3000:])

    evidence = decode_evidence(vendor.parse_response(response))
    assert evidence.info.nonce == NONCE
    assert str(evidence.info.vtpm_uuid) == u and evidence.info.label == GUEST1
    assert set(reference) == {"4", "5"}
    assert {str(i): d.hex() for i, d in evidence.info.pcr_dict().items()} == reference
    evidence_file = tmp_path / "evidence.json"
    evidence_file.write_text(json.dumps(evidence.to_json()))
    res = mgr.cli(
        "verify", "--bundle", str(bundle), "--evidence", str(evidence_file),
        "--nonce", NONCE.hex(), "--json", check=False,
    )  # fmt: skip
    verdict = json.loads(res.stdout)
    assert res.returncode == 0 and verdict["ok"] is True, verdict
    assert verdict["checks"] and all(c["ok"] for c in verdict["checks"]), verdict
    ids = {c["id"] for c in verdict["checks"]}
    assert {"quote.signature", "deep.merkle", "deep.nonce"} <= ids, verdict

    # QEMU's exit ended the launch: the vTPM runs again, plain
    wait_state(mgr, u, "running", timeout=60)
