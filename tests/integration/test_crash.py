"""Crash consistency: kill -9 of a vTPM instance or of the Manager during a stream of NV writes.

Each trial a writer thread stores an increasing counter in an NV index (TPM2_NV_Write, raw frames
over the vTPM's TCP port), noting the last value the vTPM acknowledged and the one in flight.
After a seeded random delay (0-150 ms of writing) the instance or the Manager is killed with
SIGKILL, half and half, and only what was killed is started again: the Manager by running it
again (it starts the vTPM that was running), the instance by `vtpm start` or, one time in four,
by the supervisor's own restart. Then the NV index must hold the acknowledged value or the one in
flight, never anything else; the Manager must record exactly the blobs in the state directory,
with their digests; and no `.next` (a write the Manager has not recorded) or `.tmp` file may be
left once the vTPM serves and is idle: load settles both, and a serving instance's writes
complete.

The seed is printed and named in every failure; VTPM_CRASH_SEED=N replays a run's choices (the
timing of the processes is not replayed)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import raw_call
from tests.mgr import (
    GUEST1,
    ManagerProc,
    admin_call,
    init_manager,
    new_group,
    new_vtpm,
    owner_key,
    start_manager,
)
from tests.nvframes import nv_define_space, nv_read, nv_write, parse_nv_read
from vtpm.errors import ManagerError
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_RC

pytestmark = pytest.mark.integration

NV_INDEX = 0x01500030
NV_SIZE = 8
MAX_DELAY = 0.150  # of writing before the kill
IO_TIMEOUT = 30.0  # a vTPM silent this long hangs
COME_BACK = 60.0  # what was killed serves again within this
MANAGER = "Manager"
STARTED = "instance (vtpm start)"
SUPERVISED = "instance (supervisor restart)"


def counter_bytes(value: int) -> bytes:
    return value.to_bytes(NV_SIZE, "big")


# the rig: one Manager data directory, one group, one vTPM ---------------------------------------


def _alive(pid: int) -> bool:
    """True while any thread of process `pid` runs. A zombie waiting for its parent's wait
    counts as gone, but only once all its threads are: a killed multi-threaded process shows
    its main thread as a zombie while the others still exit (and still hold its files)."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return False
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        if stat.rpartition(")")[2].split()[0] != "Z":
            return True
    return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@dataclass
class Rig:
    data_dir: Path
    manager: ManagerProc
    uuid: str
    port: int
    state_dir: Path
    seed: int
    pid: int = 0  # the instance's, as the Manager last reported it
    kills: Counter[str] = field(default_factory=Counter)

    def admin(self, op: str, **params: Any) -> Any:
        """One admin request, as the `vtpm` CLI sends it, without a process per call."""
        return admin_call(self.data_dir, op, **params)

    def show(self) -> Any:
        return self.admin("vtpm.show", uuid=self.uuid)

    def fail(self, trial: int, what: str) -> str:
        return f"seed {self.seed}, trial {trial}: {what}"

    def wait_gone(self, pid: int, what: str) -> None:
        deadline = time.monotonic() + COME_BACK
        while _alive(pid):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} (pid {pid}) is still alive after {COME_BACK:.0f} s")
            time.sleep(0.005)

    def wait_running(self, dead: int = 0) -> None:
        """Until the Manager reports that an instance other than `dead` serves (said Ready).

        `dead` is not trusted to be gone from the report: Popen.poll() answers None while
        another thread is in it, so `vtpm show` can call a dead instance running a while."""
        deadline = time.monotonic() + COME_BACK
        while True:
            run = self.show()["run"]
            if run["state"] == "running" and run["pid"] not in (None, dead):
                self.pid = run["pid"]
                return
            if run["state"] == "failed" or time.monotonic() > deadline:
                raise AssertionError(f"the vTPM did not come back: {run}")
            time.sleep(0.02)

    def connect(self) -> socket.socket:
        """A raw-frame connection to the vTPM, after TPM2_Startup(CLEAR)."""
        deadline = time.monotonic() + COME_BACK
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=IO_TIMEOUT)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
                continue
            try:
                rc = frames.response_code(raw_call(sock, frames.startup()))
            except OSError:
                sock.close()  # the instance went away again while starting; it will be back
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
                continue
            assert rc in (TPM_RC.SUCCESS, TPM_RC.INITIALIZE), f"Startup: {rc:#x}"
            return sock

    def kill_instance(self, *, supervised: bool) -> None:
        """SIGKILL the instance, then `vtpm start` it or leave that to the supervisor."""
        pid = self.pid
        os.kill(pid, signal.SIGKILL)
        self.kills[SUPERVISED if supervised else STARTED] += 1
        self.wait_gone(pid, "the killed instance")
        if not supervised:
            try:
                self.admin("vtpm.start", uuid=self.uuid)  # returns once the instance serves
            except ManagerError as e:
                if "already" not in str(e):  # else the supervisor was first (0.5 s and up)
                    raise
        self.wait_running(dead=pid)

    def kill_manager(self) -> None:
        self.manager.stop(signal.SIGKILL)
        self.kills[MANAGER] += 1
        # its instance loses the link and exits on its own; until it has, it still holds the
        # port and would answer from a state that may never have been recorded
        self.wait_gone(self.pid, "the instance of the killed Manager")
        self.manager = start_manager(self.data_dir)  # autostart brings the vTPM back
        self.wait_running(dead=self.pid)

    def check_files(self, trial: int) -> None:
        """The Manager records exactly the blobs on disk (permall among them), with their
        digests, and no write is left half done."""
        recorded = self.show()["state_blobs"]
        on_disk = {
            p.stem: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in self.state_dir.glob("*.blob")
        }
        assert "permall" in recorded and recorded == on_disk, self.fail(
            trial, f"the Manager records {recorded}, the state directory holds {on_disk}"
        )
        left = sorted(p.name for p in self.state_dir.iterdir() if p.suffix in (".next", ".tmp"))
        assert left == [], self.fail(trial, f"left behind while running and idle: {left}")


