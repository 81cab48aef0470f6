"""The Manager end to end: real `vtpm manager run`, its swtpm stand-in for the hardware TPM,
real instances, tpm2-tools as the guest."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tests.helpers import tpm2
from tests.mgr import (
    GUEST1,
    GUEST2,
    ManagerProc,
    manager,
    new_group,
    new_vtpm,
    owner_key,
    vtpm_cli,
    wait_state,
)
from vtpm.manager.config import ManagerConfig
from vtpm.manager.service import Manager

pytestmark = pytest.mark.integration

SECRET = b"guest1 disk key: 6c1f0e-not-in-the-clear"
PRIMARY = "0x81000001"


def tcti(port: int) -> str:
    return f"swtpm:host=127.0.0.1,port={port}"


def seal_secret(port: int, work: Path) -> None:
    t = tcti(port)
    tpm2("startup", "-c", tcti=t)
    tpm2("createprimary", "-C", "o", "-c", "primary.ctx", tcti=t, cwd=work)
    tpm2("evictcontrol", "-C", "o", "-c", "primary.ctx", PRIMARY, tcti=t, cwd=work)
    tpm2("flushcontext", "-t", tcti=t)
    tpm2(
        "create",
        "-C",
        PRIMARY,
        "-i-",
        "-u",
        "s.pub",
        "-r",
        "s.priv",
        tcti=t,
        cwd=work,
        input_=SECRET,
    )


def unseal_secret(port: int, work: Path) -> bytes:
    t = tcti(port)
    tpm2("startup", "-c", tcti=t)
    tpm2("load", "-C", PRIMARY, "-u", "s.pub", "-r", "s.priv", "-c", "s.ctx", tcti=t, cwd=work)
    return tpm2("unseal", "-c", "s.ctx", tcti=t, cwd=work).stdout


@pytest.fixture
def mgr(tmp_path: Path) -> Iterator[ManagerProc]:
    with manager(tmp_path / "data") as m:
        yield m


def test_group_vtpms_and_a_secret_that_survives_a_manager_restart(
    tmp_path: Path, mgr: ManagerProc
) -> None:
    key = owner_key(tmp_path)
    new_group(mgr, "guests", key)
    v1, port1 = new_vtpm(mgr, "guests", GUEST1)
    v2, _port2 = new_vtpm(mgr, "guests", GUEST2)
    assert v1["run"]["state"] == v2["run"]["state"] == "running"
    st = mgr.json("manager", "status")
    assert st["hardware_tpm"]["simulated"] is True
    assert "simulator" in st["hardware_tpm"]["note"]
    assert st["vtpms"] == {"total": 2, "running": 2}
    assert all(g["status"]["unlocked"] for g in st["groups"])

    seal_secret(port1, tmp_path)
    assert mgr.stop() == 0
    # every instance stopped with the Manager, state stored
    assert "instance stopped in order" in mgr.log()

    with manager(mgr.data_dir) as again:
        wait_state(again, v1["uuid"], "running")  # started again: it was running before
        assert unseal_secret(port1, tmp_path) == SECRET
        wait_state(again, v2["uuid"], "running")


def _derive(key: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def test_data_dir_holds_no_key_or_secret_in_clear(tmp_path: Path, mgr: ManagerProc) -> None:
    key = owner_key(tmp_path)
    g = new_group(mgr, "guests", key)
    v, port = new_vtpm(mgr, "guests", GUEST1)
    seal_secret(port, tmp_path)
    mgr.stop()

    # the keys, read through the Manager's own code in this process (the daemon is stopped)
    m = Manager(ManagerConfig.load(mgr.data_dir))
    m.open()
    try:
        rec = m.store.vtpm(uuid.UUID(v["uuid"]))
        assert rec is not None
        group_key = m.groups.key(uuid.UUID(g["uuid"]))
        state_key = m.groups.unwrap_state_key(rec.group_uuid, rec.uuid, rec.wrapped_key)
    finally:
        m.close()
    secrets = {
        "group key": group_key,
        "state key": state_key,
        "blob key": _derive(state_key, b"vtpm state blob v1"),
        "wrap key": _derive(group_key, b"vtpm state key wrap v1"),
    }
    needles: dict[str, bytes] = {"sealed secret": SECRET, "secret tail": SECRET[-16:]}
    for name, k in secrets.items():
        needles[f"{name} raw"] = k
        needles[f"{name} hex"] = k.hex().encode()
        needles[f"{name} HEX"] = k.hex().upper().encode()
        needles[f"{name} b64"] = base64.b64encode(k)[:40]
    files = [p for p in mgr.data_dir.rglob("*") if p.is_file() and not p.is_socket()]
    assert any(p.name == "manager.db" for p in files)
    assert any(p.suffix == ".blob" for p in files)
    for p in files:
        data = p.read_bytes()
        for what, needle in needles.items():
            assert needle not in data, f"{what} found in clear in {p}"


def _extend(hw_tcti: str, pcr: int) -> None:
    tpm2("pcrextend", f"{pcr}:sha256={'ab' * 32}", tcti=hw_tcti)


def test_host_pcr_change_locks_the_group_until_the_owner_signs(
    tmp_path: Path, mgr: ManagerProc
) -> None:
    key = owner_key(tmp_path)
    other_key = owner_key(tmp_path, "intruder.pem")
    g = new_group(mgr, "guests", key, pcrs="0-7")
    spare = new_group(mgr, "spare", key, pcrs="16")  # PCR 16 is not extended: stays unlocked
    v, port = new_vtpm(mgr, "guests", GUEST1)
    seal_secret(port, tmp_path)
    mgr.cli("stop", v["uuid"])

    hw = mgr.json("manager", "status")["hardware_tpm"]["tcti"]
    _extend(hw, 7)

    res = mgr.cli("start", v["uuid"], check=False)
    assert res.returncode == 1
    assert "locked" in res.stderr and "PCR 7" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1  # one clear line, no traceback
    shown = mgr.json("group", "show", "guests")
    assert shown["status"]["unlocked"] is False
    assert list(shown["status"]["differing_pcrs"]) == ["7"]
    assert mgr.json("group", "show", "spare")["status"]["unlocked"] is True
    status = mgr.cli("manager", "status").stdout
    assert "LOCKED" in status and "PCR 7 is now" in status

    # the host administrator alone cannot re-point the group: refused requests are audited
    bad = tmp_path / "bad.req"
    vtpm_cli(mgr.data_dir, "group", "sign", "guests", "--key", str(other_key), "--add-current")
    signed_by_other = vtpm_cli(
        mgr.data_dir, "group", "sign", "guests", "--key", str(other_key), "--add-current"
    ).stdout
    bad.write_text(signed_by_other)
    res = mgr.cli("group", "update", "guests", str(bad), check=False)
    assert res.returncode == 1 and "signature" in res.stderr
    bad.write_text("not a request")
    assert mgr.cli("group", "update", "guests", str(bad), check=False).returncode == 1

    good = tmp_path / "good.req"
    mgr.cli("group", "sign", "guests", "--key", str(key), "--add-current", "-o", str(good))
    updated = mgr.json("group", "update", "guests", str(good))
    assert updated["status"]["unlocked"] is True
    assert updated["seq"] == 1 and len(updated["pcr_states"]) == 2
    assert updated["status"]["matched_state"] == 1

    replay = mgr.cli("group", "update", "guests", str(good), check=False)
    assert replay.returncode == 1 and "sequence" in replay.stderr

    audit = mgr.json("audit", "--limit", "100")
    refused = [e for e in audit if e["action"] == "group.update" and e["outcome"] == "refused"]
    assert len(refused) == 3
    assert any(e["action"] == "vtpm.start" and e["outcome"] == "refused" for e in audit)

    mgr.cli("start", v["uuid"])
    assert unseal_secret(port, tmp_path) == SECRET
    assert g["uuid"] != spare["uuid"]

    # the new state survives a Manager restart (its simulator is restarted too: PCRs back to
    # zero, which is the first permitted state)
    mgr.stop()
    with manager(mgr.data_dir) as again:
        assert again.json("group", "show", "guests")["status"]["unlocked"] is True
        wait_state(again, v["uuid"], "running")


def test_rollback_of_a_state_blob_is_refused(tmp_path: Path, mgr: ManagerProc) -> None:
    key = owner_key(tmp_path)
    new_group(mgr, "guests", key)
    v, port = new_vtpm(mgr, "guests", GUEST1)
    t = tcti(port)
    tpm2("startup", "-c", tcti=t)
    tpm2("nvdefine", "0x1500016", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite", tcti=t)
    tpm2("nvwrite", "0x1500016", "-C", "o", "-i-", tcti=t, input_=b"AAAAAAAA")
    mgr.cli("stop", v["uuid"])
    blob = Path(v["state_dir"]) / "permall.blob"
    old = blob.read_bytes()

    mgr.cli("start", v["uuid"])
    tpm2("startup", "-c", tcti=t)
    tpm2("nvwrite", "0x1500016", "-C", "o", "-i-", tcti=t, input_=b"BBBBBBBB")
    mgr.cli("stop", v["uuid"])
    new = blob.read_bytes()

    blob.write_bytes(old)  # the host puts an older (validly encrypted) blob back
    res = mgr.cli("start", v["uuid"], check=False)
    assert res.returncode == 1
    assert "does not match the recorded state" in res.stderr, res.stderr
    assert blob.read_bytes() == old  # left untouched
    assert mgr.json("show", v["uuid"])["run"]["state"] != "running"

    blob.write_bytes(new)  # nothing else was lost: the current blob still opens
    mgr.cli("start", v["uuid"])
    tpm2("startup", "-c", tcti=t)
    out = tpm2("nvread", "0x1500016", "-C", "o", "-s", "8", tcti=t).stdout
    assert out == b"BBBBBBBB"


def test_label_rules(tmp_path: Path) -> None:
    policy = tmp_path / "labels.toml"
    policy.write_text(f'unlabeled = "refuse"\n[uid]\n{os.getuid()} = "guest1_u:vm_r:guest_t"\n')
    with manager(tmp_path / "data", "--labels", str(policy)) as m:
        key = owner_key(tmp_path)
        new_group(m, "guests", key, labels=("*:vm_r:vtpm_t", "*:vm_r:other_t"))
        new_group(m, "system", key, labels=("system_u:system_r:vtpm_t",))

        # a label the group does not permit: refused at creation, one clear line
        res = m.cli("new", "--group", "system", "--label", GUEST1, check=False)
        assert res.returncode == 1 and "does not permit" in res.stderr
        # the Manager releases keys only to vtpm_t peers
        res = m.cli(
            "new", "--group", "guests", "--label", "guest1_u:vm_r:other_t", "--start", check=False
        )
        assert res.returncode == 1 and "vtpm_t" in res.stderr, res.stderr

        # frontend peers: this process is guest1_u:vm_r:guest_t by the uid map
        socks = {}
        for label in (GUEST1, GUEST2):
            path = tmp_path / f"{label.split(':')[0]}.sock"
            m.json(
                "new", "--group", "guests", "--label", label, "--server", f"unix:{path}", "--start"
            )
            socks[label] = path
        assert _raw_startup(socks[GUEST1]) is True
        assert _raw_startup(socks[GUEST2]) is False


def _raw_startup(path: Path) -> bool:
    """True if the vTPM at `path` answers a TPM2_Startup; False if it drops us."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        try:
            s.sendall(bytes.fromhex("80010000000c000001440000"))
            return len(s.recv(64)) >= 10
        except (ConnectionResetError, BrokenPipeError):
            return False


