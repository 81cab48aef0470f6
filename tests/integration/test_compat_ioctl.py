"""The compat `swtpm_ioctl` (installed as the compat directory installs it) against a real swtpm
and a real vtpm instance, over UNIX and TCP control channels."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import free_port_pair, instance, stop_process, wait_connectable
from vtpm.compat import install

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def compat_bin() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vtc-") as d:
        directory = Path(d) / "bin"
        install.install(directory, sys.executable)
        yield directory


def ioctl(compat_bin: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(compat_bin / "swtpm_ioctl"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="vti-") as d:
        yield Path(d)


def test_against_real_swtpm(compat_bin: Path, short_tmp: Path) -> None:
    ctrl = str(short_tmp / "c.sock")
    port = free_port_pair()
    (short_tmp / "st").mkdir()
    proc = subprocess.Popen(
        [
            "swtpm",
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={short_tmp / 'st'}",
            "--ctrl",
            f"type=unixio,path={ctrl}",
            "--server",
            f"type=tcp,port={port}",
            "--flags",
            "not-need-init,startup-clear",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_connectable(ctrl, proc)
        caps = ioctl(compat_bin, "--unix", ctrl, "-c")
        assert caps.returncode == 0, caps.stderr
        assert caps.stdout.strip() == "capabilities: 0x0000ffff"  # swtpm 0.7.1's
        got = ioctl(compat_bin, "--unix", ctrl, "--info", "1")
        assert got.returncode == 0 and "TPMSpecification" in json.loads(got.stdout)
        assert ioctl(compat_bin, "--unix", ctrl, "-e").stdout.startswith("tpmEstablished: ")
        assert ioctl(compat_bin, "--unix", ctrl, "-v").returncode == 0
        size = ioctl(compat_bin, "--unix", ctrl, "-b", "0")
        assert size.returncode == 0 and "maximum 4096" in size.stdout
        bad = ioctl(compat_bin, "--unix", ctrl, "-l", "9")
        assert bad.returncode == 1 and "outside 0..4" in bad.stderr
        down = ioctl(compat_bin, "--unix", ctrl, "-s")
        assert down.returncode == 0, down.stderr
        assert proc.wait(10) == 0
    finally:
        stop_process(proc, signal.SIGKILL, 5)


def test_against_vtpm_instance(compat_bin: Path, short_tmp: Path) -> None:
    ctrl = str(short_tmp / "c.sock")
    with instance(short_tmp / "st", short_tmp / "k", ctrl_unix=ctrl, mssim=False) as inst:
        caps = ioctl(compat_bin, "--unix", ctrl, "-c")
        assert caps.returncode == 0, caps.stderr
        assert caps.stdout.startswith("capabilities: 0x")
        assert int(caps.stdout.split()[-1], 16) & 0x7 == 0x7  # INIT, SHUTDOWN, ESTABLISHED
        assert inst.port is not None
        tcp = ioctl(compat_bin, "--tcp", f"127.0.0.1:{inst.port + 1}", "-g")
        assert tcp.returncode == 0 and tcp.stdout.startswith("configuration flags: 0x")
        assert ioctl(compat_bin, "--unix", ctrl, "--stop").returncode == 0
        assert ioctl(compat_bin, "--unix", ctrl, "-i").returncode == 0
        saved = short_tmp / "perm.blob"
        save = ioctl(compat_bin, "--unix", ctrl, "--save", "permanent", str(saved))
        assert save.returncode == 0, save.stderr
        assert saved.stat().st_size > 100
        down = ioctl(compat_bin, "--unix", ctrl, "-s")
        assert down.returncode == 0, down.stderr
        assert inst.proc.wait(20) == 0


def test_nothing_listening(compat_bin: Path, short_tmp: Path) -> None:
    got = ioctl(compat_bin, "--unix", str(short_tmp / "none.sock"), "-s")
    assert got.returncode == 1
    assert got.stderr.count("\n") == 1 and "cannot connect" in got.stderr
