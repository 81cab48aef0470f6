"""The fork server: the Manager's vTPMs are forked from a template that holds no secret, do not
share randomness, and outlive the template, which is restarted. Only the Manager service makes
its process the subreaper the template needs: a Manager opened inside another program leaves
that program's orphans alone."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tests.helpers import tpm2
from tests.mgr import (
    GUEST1,
    GUEST2,
    ManagerProc,
    init_manager,
    manager,
    new_group,
    new_vtpm,
    owner_key,
)
from vtpm.manager import forkserver
from vtpm.manager.config import ManagerConfig
from vtpm.manager.service import Manager

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _forkserver_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are of the template: on for the Managers they start, whatever the
    environment of the test run says (VTPM_FORKSERVER=0 runs the other tests without it)."""
    monkeypatch.setenv(forkserver.ENV, "1")


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rpartition(")")[2].split()[1])


def _template_pid(m: ManagerProc, timeout: float = 30) -> int:
    """The Manager's child that is the template (it is a child of the Manager's process)."""
    deadline = time.monotonic() + timeout
    while True:
        for task in Path(f"/proc/{m.proc.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                try:
                    if "instance template" in _cmdline(int(pid)):
                        return int(pid)
                except OSError:
                    continue
        if time.monotonic() > deadline:
            raise AssertionError("the Manager runs no instance template")
        time.sleep(0.1)


def _pid(m: ManagerProc, vtpm_uuid: str) -> int:
    deadline = time.monotonic() + 30
    while True:
        run = m.json("show", vtpm_uuid)["run"]
        if run["state"] == "running" and run["pid"] is not None:
            return int(run["pid"])
        if time.monotonic() > deadline:
            raise AssertionError(f"vTPM {vtpm_uuid} is {run}")
        time.sleep(0.1)


def _tcti(port: int) -> str:
    return f"swtpm:host=127.0.0.1,port={port}"


def _startup(port: int) -> None:
    tpm2("startup", "-c", tcti=_tcti(port))


def _memory(pid: int) -> bytes:
    """Every readable mapping of the process (we are root)."""
    out = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
            assert m is not None
            start, end, perms = int(m[1], 16), int(m[2], 16), m[3]
            if perms[0] != "r" or "[vvar" in line or "[vsyscall]" in line:
                continue
            try:
                mem.seek(start)
                out.append(mem.read(end - start))
            except OSError:
                continue
    return b"".join(out)


def test_vtpms_are_forked_from_the_template_and_share_no_randomness(
    tmp_path: Path,
) -> None:
    with manager(tmp_path / "mgr") as m:
        new_group(m, "guests", owner_key(tmp_path))
        template = _template_pid(m)
        a, pa = new_vtpm(m, "guests", GUEST1)
        b, pb = new_vtpm(m, "guests", GUEST2)
        pids = [_pid(m, a["uuid"]), _pid(m, b["uuid"])]
        for pid in pids:
            # forked (it runs the template's image, not a new interpreter) and the Manager's
            assert "instance template" in _cmdline(pid)
            assert _ppid(pid) == m.proc.pid
            assert os.getsid(pid) == pid
        assert _ppid(template) == m.proc.pid

        for p in (pa, pb):
            _startup(p)
        randoms = [tpm2("getrandom", "--hex", "32", tcti=_tcti(p)).stdout.strip() for p in (pa, pb)]
        assert len(set(randoms)) == 2 and all(len(r) == 64 for r in randoms), randoms
        eks = []
        for p, name in ((pa, "a"), (pb, "b")):
            pub = tmp_path / f"ek-{name}.pub"
            ctx = tmp_path / f"ek-{name}.ctx"
            tpm2("createek", "-G", "ecc", "-c", str(ctx), "-u", str(pub), tcti=_tcti(p))
            eks.append(pub.read_bytes())
        assert eks[0] != eks[1]  # libtpms manufactured each TPM's seeds from its own randomness


def test_the_template_holds_no_key_material(tmp_path: Path) -> None:
    data_dir = tmp_path / "mgr"
    with manager(data_dir) as m:
        new_group(m, "guests", owner_key(tmp_path))
        v, port = new_vtpm(m, "guests", GUEST1)
        pid = _pid(m, v["uuid"])
        _startup(port)  # it serves: its key arrived
        tpm2("getrandom", "8", tcti=_tcti(port))
        template = _template_pid(m)
        instance_mem = _memory(pid)
        template_mem = _memory(template)
    mgr = Manager(ManagerConfig.load(data_dir))
    mgr.open()
    try:
        rec = mgr.store.vtpm(uuid.UUID(v["uuid"]))
        assert rec is not None
        state_key = mgr.groups.unwrap_state_key(rec.group_uuid, rec.uuid, rec.wrapped_key)
    finally:
        mgr.close()
    blob_key = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"vtpm state blob v1"
    ).derive(state_key)
    # the scan finds the key where it is (so it can fail) ...
    assert state_key in instance_mem or blob_key in instance_mem
    # ... and not in the template
    for needle in (state_key, blob_key, state_key.hex().encode(), blob_key.hex().encode()):
        assert needle not in template_mem


