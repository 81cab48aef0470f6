"""The compat directory as installed in a virtualenv: `python -m vtpm.compat.install` (what
scripts/install.sh runs), `vtpm compat dir`, the process name the kernel gives the scripts,
and what the front door sends before any Manager answers (observed on a listening socket)."""

from __future__ import annotations

import json
import os
import site
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import vtpm
from tests.helpers import stop_process
from vtpm.wire import compat, ipc
from vtpm.wire._common import NEED_DATA

pytestmark = pytest.mark.integration


@pytest.fixture
def venv(tmp_path: Path) -> Iterator[Path]:
    """A fresh virtualenv that sees this one's packages (a .pth file), without pip."""
    root = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    pure = subprocess.run(
        [
            str(root / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_path('purelib'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # this venv's packages, and the project's source (an editable install's own .pth file is not
    # read from a directory that another .pth file adds)
    project = Path(vtpm.__file__).resolve().parents[1]
    paths = [*site.getsitepackages(), str(project)]
    Path(pure, "outer.pth").write_text("\n".join(paths) + "\n")
    yield root


def run(
    venv: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "python"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_install_is_idempotent_and_compat_dir_finds_it(venv: Path) -> None:
    missing = run(venv, "-m", "vtpm.cli.main", "compat", "dir")
    assert missing.returncode == 1
    assert missing.stderr.count("\n") == 1 and "not installed" in missing.stderr
    first = run(venv, "-m", "vtpm.compat.install")
    assert first.returncode == 0 and "swtpm, swtpm_setup, swtpm_ioctl" in first.stderr
    bindir = venv / "compat" / "bin"
    mtimes = {p.name: p.stat().st_mtime_ns for p in bindir.iterdir()}
    again = run(venv, "-m", "vtpm.compat.install")
    assert again.returncode == 0 and again.stderr == ""  # nothing to do
    assert {p.name: p.stat().st_mtime_ns for p in bindir.iterdir()} == mtimes
    for name in ("swtpm", "swtpm_setup", "swtpm_ioctl"):
        text = (bindir / name).read_text()
        assert text.startswith(f"#!{venv}/bin/python\n")  # the venv's, not a shell wrapper
        assert os.access(bindir / name, os.X_OK)
    where = run(venv, "-m", "vtpm.cli.main", "compat", "dir")
    assert where.returncode == 0 and where.stdout.strip() == str(bindir)
    doc = json.loads(run(venv, "-m", "vtpm.cli.main", "compat", "dir", "--json").stdout)
    assert doc == {"ok": True, "result": {"dir": str(bindir)}}
    caps = subprocess.run(
        [str(bindir / "swtpm_setup"), "--print-capabilities"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(caps.stdout)["type"] == "swtpm_setup"


def _attach_request(conn: socket.socket) -> tuple[compat.Request[object], list[int]]:
    codec = ipc.IpcConnection(ipc.Role.MANAGER)
    fds: list[int] = []
    while True:
        ev = codec.next_event()
        if ev is not NEED_DATA:
            assert isinstance(ev, ipc.AdminRequest)
            return compat.parse_request(ev), fds
        data, got, _flags, _addr = socket.recv_fds(conn, 65536, compat.FDS_MAX)
        fds += got
        codec.receive_data(data)


def test_front_door_names_itself_swtpm_and_passes_its_sockets(venv: Path, tmp_path: Path) -> None:
    assert run(venv, "-m", "vtpm.compat.install").returncode == 0
    door_path = str(tmp_path / "door.sock")
    door = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    door.bind(door_path)
    door.listen(1)
    door.settimeout(30)
    state = tmp_path / "st"
    state.mkdir()
    (state / "x").write_text("not empty: an attach, no setup first")
    ctrl = str(tmp_path / "c.sock")
    proc = subprocess.Popen(
        [
            str(venv / "compat" / "bin" / "swtpm"),
            *("socket", "--tpm2", "--tpmstate", f"dir={state}", "--terminate"),
            *("--ctrl", f"type=unixio,path={ctrl},mode=0660", "--key", "pwdfd=0"),
        ],
        env=dict(os.environ, VTPM_COMPAT_SOCKET=door_path),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdin is not None
        proc.stdin.write(b"passphrase")
        proc.stdin.close()
        conn, _ = door.accept()
        with conn:
            req, fds = _attach_request(conn)
            assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "swtpm"
            assert isinstance(req, compat.Attach)
            assert req.state == compat.StateLocation(compat.StateKind.DIR, str(state))
            assert req.fds == (compat.FdRole.STATE, compat.FdRole.CTRL)
            assert req.terminate and req.secret == b"passphrase"
            assert len(fds) == 2
            assert os.fstat(fds[0]).st_ino == state.stat().st_ino
            passed = socket.socket(fileno=fds[1])
            assert passed.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
            assert os.stat(ctrl).st_mode & 0o777 == 0o660
            passed.close()
            os.close(fds[0])
            conn.sendall(
                ipc.IpcConnection(ipc.Role.MANAGER).send(
                    ipc.AdminReply(False, error="no such vTPM here")
                )
            )
        t0 = time.monotonic()
        assert proc.wait(10) == 1
        assert time.monotonic() - t0 < 5
        assert proc.stderr is not None
        assert proc.stderr.read().decode() == "swtpm: error: no such vTPM here\n"
        assert not os.path.exists(ctrl)  # removed: it was this process's
    finally:
        stop_process(proc, 9, 5)
        door.close()
