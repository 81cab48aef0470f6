"""The Manager fails closed when its hardware TPM goes away, and recovers without a restart.

Real parts: `vtpm manager run` with its swtpm simulator as the hardware TPM (its pid in
`<data>/hwtpm/simulator.json`), real instances, tpm2-tools as the guest. The simulator is killed
with -9; while it is away no state key is released (an explicit start, an instance restarted by
the supervisor), status says the hardware TPM is down; once a simulator serves the state again
(restarted by the Manager, or by hand the way the Manager starts it) keys are released again
and the guest's sealed secret unseals.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import tpm2
from tests.integration.test_manager import SECRET, seal_secret, tcti, unseal_secret
from tests.mgr import (
    GUEST1,
    GUEST2,
    ManagerProc,
    manager,
    new_group,
    new_vtpm,
    owner_key,
    start_manager,
    wait_state,
)
from vtpm.manager.simulator import Simulator

pytestmark = pytest.mark.integration

RECOVERY_TIMEOUT = 60.0  # the Manager's first reconnection attempt comes 5 s into an outage


def _record(data_dir: Path) -> tuple[int, int]:
    raw = json.loads((data_dir / "hwtpm" / "simulator.json").read_text())
    return raw["pid"], raw["port"]


def _kill_simulator(data_dir: Path) -> tuple[int, int]:
    """SIGKILL the Manager's simulator; wait until its ports are free again."""
    pid, port = _record(data_dir)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return pid, port
        except OSError:
            assert time.monotonic() < deadline, f"port {port} still busy after killing {pid}"
            time.sleep(0.02)