def test_running_vtpms_outlive_the_template_which_is_restarted(tmp_path: Path) -> None:
    with manager(tmp_path / "mgr") as m:
        new_group(m, "guests", owner_key(tmp_path))
        a, pa = new_vtpm(m, "guests", GUEST1)
        pid_a = _pid(m, a["uuid"])
        first = _template_pid(m)
        os.kill(first, signal.SIGKILL)
        # a vTPM started while the template is down still starts (without it)
        b, pb = new_vtpm(m, "guests", GUEST2)
        _pid(m, b["uuid"])
        for p in (pa, pb):
            _startup(p)
        assert _pid(m, a["uuid"]) == pid_a
        deadline = time.monotonic() + 30
        while (second := _template_pid(m)) == first:
            assert time.monotonic() < deadline, "the template was not restarted"
            time.sleep(0.1)
        assert "instance template exited" in m.log()
        # and the new template forks again
        c, pc = new_vtpm(m, "guests", "guest3_u:vm_r:vtpm_t")
        deadline = time.monotonic() + 30
        while "instance template" not in _cmdline(_pid(m, c["uuid"])):
            # the template may still be importing: start it again until it is forked
            assert time.monotonic() < deadline, "no vTPM was forked from the new template"
            m.cli("stop", c["uuid"])
            time.sleep(0.5)
            m.cli("start", c["uuid"])
        _startup(pc)
        assert second != first


def _orphan() -> int:
    """A daemon started by a child of this process, which exits at once: its orphan."""
    out = subprocess.run(
        ["sh", "-c", "sleep 60 </dev/null >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout)


def _end(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    if _ppid(pid) == os.getpid():  # adopted (the failure this file guards against): reap it
        os.waitpid(pid, 0)


def test_a_manager_opened_in_another_program_adopts_none_of_its_orphans(tmp_path: Path) -> None:
    """The measured-launch tests' QEMU (-daemonize) was left a zombie of the test run, which a
    Manager opened in it had made a subreaper: a powered-off guest's QEMU never left /proc."""
    data = tmp_path / "mgr"
    init_manager(data)
    mgr = Manager(ManagerConfig.load(data))
    mgr.open()
    try:
        pid = _orphan()
        try:
            assert _ppid(pid) != os.getpid()
        finally:
            _end(pid)
        assert not forkserver.is_subreaper()
        children = Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()
        assert not [c for c in children if "instance template" in _cmdline(int(c))]
    finally:
        mgr.close()


def test_a_closed_fork_server_gives_the_subreaper_role_back(tmp_path: Path) -> None:
    assert not forkserver.is_subreaper()
    fs = forkserver.ForkServer(tmp_path / "template.log")
    fs.start()
    try:
        assert forkserver.is_subreaper()  # the check can fail: the role is taken while it runs
    finally:
        fs.close()
    assert not forkserver.is_subreaper()
    pid = _orphan()
    try:
        assert _ppid(pid) != os.getpid()
    finally:
        _end(pid)