def test_delete_erases_key_and_state(tmp_path: Path, mgr: ManagerProc) -> None:
    key = owner_key(tmp_path)
    new_group(mgr, "guests", key)
    v, _port = new_vtpm(mgr, "guests", GUEST1)
    state_dir = Path(v["state_dir"])
    assert (state_dir / "permall.blob").exists()
    assert mgr.cli("group", "del", "guests", check=False).returncode == 1  # not empty
    mgr.cli("del", v["uuid"])
    assert not state_dir.exists()
    assert mgr.json("list") == []
    res = mgr.cli("show", v["uuid"], check=False)
    assert res.returncode == 1 and "no vTPM" in res.stderr
    mgr.cli("group", "del", "guests")
    assert mgr.json("group", "list") == []
    actions = [e["action"] for e in mgr.json("audit")]
    assert actions[-2:] == ["vtpm.del", "group.del"]


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    res = vtpm_cli(tmp_path / "nowhere", "list", check=False)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "no Manager" in res.stderr
    res = vtpm_cli(tmp_path / "nowhere", "list", "--json", check=False)
    assert json.loads(res.stdout)["ok"] is False
    res = vtpm_cli(tmp_path, "manager", "run", "--data-dir", str(tmp_path / "x"), check=False)
    assert res.returncode == 1 and "manager init" in res.stderr


def test_instance_crash_is_restarted(tmp_path: Path, mgr: ManagerProc) -> None:
    key = owner_key(tmp_path)
    new_group(mgr, "guests", key)
    v, port = new_vtpm(mgr, "guests", GUEST1)
    os.kill(v["run"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        cur = mgr.json("show", v["uuid"])["run"]
        if cur["state"] == "running" and cur["pid"] != v["run"]["pid"]:
            break
        assert time.monotonic() < deadline, cur
        time.sleep(0.1)
    assert cur["restarts"] == 1
    tpm2("startup", "-c", tcti=tcti(port))
