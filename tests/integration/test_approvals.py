"""Owner approvals revoked by the hardware TPM itself, not by the Manager's bookkeeping.

A real `vtpm manager run` (its swtpm standing in for the hardware TPM) applies two owner
requests made with `vtpm group sign`: request 1 permits host state A, request 2 removes it.
Then, with the Manager stopped and its software checks out of the way, this process drives
the sealing layer directly against the same TPM, as an attacker holding the Manager's data
(database, old copies of it) and the TPM would: in state A, neither request 1's approval nor
the sealed key as it was stored under request 1 opens the group key any more; request 2's
approval and the current seal still do. In-process, with the Manager's GroupKeys on a real
store and TPM: a crash between the database write and the counter increment is finished by
the next Manager, and a group from before counters gets one, after which its old approvals no
longer open the key.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.helpers import tpm2
from tests.mgr import manager, new_group, owner_key
from vtpm.errors import HwTpmError, ReplayError, SealError
from vtpm.manager import ownerreq
from vtpm.manager.epochs import ApprovalCounters
from vtpm.manager.groups import GroupKeys
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


# in-process: the Manager's group keys on a real store and the simulated hardware TPM ----------


class FaultInjectingCounters(ApprovalCounters):
    """Increments fail, as if the Manager were killed right after its database write."""

    def increment(self, handle: int) -> int:
        raise HwTpmError("injected: killed before the counter moved")


@pytest.fixture
def keys(tmp_path: Path) -> Iterator[tuple[GroupKeys, Store, HardwareTpm, Simulator]]:
    sim = Simulator(tmp_path / "hwtpm")
    sim.start()
    store = Store(tmp_path / "manager.db")
    store.open()
    hw = HardwareTpm(sim.tcti, retries=2)
    hw.open()
    try:
        yield GroupKeys(store, hw), store, hw, sim
    finally:
        hw.close()
        store.close()
        sim.stop()


def _owner() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, ownerreq.public_pem(key)


def test_a_crash_between_database_and_counter_is_finished_at_the_next_start(
    keys: tuple[GroupKeys, Store, HardwareTpm, Simulator],
) -> None:
    gk, store, hw, sim = keys
    owner, pem = _owner()
    g = gk.create("guests", pem, [PCR], [])
    start = gk.epoch(g)
    assert start is not None and start.nv == g.approval_nv
    tpm2("pcrextend", f"{PCR}:sha256={EXTEND}", tcti=sim.tcti)
    state_a = PcrState.from_values(hw.read_pcrs([PCR]))
    request = ownerreq.sign_request(owner, g.uuid, 1, [*g.pcr_states, state_a], [], start.next())
    gk.counters = FaultInjectingCounters(hw)
    gk.apply_owner_request(g, request)
    counters = ApprovalCounters(hw)
    assert counters.read(g.approval_nv) == start.value  # stored, not yet reached

    again = GroupKeys(store, hw)  # the next Manager
    again.refresh()
    assert again.status(g.uuid).unlocked, again.status(g.uuid).reason
    assert again.key(g.uuid) == gk.key(g.uuid)
    assert counters.read(g.approval_nv) == start.value + 1
    # the request is now spent: applying it again is a replay, at the Manager and at the TPM
    rec = store.group(str(g.uuid))
    assert rec is not None
    with pytest.raises(ReplayError):
        again.apply_owner_request(rec, request)


def test_a_legacy_group_gets_a_counter_and_its_old_approvals_stop_working(
    keys: tuple[GroupKeys, Store, HardwareTpm, Simulator],
) -> None:
    gk, store, hw, sim = keys
    owner, pem = _owner()
    pub = ownerreq.load_public_key(pem)
    gid = uuid.uuid4()
    boot = PcrState.from_values(hw.read_pcrs([PCR]))
    secret = bytes(range(32))
    root = OrTree.of_states([boot]).root
    legacy = SealingTpm(hw).seal(
        secret, policy.seal_policy(root, ownerreq.authorize_digest(pub, gid))
    )
    store.add_group(
        GroupRecord(
            uuid=gid,
            name="old",
            owner_pub=pem,
            seq=0,
            pcr_states=(boot,),
            labels=(),
            sealed_public=legacy.public,
            sealed_private=legacy.private,
            sealed_root=root,
            approval=b"",
        )
    )
    gk.refresh()  # the first time this Manager holds the key: it gets its counter
    assert gk.key(gid) == secret
    rec = store.group(str(gid))
    assert rec is not None and rec.approval_nv >= policy.APPROVAL_NV_FIRST
    epoch = gk.epoch(rec)
    assert epoch is not None
    assert rec.sealed_root == epoch.policy(root)

    tpm2("pcrextend", f"{PCR}:sha256={EXTEND}", tcti=sim.tcti)
    state_a = PcrState.from_values(hw.read_pcrs([PCR]))
    approved = OrTree.of_states([boot, state_a])
    old_approval = ownerreq.sign_approval(owner, [boot, state_a], gid)  # a legacy approval
    obj = SealedObject(rec.sealed_public, rec.sealed_private)
    for ref in (ownerreq.policy_ref(gid), ownerreq.policy_ref(gid, rec.approval_nv)):
        for claimed in (None, epoch):
            extra = () if claimed is None else (claimed,)
            with pytest.raises(SealError):
                SealingTpm(hw).unseal_with_approval(
                    obj,
                    state_a,
                    approved,
                    1,
                    rec.sealed_root,
                    ownerreq.tpm_public(pub),
                    ref,
                    old_approval,
                    *extra,
                )
    # what the README says stays: the legacy blob itself, kept somewhere, still opens with it
    opened = SealingTpm(hw).unseal_with_approval(
        legacy,
        state_a,
        approved,
        1,
        root,
        ownerreq.tpm_public(pub),
        ownerreq.policy_ref(gid),
        old_approval,
    )
    assert opened == secret
