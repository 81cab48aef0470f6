"""Owner approvals revoked by the hardware TPM itself, not by the Manager's bookkeeping.

A real `vtpm manager run` (its swtpm standing in for the hardware TPM) applies two owner
requests made with `vtpm group sign`: request 1 permits host state A, request 2 removes it.
Then, with the Manager stopped and its software checks out of the way, this process drives
the sealing layer directly against the same TPM, as an attacker holding the Manager's data
(database, old copies of it) and the TPM would: in state A, neither request 1's approval nor
the sealed key as it was stored under request 1 opens the group key any more; request 2's
approval and the current seal still do.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import tpm2
from tests.mgr import manager, new_group, owner_key
from vtpm.errors import SealError
from vtpm.manager import ownerreq
from vtpm.manager.hwtpm import HardwareTpm, SealedObject
from vtpm.manager.sealing import SealingTpm
from vtpm.manager.simulator import Simulator
from vtpm.manager.store import GroupRecord, Store
from vtpm.tpm import policy
from vtpm.tpm.policy import OrTree, PcrState

pytestmark = pytest.mark.integration

PCR = 16
EXTEND = "ab" * 32  # what moves the host from the boot state to state A


def _request(path: Path) -> dict[str, Any]:
    body = json.loads(json.loads(path.read_text())["request"])
    assert isinstance(body, dict)
    return body


def _states(body: dict[str, Any]) -> list[PcrState]:
    return [PcrState.from_json(s) for s in body["pcr_states"]]


def _epoch(rec: GroupRecord, body: dict[str, Any]) -> Any:
    """The epoch a request approved, as the sealing layer takes it (None before epochs)."""
    nv = getattr(rec, "approval_nv", 0)
    return policy.Epoch(nv, body["epoch"]) if nv else None


def _extra(epoch: Any) -> tuple[Any, ...]:
    return () if epoch is None else (epoch,)


def _ref(rec: GroupRecord) -> bytes:
    nv = getattr(rec, "approval_nv", 0)
    return ownerreq.policy_ref(rec.uuid, nv) if nv else ownerreq.policy_ref(rec.uuid)


def _auth(rec: GroupRecord) -> bytes:
    pub = ownerreq.load_public_key(rec.owner_pub)
    nv = getattr(rec, "approval_nv", 0)
    return (
        ownerreq.authorize_digest(pub, rec.uuid, nv)
        if nv
        else ownerreq.authorize_digest(pub, rec.uuid)
    )


def _with_approval(
    hw: HardwareTpm, rec: GroupRecord, obj: SealedObject, body: dict[str, Any], index: int
) -> bytes:
    """Unseal through PolicyAuthorize with a request's approval, no Manager in the way."""
    states = _states(body)
    pub = ownerreq.load_public_key(rec.owner_pub)
    return SealingTpm(hw).unseal_with_approval(
        obj,
        states[index],
        OrTree.of_states(states),
        index,
        rec.sealed_root,
        ownerreq.tpm_public(pub),
        _ref(rec),
        bytes.fromhex(body["approval"]),
        *_extra(_epoch(rec, body)),
    )


def _sealed(db: Path) -> tuple[bytes, bytes, bytes]:
    """The group's sealed key as the database holds it now (read-only, Manager running)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
        row = c.execute("SELECT sealed_public, sealed_private, sealed_root FROM groups").fetchone()
    return bytes(row[0]), bytes(row[1]), bytes(row[2])


def test_a_superseded_approval_no_longer_opens_the_key_at_the_tpm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    key = owner_key(tmp_path)
    r1, r2 = tmp_path / "r1.json", tmp_path / "r2.json"
    with manager(data) as m:
        g = new_group(m, "guests", key, pcrs=str(PCR))
        hw_tcti = m.json("manager", "status")["hardware_tpm"]["tcti"]
        tpm2("pcrextend", f"{PCR}:sha256={EXTEND}", tcti=hw_tcti)  # the host is in state A
        m.cli("group", "sign", "guests", "--key", str(key), "--add-current", "-o", str(r1))
        shown = m.json("group", "update", "guests", str(r1))
        assert shown["status"]["unlocked"] is True and shown["status"]["matched_state"] == 1
        old_blob = _sealed(data / "manager.db")  # sealed under request 1's states
        m.cli("group", "sign", "guests", "--key", str(key), "--remove-state", "1", "-o", str(r2))
        shown = m.json("group", "update", "guests", str(r2))
        assert shown["status"]["unlocked"] is False  # the Manager's own check: A is gone
        assert len(shown["pcr_states"]) == 1
    body1, body2 = _request(r1), _request(r2)
    assert body1["seq"] == 1 and body2["seq"] == 2
    state_a = _states(body1)[1]

    store = Store(data / "manager.db")
    store.open()
    try:
        rec = store.group(g["uuid"])
    finally:
        store.close()
    assert rec is not None and rec.uuid == uuid.UUID(g["uuid"])
    obj = SealedObject(rec.sealed_public, rec.sealed_private)

    sim = Simulator(data / "hwtpm")  # the Manager's TPM: its NV (the counter) is kept
    sim.start()
    try:
        with HardwareTpm(sim.tcti, retries=2) as hw:
            tpm2("pcrextend", f"{PCR}:sha256={EXTEND}", tcti=sim.tcti)
            assert PcrState.from_values(hw.read_pcrs([PCR])) == state_a

            # request 1's approval, replayed against the TPM: refused
            with pytest.raises(SealError) as info:
                _with_approval(hw, rec, obj, body1, 1)
            assert str(info.value) == "unsealing failed"
            # the key as it was sealed while request 1 held (a copy of the old database):
            # its PCR branch names state A, and is refused too
            public, private, old_root = old_blob
            assert old_root != rec.sealed_root
            tree1 = OrTree.of_states(_states(body1))
            auth = _auth(rec)
            with pytest.raises(SealError):
                SealingTpm(hw).unseal_with_pcrs(
                    SealedObject(public, private),
                    state_a,
                    tree1,
                    1,
                    auth,
                    *_extra(_epoch(rec, body1)),
                )
            # ... whichever epoch the attacker claims
            if _epoch(rec, body1) is not None:
                now = _epoch(rec, body2)
                for stale in (body1, {**body1, "epoch": now.value}):
                    with pytest.raises(SealError):
                        _with_approval(hw, rec, obj, stale, 1)

        sim.stop()  # a host reboot: back in the boot state, which request 2 permits
        sim = Simulator(data / "hwtpm")
        sim.start()
        with HardwareTpm(sim.tcti, retries=2) as hw:
            current = _with_approval(hw, rec, obj, body2, 0)
            assert len(current) == 32
            tree2 = OrTree.of_states(_states(body2))
            state0 = _states(body2)[0]
            auth = _auth(rec)
            by_pcrs = SealingTpm(hw).unseal_with_pcrs(
                obj, state0, tree2, 0, auth, *_extra(_epoch(rec, body2))
            )
            assert by_pcrs == current
    finally:
        sim.stop()
