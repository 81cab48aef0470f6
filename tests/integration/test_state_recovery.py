"""An instance never loses acknowledged state, says when its TPM cannot serve, and recovers:
an older Manager database (the blob is kept, the start refused), a deleted volatile blob (no
saved volatile state), a full disk (a real tmpfs: the TPM answers TPM_RC_FAILURE, `vtpm status`
says so, and once space returns it serves again with its NV data). Real Manager, swtpm as the
hardware TPM, libtpms, raw TPM frames over TCP."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ctrl_call, raw_call
from tests.mgr import GUEST1, ManagerProc, manager, new_group, new_vtpm, owner_key, wait_state
from tests.nvframes import nv_define_space, nv_read, nv_write, parse_nv_read
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_RC
from vtpm.wire import ctrl

pytestmark = pytest.mark.integration

NV_INDEX = 0x01500050
SECRET = b"NVSECRET"  # 8 bytes an NV_Write carries in clear


@contextlib.contextmanager
def tpm(port: int) -> Iterator[socket.socket]:
    """A raw-frame connection after TPM2_Startup(CLEAR) (or a TPM already started)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        rc = frames.response_code(raw_call(sock, frames.startup()))
        assert rc in (TPM_RC.SUCCESS, TPM_RC.INITIALIZE), f"Startup: {rc:#x}"
        yield sock


def write_nv(port: int, data: bytes, *, define: bool = False) -> None:
    with tpm(port) as sock:
        if define:
            assert frames.response_code(raw_call(sock, nv_define_space(NV_INDEX, 8))) == 0
        assert frames.response_code(raw_call(sock, nv_write(NV_INDEX, data))) == 0


def read_nv(port: int) -> bytes:
    with tpm(port) as sock:
        resp = raw_call(sock, nv_read(NV_INDEX, 8))
        assert frames.response_code(resp) == 0, resp.hex()
        return parse_nv_read(resp)


def snapshot_db(data_dir: Path, to: Path) -> None:
    """A consistent copy of the Manager's database (the Manager stopped)."""
    with (
        contextlib.closing(sqlite3.connect(data_dir / "manager.db")) as src,
        contextlib.closing(sqlite3.connect(to)) as dst,
    ):
        src.backup(dst)