@contextlib.contextmanager
def rig(tmp_path: Path, seed: int) -> Iterator[Rig]:
    data_dir = tmp_path / "mgr"
    init_manager(data_dir)
    manager = start_manager(data_dir)
    r: Rig | None = None
    try:
        new_group(manager, "g1", owner_key(tmp_path), pcrs="0")
        view, port = new_vtpm(manager, "g1", GUEST1)
        r = Rig(data_dir, manager, view["uuid"], port, Path(view["state_dir"]), seed)
        r.wait_running()
        yield r
    finally:
        _teardown(data_dir, r.manager if r is not None else manager)


def _teardown(data_dir: Path, manager: ManagerProc) -> None:
    """Stop the Manager (it stops its instance and simulator); kill what a failure left."""
    if manager.proc.poll() is None:
        with contextlib.suppress(Exception):
            manager.stop()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and str(data_dir) in _cmdline(int(proc.name)):
            with contextlib.suppress(OSError):
                os.kill(int(proc.name), signal.SIGKILL)


# the writer ------------------------------------------------------------------------------------


@dataclass
class Writer:
    """Writes value, value + 1, ... until the vTPM fails or goes away."""

    sock: socket.socket
    next_value: int
    acked: int
    in_flight: int | None = None
    ended_by: str = ""
    writes: int = 0

    def run(self) -> None:
        while True:
            value = self.next_value
            self.in_flight = value
            try:
                rc = frames.response_code(
                    raw_call(self.sock, nv_write(NV_INDEX, counter_bytes(value)))
                )
            except TimeoutError:
                self.ended_by = "timeout"
                return
            except OSError as e:
                self.ended_by = type(e).__name__
                return
            if rc != TPM_RC.SUCCESS:
                self.ended_by = f"rc {rc:#x}"
                return
            self.acked = value
            self.in_flight = None
            self.next_value = value + 1
            self.writes += 1


def run_trials(r: Rig, trials: int) -> None:
    rng = random.Random(r.seed)
    # half the kills hit the Manager; of those of the instance, a quarter wait for the
    # supervisor's restart (0.5 s and up), the others `vtpm start` it at once
    victims = [MANAGER] * (trials // 2) + [SUPERVISED] * ((trials - trials // 2) // 4)
    victims += [STARTED] * (trials - len(victims))
    rng.shuffle(victims)
    sock = r.connect()
    assert frames.response_code(raw_call(sock, nv_define_space(NV_INDEX, NV_SIZE))) == 0
    assert frames.response_code(raw_call(sock, nv_write(NV_INDEX, counter_bytes(0)))) == 0
    acked, next_value = 0, 1
    writes = 0
    ended: Counter[str] = Counter()
    found: Counter[str] = Counter()
    for trial, victim in enumerate(victims):
        delay = rng.uniform(0, MAX_DELAY)
        w = Writer(sock, next_value, acked)
        t = threading.Thread(target=w.run, name="nv-writer", daemon=True)
        t.start()
        time.sleep(delay)
        assert t.is_alive(), r.fail(trial, f"the writes failed before any kill: {w.ended_by}")
        if victim == MANAGER:
            r.kill_manager()
        else:
            r.kill_instance(supervised=victim == SUPERVISED)
        t.join(IO_TIMEOUT + 5)
        assert not t.is_alive(), r.fail(trial, f"{victim} killed: the writer still waits")
        assert w.ended_by != "timeout", r.fail(trial, f"{victim} killed: the vTPM hangs")
        sock.close()
        ended[w.ended_by] += 1
        writes += w.writes
        sock = r.connect()
        resp = raw_call(sock, nv_read(NV_INDEX, NV_SIZE))
        assert frames.response_code(resp) == 0, r.fail(trial, f"NV_Read: {resp.hex()}")
        value = int.from_bytes(parse_nv_read(resp), "big")
        allowed = {w.acked} if w.in_flight is None else {w.acked, w.in_flight}
        assert value in allowed, r.fail(
            trial,
            f"{victim} killed {delay * 1000:.0f} ms into the stream: the NV index holds "
            f"{value}; acknowledged {w.acked}, in flight {w.in_flight}",
        )
        r.check_files(trial)
        found[f"{victim}: {'in flight' if value == w.in_flight else 'acknowledged'}"] += 1
        # the next trial writes only values never written before, so that a lost write
        # coming back later cannot pass for a new one
        acked, next_value = value, max(value, w.in_flight or 0) + 1
    sock.close()
    print(
        f"seed {r.seed}: {trials} trials, kills {dict(r.kills)}, {writes} acknowledged writes; "
        f"NV after a kill held {dict(sorted(found.items()))}; writers ended by {dict(ended)}"
    )


def _seed() -> int:
    env = os.environ.get("VTPM_CRASH_SEED")
    return int(env) if env else random.SystemRandom().randrange(2**32)


@pytest.mark.parametrize(
    "trials",
    [
        pytest.param(200, marks=pytest.mark.timeout(900)),
        pytest.param(1000, marks=[pytest.mark.slow, pytest.mark.timeout(4500)]),
    ],
)
def test_kill_9_during_nv_writes_keeps_the_acknowledged_state(tmp_path: Path, trials: int) -> None:
    seed = _seed()
    print(f"VTPM_CRASH_SEED={seed}")
    with rig(tmp_path, seed) as r:
        run_trials(r, trials)
    assert r.kills[MANAGER] == trials // 2 and r.kills[SUPERVISED] >= trials // 8
