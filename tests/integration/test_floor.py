"""The Manager's own state is never silently older or empty (issue 11, findings 3 and 5).

Against real Managers (`vtpm manager run`, their swtpm simulator as the hardware TPM, kept
across the restores: it is the hardware): a copy of the whole data directory put back later is
refused at start, with the files kept, and `--accept-rollback` starts it once; a lost (missing
or 0-byte) database beside vTPM state is refused by `run` and `init`; a kill -9 at any point of
a start never locks the Manager out. In-process, against the simulator: a crash between the
NV increment and the database write is accepted, a copy from before the last increment is not,
and the NV writes are bounded by the token bucket.
"""

from __future__ import annotations

import random
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import VTPM, stop_process, wait_connectable
from tests.mgr import (
    GUEST1,
    GUEST2,
    ManagerProc,
    init_manager,
    manager,
    new_group,
    new_vtpm,
    owner_key,
    start_manager,
    vtpm_cli,
)
from vtpm.errors import ManagerError
from vtpm.manager import floor
from vtpm.manager.floor import Floor, NvCounter
from vtpm.manager.hwtpm import HardwareTpm
from vtpm.manager.store import Store

pytestmark = pytest.mark.integration

ROLLBACK = "the data directory is older than the hardware TPM says: restored from a backup?"


def _ignore(directory: str, names: list[str]) -> set[str]:
    """Leave out the hardware TPM (it stays as it is), logs and anything not a regular file."""
    out = set()
    for n in names:
        p = Path(directory) / n
        if n == "hwtpm" or n.endswith(".log") or not (p.is_file() or p.is_dir()):
            out.add(n)
    return out


def snapshot(data_dir: Path, dest: Path) -> Path:
    shutil.copytree(data_dir, dest, ignore=_ignore, symlinks=True)
    return dest


def restore(copy: Path, data_dir: Path) -> None:
    """Put `copy` back as the data directory, its hardware TPM (hwtpm/) untouched."""
    for p in data_dir.iterdir():
        if p.name == "hwtpm":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    shutil.copytree(copy, data_dir, dirs_exist_ok=True, symlinks=True)