def _simulators(state_dir: Path) -> list[int]:
    """Live swtpm processes serving `state_dir`."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{name}/stat").read_text().split()[2]
        except OSError:
            continue
        ours = Path(argv[0].decode()).name == "swtpm" and f"dir={state_dir}".encode() in argv
        if ours and state != "Z":
            out.append(int(name))
    return out


def _gone(pid: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, f"process {pid} is still running"
        time.sleep(0.1)


def _refused_start(m: ManagerProc, vtpm_uuid: str) -> None:
    res = m.cli("start", vtpm_uuid, check=False)
    assert res.returncode == 1, res.stdout
    assert "hardware TPM unreachable" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1  # one clear line, no traceback


def _shows_down(m: ManagerProc) -> None:
    st = m.json("manager", "status")
    assert st["hardware_tpm"]["state"] == "down", st["hardware_tpm"]
    assert "unreachable" in st["hardware_tpm"]["error"]
    assert all(not g["status"]["unlocked"] for g in st["groups"])
    assert all("hardware TPM unreachable" in g["status"]["reason"] for g in st["groups"])
    text = m.cli("manager", "status").stdout
    assert "DOWN" in text and "LOCKED: hardware TPM unreachable" in text, text


def _wait_recovered(m: ManagerProc) -> Any:
    deadline = time.monotonic() + RECOVERY_TIMEOUT
    while True:
        st = m.json("manager", "status")
        if st["hardware_tpm"]["state"] == "ok" and all(
            g["status"]["unlocked"] for g in st["groups"]
        ):
            return st
        assert time.monotonic() < deadline, f"the hardware TPM did not come back: {st}"
        time.sleep(0.5)


def _audited_refusals(m: ManagerProc, action: str) -> list[Any]:
    return [
        e
        for e in m.json("audit", "--limit", "1000")
        if e["action"] == action
        and e["outcome"] == "refused"
        and "hardware TPM unreachable" in e["detail"]
    ]


def test_no_key_release_while_the_simulator_is_down_then_the_manager_restarts_it(
    tmp_path: Path,
) -> None:
    with manager(tmp_path / "data") as m:
        new_group(m, "guests", owner_key(tmp_path))
        v, port = new_vtpm(m, "guests", GUEST1)
        other, other_port = new_vtpm(m, "guests", GUEST2)  # running when the TPM goes
        tpm2("startup", "-c", tcti=tcti(other_port))
        seal_secret(port, tmp_path)
        m.cli("stop", v["uuid"])
        instance = m.json("show", other["uuid"])["run"]["pid"]
        dead, _ = _kill_simulator(m.data_dir)
        quote = m.cli("quote", "--deep", other["uuid"], "--nonce", "0102", check=False)
        assert quote.returncode == 1 and "unreachable" in quote.stderr, quote.stderr
        os.kill(instance, signal.SIGKILL)  # the supervisor restarts it: it must get no key

        _refused_start(m, v["uuid"])
        _shows_down(m)
        deadline = time.monotonic() + 20
        while not _audited_refusals(m, "key.release"):
            assert time.monotonic() < deadline, "the restarted instance was not refused"
            time.sleep(0.2)
        assert _audited_refusals(m, "vtpm.start")
        assert "key released" not in m.log().split("hardware TPM down")[-1]

        _wait_recovered(m)  # the Manager restarted its simulator on the same state
        pid, _ = _record(m.data_dir)
        assert pid != dead and _simulators(m.data_dir / "hwtpm") == [pid]
        m.cli("start", v["uuid"])
        assert unseal_secret(port, tmp_path) == SECRET
        if m.json("show", other["uuid"])["run"]["state"] != "running":
            m.cli("start", other["uuid"])  # it may have given up meanwhile
        wait_state(m, other["uuid"], "running")


def test_a_simulator_restarted_by_hand_is_adopted(tmp_path: Path) -> None:
    with manager(tmp_path / "data") as m:
        state_dir = m.data_dir / "hwtpm"
        new_group(m, "guests", owner_key(tmp_path))
        v, port = new_vtpm(m, "guests", GUEST1)
        seal_secret(port, tmp_path)
        m.cli("stop", v["uuid"])
        _, sim_port = _kill_simulator(m.data_dir)
        _refused_start(m, v["uuid"])

        # started as the Manager starts it; the record still names the dead simulator
        by_hand = subprocess.Popen(
            Simulator(state_dir)._argv(sim_port), stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            _wait_recovered(m)
            assert _record(m.data_dir) == (by_hand.pid, sim_port)  # adopted, record rewritten
            assert _simulators(state_dir) == [by_hand.pid]  # never two on one state
            m.cli("start", v["uuid"])
            assert unseal_secret(port, tmp_path) == SECRET
        finally:
            m.stop()
            if by_hand.poll() is None:  # the Manager stops what it adopted
                by_hand.kill()
            by_hand.wait()


def test_a_new_manager_adopts_a_simulator_restarted_by_hand(tmp_path: Path) -> None:
    """Was: "Could not lock access to lockfile" (the record named the dead simulator, so the
    Manager started a second swtpm on the state the hand-started one had locked)."""
    data = tmp_path / "data"
    with manager(data) as m:
        new_group(m, "guests", owner_key(tmp_path))
        v, port = new_vtpm(m, "guests", GUEST1)
        seal_secret(port, tmp_path)
        instance = m.json("show", v["uuid"])["run"]["pid"]
        m.stop(signal.SIGKILL)  # the simulator outlives it, as after any crash of the Manager
    _gone(instance)  # its instance follows it (the custody link closed)
    _, sim_port = _kill_simulator(data)
    by_hand = subprocess.Popen(
        Simulator(data / "hwtpm")._argv(sim_port), stdin=subprocess.DEVNULL, start_new_session=True
    )
    try:
        again = start_manager(data)
        try:
            assert _record(data) == (by_hand.pid, sim_port)
            assert _simulators(data / "hwtpm") == [by_hand.pid]
            wait_state(again, v["uuid"], "running")  # autostarted: it was running
            assert unseal_secret(port, tmp_path) == SECRET
        finally:
            again.stop()
    finally:
        if by_hand.poll() is None:
            by_hand.kill()
        by_hand.wait()