def put_back_db(data_dir: Path, copy: Path) -> None:
    for extra in ("manager.db-wal", "manager.db-shm"):
        (data_dir / extra).unlink(missing_ok=True)
    shutil.copyfile(copy, data_dir / "manager.db")


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_older_manager_database_never_costs_the_newer_state(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with manager(data) as m:
        new_group(m, "guests", owner_key(tmp_path), pcrs="0")
        v, port = new_vtpm(m, "guests", GUEST1, start=False)
        uid = v["uuid"]
    snapshot_db(data, tmp_path / "before-first-start.db")  # records no state blob
    with manager(data) as m:
        m.cli("start", uid)
        write_nv(port, b"AAAAAAAA", define=True)
        m.cli("stop", uid)
    snapshot_db(data, tmp_path / "older.db")  # records the AAAAAAAA state
    with manager(data) as m:
        m.cli("start", uid)
        write_nv(port, b"BBBBBBBB")
        m.cli("stop", uid)
    current = tmp_path / "current.db"
    snapshot_db(data, current)
    permall = Path(v["state_dir"]) / "permall.blob"
    newest = digest(permall)

    for copy, said in (
        (tmp_path / "before-first-start.db", "the Manager records no permall state"),
        (tmp_path / "older.db", "does not match the recorded state"),
    ):
        put_back_db(data, copy)
        # the Manager's NV floor refuses an older database (tests/integration/test_floor.py);
        # an operator who accepts it on purpose still cannot lose the newer state blob
        with manager(data, run_args=("--accept-rollback",)) as m:
            res = m.cli("start", uid, check=False)
            assert res.returncode == 1, res
            err = res.stderr.strip()
            assert said in err and str(permall) in err, err
            assert "restore the Manager's database" in err or "Manager's database that" in err
            assert len(err.splitlines()) == 1 and "Traceback" not in err, err
            assert m.json("show", uid)["run"]["state"] != "running"
        assert permall.exists() and digest(permall) == newest  # kept, untouched

    put_back_db(data, current)  # the database that recorded it: nothing was lost
    with manager(data, run_args=("--accept-rollback",)) as m:  # older than the floor now
        m.cli("start", uid)
        assert read_nv(port) == b"BBBBBBBB"


def test_a_deleted_volatile_blob_is_no_saved_volatile_state(tmp_path: Path) -> None:
    with manager(tmp_path / "data") as m:
        new_group(m, "guests", owner_key(tmp_path), pcrs="0")
        v, port = new_vtpm(m, "guests", GUEST1)
        write_nv(port, SECRET, define=True)
        assert ctrl_call(("127.0.0.1", port + 1), ctrl.StoreVolatile()) == ctrl.Result(0)
        volatile = Path(v["state_dir"]) / "volatilestate.blob"
        assert volatile.exists() and "volatilestate" in m.json("show", v["uuid"])["state_blobs"]
        m.cli("stop", v["uuid"])
        volatile.unlink()  # an administrator's accident

        m.cli("start", v["uuid"])  # at once, not after five failed starts
        shown = wait_state(m, v["uuid"], "running")
        assert "volatilestate" not in shown["state_blobs"]
        assert read_nv(port) == SECRET  # the TPM needed Startup(CLEAR), and nothing else
        log = Path(shown["run"]["log"]).read_text()
        assert "WARNING" in log and "needs Startup(CLEAR)" in log, log


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root): {res.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` to the last byte; the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for chunk in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
    finally:
        os.close(fd)
    return filler


def status_row(m: ManagerProc, uid: str) -> str:
    out = m.cli("status").stdout
    return next(line for line in out.splitlines() if line.startswith(uid))


def test_a_full_disk_fails_the_tpm_visibly_and_it_recovers_with_its_state(
    tmp_path: Path,
) -> None:
    with manager(tmp_path / "data") as m:
        new_group(m, "guests", owner_key(tmp_path), pcrs="0")
        v, port = new_vtpm(m, "guests", GUEST1, start=False)
        uid = v["uuid"]
        with small_tmpfs(Path(v["state_dir"]), "512k") as state:
            m.cli("start", uid)
            write_nv(port, b"AAAAAAAA", define=True)
            filler = fill(state)
            with tpm(port) as sock:
                rc = frames.response_code(raw_call(sock, nv_write(NV_INDEX, SECRET)))
                assert rc == TPM_RC.FAILURE, f"{rc:#x}"
                # while it cannot write, every command gets a well-formed failure answer
                resp = raw_call(sock, frames.get_random(8))
                assert frames.response_code(resp) == TPM_RC.FAILURE and len(resp) == 10

                shown = m.json("show", uid)["run"]
                assert shown["state"] == "running" and "No space left" in shown["tpm_failed"]
                row = status_row(m, uid)
                assert "TPM failed" in row and "No space left" in row, row
                assert "TPM failed: " in m.cli("show", uid).stdout

                filler.unlink()  # space is back: the held write is stored, the TPM serves
                deadline = time.monotonic() + 30
                while m.json("show", uid)["run"]["tpm_failed"]:
                    assert time.monotonic() < deadline, "the TPM did not recover"
                    time.sleep(0.2)
                resp = raw_call(sock, nv_read(NV_INDEX, 8))
                assert frames.response_code(resp) == 0 and parse_nv_read(resp) == SECRET
            assert "TPM failed" not in status_row(m, uid)
            m.cli("stop", uid)  # what it holds is on disk: a restart reads it back
            m.cli("start", uid)
            assert read_nv(port) == SECRET
            log = Path(m.json("show", uid)["run"]["log"]).read_text()
            assert SECRET.hex() not in log.replace(" ", "") and SECRET.decode() not in log
            assert "Traceback" not in log, log
            m.cli("stop", uid)