def tree(data_dir: Path) -> dict[str, bytes]:
    """The vTPM state files, by path."""
    root = data_dir / "vtpms"
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def run_refused(data_dir: Path, *extra: str) -> str:
    """`vtpm manager run` that must refuse to start: its one-line error."""
    log = data_dir.parent / "refused.log"
    res = subprocess.run(
        [*VTPM, "manager", "run", "--data-dir", str(data_dir), "--log-file", str(log), *extra],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr, res.stderr
    return res.stderr


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A refused start stops the simulator it started; one a kill -9 left behind is adopted
    and stopped by the next Manager."""
    return tmp_path / "data"


def test_a_restored_copy_of_the_whole_data_dir_is_refused(tmp_path: Path, data_dir: Path) -> None:
    key = owner_key(tmp_path)
    with manager(data_dir) as m:
        new_group(m, "guests", key)
        new_vtpm(m, "guests", GUEST1)
    copy = snapshot(data_dir, tmp_path / "copy")  # the Manager is stopped: a consistent copy
    with manager(data_dir) as m:
        v2, _ = new_vtpm(m, "guests", GUEST2)  # an administrative change after the copy
    restore(copy, data_dir)
    before = tree(data_dir)
    err = run_refused(data_dir)
    assert ROLLBACK in err and "--accept-rollback" in err and "newest copy" in err
    assert tree(data_dir) == before  # the state files are kept as they are
    err = run_refused(data_dir)  # and refused again: the refusal advanced nothing
    assert ROLLBACK in err

    # the operator who means it starts once on the older copy; later starts need nothing
    argv = ["manager", "run", "--data-dir", str(data_dir), "--accept-rollback"]
    proc = subprocess.Popen(
        [*VTPM, *argv, "--log-file", str(data_dir / "accept.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    m = ManagerProc(data_dir, proc)
    try:
        wait_connectable(str(data_dir / "admin.sock"), proc, timeout=60)
        assert v2["uuid"] not in {v["uuid"] for v in m.json("list")}
        audit = [e["action"] for e in m.json("audit")]
        assert "floor.accept_rollback" in audit
    finally:
        assert m.stop() == 0
    with manager(data_dir) as m:
        assert len(m.json("list")) == 1


def test_a_copy_taken_at_rest_is_refused_after_one_more_run(tmp_path: Path, data_dir: Path) -> None:
    with manager(data_dir) as m:
        new_group(m, "guests", owner_key(tmp_path))
    copy = snapshot(data_dir, tmp_path / "copy")
    with manager(data_dir):
        pass  # a run, no change: its start and its orderly stop advance the floor
    restore(copy, data_dir)
    assert ROLLBACK in run_refused(data_dir)


def test_a_kill_9_at_any_point_of_a_start_never_locks_the_manager_out(
    tmp_path: Path, data_dir: Path
) -> None:
    with manager(data_dir) as m:
        new_group(m, "guests", owner_key(tmp_path))
    rnd = random.Random(11)
    for _ in range(6):
        proc = subprocess.Popen(
            [*VTPM, "manager", "run", "--data-dir", str(data_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(rnd.uniform(0.3, 2.0))
        stop_process(proc, signal.SIGKILL, 10)
    with manager(data_dir) as m:
        assert [g["name"] for g in m.json("group", "list")] == ["guests"]


def test_a_lost_database_beside_vtpm_state_is_refused(tmp_path: Path, data_dir: Path) -> None:
    with manager(data_dir) as m:
        new_group(m, "guests", owner_key(tmp_path))
        new_vtpm(m, "guests", GUEST1)
    db = data_dir / "manager.db"
    for lose in ("empty", "missing"):
        for side in (db.with_name("manager.db-wal"), db.with_name("manager.db-shm")):
            side.unlink(missing_ok=True)
        if lose == "empty":
            db.write_bytes(b"")
        else:
            db.unlink()
        before = tree(data_dir)
        err = run_refused(data_dir)
        assert f"database {db} is missing or empty" in err
        assert "restore manager.db from the backup taken together with" in err
        res = vtpm_cli(data_dir, "manager", "init", check=False)
        assert res.returncode == 1 and "missing or empty" in res.stderr
        assert res.stderr.count("\n") == 1
        assert tree(data_dir) == before  # nothing removed or rewritten
        assert (not db.exists()) if lose == "missing" else db.stat().st_size == 0


def test_a_lost_database_is_refused_when_the_hardware_floor_says_there_was_one(
    tmp_path: Path, data_dir: Path
) -> None:
    with manager(data_dir) as m:
        new_group(m, "guests", owner_key(tmp_path))
    (data_dir / "manager.db").unlink()
    err = run_refused(data_dir)
    assert "the hardware TPM holds a vtpm Manager's floor (NV 0x01500000)" in err
    # starting over is an explicit `init`; the new database gets an index of its own
    init_manager(data_dir)
    m = start_manager(data_dir)
    try:
        assert m.json("group", "list") == []
    finally:
        m.stop()
    db = sqlite3.connect(data_dir / "manager.db")
    try:
        row = db.execute("SELECT value FROM meta WHERE key='floor_nv'").fetchone()
    finally:
        db.close()
    assert row == ("0x01500001",)


def test_a_fresh_data_dir_still_initialises_and_runs(data_dir: Path) -> None:
    init_manager(data_dir)
    m = start_manager(data_dir)
    try:
        assert m.json("list") == []
        assert "floor: NV 0x01500000 at" in m.log()
    finally:
        assert m.stop() == 0


# in-process, against the simulated hardware TPM -------------------------------------------


class FaultInjectingStore(Store):
    """Fails the write that records the counter after an increment, as a crash there would
    leave it: the in-progress marker written, the counter incremented, the value not."""

    armed = False

    def update_meta(self, values: dict[str, str], remove: tuple[str, ...] = ()) -> None:
        if self.armed and floor.K_VALUE in values:
            raise sqlite3.OperationalError("injected: the Manager died here")
        super().update_meta(values, remove)


def _copy_db(path: Path, dest: Path) -> None:
    src, dst = sqlite3.connect(path), sqlite3.connect(dest)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def test_a_crash_between_increment_and_record_is_accepted_an_older_copy_is_not(
    tmp_path: Path, hw: HardwareTpm
) -> None:
    db = tmp_path / "manager.db"
    s = FaultInjectingStore(db)
    s.open()
    f = Floor(s, hw)
    start = f.open()
    nv = NvCounter(hw)
    assert nv.read(f.handle) == start
    _copy_db(db, tmp_path / "at-rest.db")  # a copy at rest: no advance in progress

    s.armed = True
    assert f.advance("a change") is False  # "crashed" after the increment
    assert nv.read(f.handle) == start + 1
    assert s.meta(floor.K_VALUE) == str(start) and s.meta(floor.K_PENDING) == str(start + 1)
    _copy_db(db, tmp_path / "crashed.db")
    s.armed = False
    s.close()

    # the Manager's next start: the marker says the increment was its own
    shutil.copy(tmp_path / "crashed.db", db)
    s2 = Store(db)
    s2.open()
    try:
        assert Floor(s2, hw).open() == start + 2  # accepted, then the start's own advance
        assert s2.meta(floor.K_PENDING) is None
    finally:
        s2.close()

    # the copy from before those increments has no marker: refused, and nothing advances
    shutil.copy(tmp_path / "at-rest.db", db)
    for side in ("manager.db-wal", "manager.db-shm"):
        (tmp_path / side).unlink(missing_ok=True)
    s3 = Store(db)
    s3.open()
    try:
        with pytest.raises(ManagerError, match="older than the hardware TPM says"):
            Floor(s3, hw).open()
        assert nv.read(0x01500000) == start + 2
    finally:
        s3.close()


def test_an_advance_after_a_failed_record_does_not_increment_twice(
    tmp_path: Path, hw: HardwareTpm
) -> None:
    s = FaultInjectingStore(tmp_path / "manager.db")
    s.open()
    try:
        f = Floor(s, hw)
        start = f.open()
        s.armed = True
        assert not f.advance("change") and f.due  # full disk, say: retried later
        s.armed = False
        assert f.advance("retry")  # settles the first increment, then makes one more
        assert NvCounter(hw).read(f.handle) == start + 2 == int(s.meta(floor.K_VALUE) or 0)
    finally:
        s.close()


def test_nv_writes_are_bounded_by_the_token_bucket(tmp_path: Path, hw: HardwareTpm) -> None:
    now = [1_000_000.0]
    s = Store(tmp_path / "manager.db")
    s.open()
    try:
        f = Floor(s, hw, clock=lambda: now[0])
        first = f.open()  # a new floor: one increment, one token
        done = sum(f.advance("burst") for _ in range(floor.BUCKET_SIZE + 10))
        assert done == floor.BUCKET_SIZE - 1 and f.due
        assert NvCounter(hw).read(f.handle) == first + done
        f.note("vtpm.new", "ok")
        f.tick()
        assert f.due  # no token yet: the advance waits
        now[0] += floor.REFILL_SECONDS
        f.tick()
        assert not f.due and NvCounter(hw).read(f.handle) == first + done + 1
        f.note("vtpm.start", "ok")  # not an administrative change that matters
        f.note("vtpm.new", "refused")
        assert not f.due
    finally:
        s.close()
