"""The Manager's hardware TPM, played by a real swtpm: policy digests, seal/unseal, approval by
the group owner, simulator adoption, the TPM going away and coming back, leftover handles."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, utils

from vtpm.errors import ConfigError, HwTpmError, SealError
from vtpm.manager.epochs import ApprovalCounters
from vtpm.manager.hwtpm import HardwareTpm, SealedObject
from vtpm.manager.sealing import SealingTpm
from vtpm.manager.simulator import Simulator
from vtpm.tpm import policy
from vtpm.tpm.policy import OrTree, PcrState

pytss = pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is a dev dependency of the project")
from tpm2_pytss import (  # noqa: E402
    ESAPI,
    ESYS_TR,
    TPM2_CAP,
    TPM2_EO,
    TPM2_SE,
    TPM2B_DIGEST,
    TPM2B_OPERAND,
    TPM2B_PUBLIC,
    TPML_DIGEST,
    TPML_PCR_SELECTION,
    TPMT_PUBLIC,
    TPMT_SIGNATURE,
    TPMT_SYM_DEF,
)

pytestmark = pytest.mark.integration

os.environ.setdefault("TSS2_LOG", "all+NONE")

SELECTED = (0, 7, 16)
REF = b"vtpm group 1"
SECRET = bytes(range(32))
ZERO_DIGEST = bytes(32)


# fixtures and helpers --------------------------------------------------------------------------


class Owner:
    """A group owner: an ECC P-256 key that approves new PCR state sets."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        numbers = self.key.public_key().public_numbers()
        self.public = policy.ecc_p256_verify_public(
            numbers.x.to_bytes(32, "big"), numbers.y.to_bytes(32, "big")
        )
        self.name = policy.object_name(self.public)
        self.authorize = policy.policy_authorize(self.name, REF)

    def approve(self, tree: OrTree, ref: bytes = REF) -> bytes:
        a_hash = policy.authorization_hash(tree.root, ref)
        return self.key.sign(a_hash, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def pcrextend(tcti: str, pcr: int, data: bytes) -> bytes:
    """Extend through tpm2-tools; returns the digest extended."""
    digest = hashlib.sha256(data).digest()
    subprocess.run(
        ["tpm2_pcrextend", f"{pcr}:sha256={digest.hex()}"],
        env={**os.environ, "TPM2TOOLS_TCTI": tcti},
        check=True,
        capture_output=True,
        timeout=10,
    )
    return digest


def pcrread(tcti: str, pcrs: list[int]) -> dict[int, bytes]:
    """PCR values as tpm2-tools reports them."""
    out = subprocess.run(
        ["tpm2_pcrread", "sha256:" + ",".join(map(str, pcrs))],
        env={**os.environ, "TPM2TOOLS_TCTI": tcti},
        check=True,
        capture_output=True,
        timeout=10,
        text=True,
    ).stdout
    values = {}
    for line in out.splitlines():
        index, sep, value = line.partition(":")
        if sep and index.strip().isdigit():
            values[int(index)] = bytes.fromhex(value.strip().removeprefix("0x"))
    return values


def current_state(hw: HardwareTpm) -> PcrState:
    return PcrState.from_values(hw.read_pcrs(SELECTED))


def other_states(n: int) -> list[PcrState]:
    return [
        PcrState(SELECTED, tuple(hashlib.sha256(b"%d/%d" % (i, p)).digest() for p in SELECTED))
        for i in range(n)
    ]


def states_with(state: PcrState, n: int, index: int) -> OrTree:
    states = other_states(n - 1)
    states.insert(index, state)
    return OrTree.of_states(states)


def handles(tcti: str, first: int) -> list[int]:
    with ESAPI(tcti) as ectx:
        _more, data = ectx.get_capability(TPM2_CAP.HANDLES, first, 64)
        return [int(h) for h in data.data.handles]


def _digest_list(branches: list[bytes] | tuple[bytes, ...]) -> TPML_DIGEST:
    return TPML_DIGEST([TPM2B_DIGEST(b) for b in branches])


# the TPM computes the digests we do ------------------------------------------------------------


def test_policy_digests_equal_the_tpms(sim: Simulator) -> None:
    pcrextend(sim.tcti, 16, b"not the boot value")
    owner = Owner()
    with ESAPI(sim.tcti) as ectx:
        _c, _s, digests = ectx.pcr_read(TPML_PCR_SELECTION.parse("sha256:0,7,16"))
        state = PcrState(SELECTED, tuple(bytes(d) for d in digests))
        tree = states_with(state, 9, 8)  # leaf 8: one PolicyOR up, then the root
        sel, _ = TPML_PCR_SELECTION.unmarshal(policy.pcr_selection(SELECTED))

        session = ectx.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF.parse("null"), "sha256"
        )
        try:
            ectx.policy_pcr(session, TPM2B_DIGEST(), sel)
            assert bytes(ectx.policy_get_digest(session)) == state.policy()
            path = tree.path(8)
            assert len(path) == 1
            ectx.policy_or(session, _digest_list(path[0]))
            assert bytes(ectx.policy_get_digest(session)) == tree.root

            key = ectx.load_external(
                TPM2B_PUBLIC(TPMT_PUBLIC.unmarshal(owner.public)[0]), hierarchy=ESYS_TR.OWNER
            )
            try:
                assert bytes(ectx.tr_get_name(key)) == owner.name
                r, s = utils.decode_dss_signature(owner.approve(tree))
                signature = TPMT_SIGNATURE(sigAlg=pytss.TPM2_ALG.ECDSA)
                signature.signature.ecdsa.hash = pytss.TPM2_ALG.SHA256
                signature.signature.ecdsa.signatureR = r.to_bytes(32, "big")
                signature.signature.ecdsa.signatureS = s.to_bytes(32, "big")
                a_hash = policy.authorization_hash(tree.root, REF)
                ticket = ectx.verify_signature(key, TPM2B_DIGEST(a_hash), signature)
            finally:
                ectx.flush_context(key)
            ectx.policy_authorize(session, TPM2B_DIGEST(tree.root), owner.name, ticket, REF)
            assert bytes(ectx.policy_get_digest(session)) == owner.authorize

            ectx.policy_or(session, _digest_list([tree.root, owner.authorize]))
            assert bytes(ectx.policy_get_digest(session)) == policy.seal_policy(
                tree.root, owner.authorize
            )
        finally:
            ectx.flush_context(session)


def test_read_pcrs_past_eight_agrees_with_tpm2_tools(hw: HardwareTpm, sim: Simulator) -> None:
    extended = pcrextend(sim.tcti, 16, b"kernel")
    mine = hw.read_pcrs(range(24))
    assert sorted(mine) == list(range(24))
    assert mine == pcrread(sim.tcti, list(range(24)))
    assert mine[16] == hashlib.sha256(bytes(32) + extended).digest()
    assert hw.read_pcrs([23, 16, 2]) == {2: mine[2], 16: mine[16], 23: mine[23]}
    assert "manufacturer IBM" in hw.description
    assert hw.description.startswith(sim.tcti)


# seal and unseal -------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "index"), [(1, 0), (3, 0), (3, 2), (20, 0), (20, 9), (20, 19)])
def test_seal_and_unseal_with_pcrs(hw: HardwareTpm, n: int, index: int) -> None:
    state = current_state(hw)
    tree = states_with(state, n, index)
    authorize = Owner().authorize
    obj = SealingTpm(hw).seal(SECRET, policy.seal_policy(tree.root, authorize))
    assert isinstance(obj, SealedObject)
    assert SECRET not in obj.public
    assert SECRET not in obj.private
    assert SealingTpm(hw).unseal_with_pcrs(obj, state, tree, index, authorize) == SECRET
    # the state must be the leaf the index names: a caller's bug otherwise
    with pytest.raises(ConfigError):
        SealingTpm(hw).unseal_with_pcrs(
            obj, state, tree, (index + 1) % n if n > 1 else 1, authorize
        )


def test_pcr_change_then_owner_approval(hw: HardwareTpm, sim: Simulator) -> None:
    owner = Owner()
    old = current_state(hw)
    sealed_tree = OrTree.of_states([old])
    obj = SealingTpm(hw).seal(SECRET, policy.seal_policy(sealed_tree.root, owner.authorize))

    pcrextend(sim.tcti, 16, b"next kernel")
    new = current_state(hw)
    assert new != old
    with pytest.raises(SealError) as info:
        SealingTpm(hw).unseal_with_pcrs(obj, old, sealed_tree, 0, owner.authorize)
    assert str(info.value) == "unsealing failed"

    approved = OrTree.of_states([old, *other_states(3), new])  # the new state is leaf 4
    args = (sealed_tree.root, owner.public, REF)
    secret = SealingTpm(hw).unseal_with_approval(
        obj, new, approved, 4, *args, owner.approve(approved)
    )
    assert secret == SECRET

    refusals = {
        "another key": Owner().approve(approved),
        "another ref": owner.approve(approved, b"another group"),
        "another tree": owner.approve(OrTree.of_states([new, old])),
        "not DER": b"\x30\x03garbage",
    }
    for why, signature in refusals.items():
        with pytest.raises(SealError) as info:
            SealingTpm(hw).unseal_with_approval(obj, new, approved, 4, *args, signature)
        assert str(info.value) == "unsealing failed", why
    # an approved set that does not hold the current state
    stale = OrTree.of_states([old, *other_states(2)])
    with pytest.raises(SealError):
        SealingTpm(hw).unseal_with_approval(obj, old, stale, 0, *args, owner.approve(stale))
    # a damaged sealed object
    damaged = SealedObject(obj.public, obj.private[:-1] + bytes([obj.private[-1] ^ 1]))
    with pytest.raises(SealError):
        SealingTpm(hw).unseal_with_approval(
            damaged, new, approved, 4, *args, owner.approve(approved)
        )
    # nothing was left loaded by the failures: the primary only
    assert handles(sim.tcti, 0x80000000) == [0x80000000]
    assert handles(sim.tcti, 0x02000000) == []


def test_secret_never_crosses_the_tcti_in_clear(
    sim: Simulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    capture = tmp_path / "tpm.pcap"
    monkeypatch.setenv("TCTI_PCAP_FILE", str(capture))
    secret = b"SEALED-SECRET-" + os.urandom(16).hex().encode()
    with HardwareTpm(f"pcap:{sim.tcti}") as hw:
        state = current_state(hw)
        tree = OrTree.of_states([state])
        authorize = Owner().authorize
        auth_policy = policy.seal_policy(tree.root, authorize)
        obj = SealingTpm(hw).seal(secret, auth_policy)
        assert SealingTpm(hw).unseal_with_pcrs(obj, state, tree, 0, authorize) == secret
    traffic = capture.read_bytes()
    assert auth_policy in traffic  # the capture holds the commands (the template is public)
    assert secret not in traffic


def test_concurrent_unseals(hw: HardwareTpm) -> None:
    state = current_state(hw)
    tree = OrTree.of_states([state])
    authorize = Owner().authorize
    obj = SealingTpm(hw).seal(SECRET, policy.seal_policy(tree.root, authorize))
    results: list[bytes] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(3):
                results.append(SealingTpm(hw).unseal_with_pcrs(obj, state, tree, 0, authorize))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results == [SECRET] * 12


# the simulator ---------------------------------------------------------------------------------


def test_simulator_files_and_adoption(sim: Simulator) -> None:
    assert not sim.reused
    assert sim.tcti == f"swtpm:host=127.0.0.1,port={sim.port}"
    assert sim.port % 2 == 0
    assert (sim.state_dir.stat().st_mode & 0o777) == 0o700
    record = sim.state_dir / "simulator.json"
    assert (record.stat().st_mode & 0o777) == 0o600
    assert json.loads(record.read_text()) == {"pid": sim.pid, "port": sim.port}

    extended = pcrextend(sim.tcti, 16, b"before the Manager died")
    again = Simulator(sim.state_dir)  # a new Manager after kill -9
    assert again.start() == sim.tcti  # adopted: stopping `sim` stops it
    assert again.reused
    assert (again.pid, again.port) == (sim.pid, sim.port)
    with HardwareTpm(again.tcti) as hw:
        assert hw.read_pcrs([16])[16] == hashlib.sha256(bytes(32) + extended).digest()


def test_simulator_ignores_a_record_naming_another_process(tmp_path: Path) -> None:
    state_dir = tmp_path / "hwtpm"
    state_dir.mkdir()
    # our own pid, alive but not a swtpm: neither adopted nor signalled
    (state_dir / "simulator.json").write_text(json.dumps({"pid": os.getpid(), "port": 40000}))
    s = Simulator(state_dir)
    try:
        s.start()
        assert not s.reused
        assert s.pid != os.getpid()
    finally:
        s.stop()
    assert not (state_dir / "simulator.json").exists()


def test_simulator_reports_a_failed_start(tmp_path: Path) -> None:
    state_dir = tmp_path / "hwtpm"
    first = Simulator(state_dir)
    first.start()
    try:
        (state_dir / "simulator.json").unlink()  # record lost: swtpm's own lock must refuse
        second = Simulator(state_dir)
        with pytest.raises(HwTpmError, match="did not start"):
            second.start()
    finally:
        first.stop()


# the TPM going away ----------------------------------------------------------------------------


def _kill_and_wait(pid: int, port: int) -> None:
    """SIGKILL a simulator and wait until its ports are free: the kernel closes a killed
    process's sockets a moment after kill() returns, and the restart wants the same port."""
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return
        except OSError:
            assert time.monotonic() < deadline, f"port {port} still busy after killing {pid}"
            time.sleep(0.02)


def test_tpm_going_away_and_coming_back(sim: Simulator) -> None:
    hw = HardwareTpm(sim.tcti, retries=4)
    hw.open()
    try:
        pinned = hw.primary_name
        assert len(pinned) == 34
        boot = current_state(hw)
        tree = OrTree.of_states([boot])
        authorize = Owner().authorize
        obj = SealingTpm(hw).seal(SECRET, policy.seal_policy(tree.root, authorize))

        _kill_and_wait(sim.pid, sim.port)
        started = time.monotonic()
        with pytest.raises(HwTpmError, match="unreachable"):
            SealingTpm(hw).unseal_with_pcrs(obj, boot, tree, 0, authorize)
        assert time.monotonic() - started < 5

        restarted = Simulator(sim.state_dir)  # the record still names the dead pid
        tcti = restarted.start()
        try:
            assert tcti == sim.tcti  # same port: the TCTI string still works
            assert not restarted.reused
            # a rebooted TPM: PCRs at boot values again, the primary recreated identically
            assert SealingTpm(hw).unseal_with_pcrs(obj, boot, tree, 0, authorize) == SECRET
            assert hw.primary_name == pinned

            # a reboot between two calls (no failed call in between) is noticed too
            _kill_and_wait(restarted.pid, restarted.port)
            again = Simulator(sim.state_dir)
            tcti = again.start()
            try:
                assert tcti == sim.tcti
                assert SealingTpm(hw).unseal_with_pcrs(obj, boot, tree, 0, authorize) == SECRET
            finally:
                again.stop()
        finally:
            restarted.stop()
    finally:
        hw.close()


def test_open_flushes_leftover_handles(sim: Simulator) -> None:
    # a Manager killed with -9: three objects and two sessions left in the simulator
    abandoned = ESAPI(sim.tcti)
    for _ in range(3):
        abandoned.create_primary(None, "ecc256")
    abandoned.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF.parse("null"), "sha256"
    )
    saved = abandoned.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.HMAC, TPMT_SYM_DEF.parse("null"), "sha256"
    )
    abandoned.context_save(saved)
    abandoned.close()  # frees the client side only; the TPM keeps everything
    assert len(handles(sim.tcti, 0x80000000)) == 3
    assert len(handles(sim.tcti, 0x02000000)) + len(handles(sim.tcti, 0x03000000)) == 2

    with HardwareTpm(sim.tcti) as hw:
        assert handles(sim.tcti, 0x80000000) == [0x80000000]  # our primary only
        assert handles(sim.tcti, 0x02000000) == []
        assert handles(sim.tcti, 0x03000000) == []
        state = current_state(hw)
        tree = OrTree.of_states([state])
        authorize = Owner().authorize
        obj = SealingTpm(hw).seal(SECRET, policy.seal_policy(tree.root, authorize))
        assert SealingTpm(hw).unseal_with_pcrs(obj, state, tree, 0, authorize) == SECRET
    assert handles(sim.tcti, 0x80000000) == []  # close flushed the primary


# approval counters -----------------------------------------------------------------------------


def test_approval_counters_and_the_tpms_epoch_digest(hw: HardwareTpm, sim: Simulator) -> None:
    counters = ApprovalCounters(hw)
    first = counters.allocate(())
    assert first.nv == policy.APPROVAL_NV_FIRST
    # a foreign index in the range is skipped, and the next free one defined
    foreign = policy.APPROVAL_NV_FIRST + 1
    tpm2_tools = {**os.environ, "TPM2TOOLS_TCTI": sim.tcti}
    subprocess.run(
        ["tpm2_nvdefine", hex(foreign), "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite"],
        env=tpm2_tools,
        check=True,
        capture_output=True,
        timeout=10,
    )
    second = counters.allocate({first.nv})
    assert second.nv == foreign + 1
    # a counter left by a deleted group is adopted, at its value (it only ever grows)
    assert counters.increment(first.nv) == first.value + 1
    adopted = counters.allocate(())
    assert adopted == policy.Epoch(first.nv, first.value + 1)
    assert counters.read(second.nv) == second.value
    with pytest.raises(HwTpmError, match="not a vtpm approval counter"):
        counters.read(foreign)
    with pytest.raises(HwTpmError, match="not defined"):
        counters.read(policy.APPROVAL_NV_LAST)

    # the TPM's PolicyNV digest is ours, and the policy holds only at that epoch
    state = current_state(hw)
    tree = OrTree.of_states([state])
    epoch = policy.Epoch(second.nv, counters.read(second.nv))
    with ESAPI(sim.tcti) as ectx:
        session = ectx.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, TPMT_SYM_DEF.parse("null"), "sha256"
        )
        tr = ectx.tr_from_tpmpublic(epoch.nv)
        assert bytes(ectx.tr_get_name(tr)) == policy.approval_nv_name(epoch.nv)
        ectx.policy_nv(tr, tr, session, TPM2B_OPERAND(epoch.operand()), TPM2_EO.EQ)
        assert bytes(ectx.policy_get_digest(session)) == epoch.policy(ZERO_DIGEST)
        ectx.flush_context(session)
    authorize = Owner().authorize
    obj = SealingTpm(hw).seal(SECRET, policy.seal_policy(epoch.policy(tree.root), authorize))
    assert SealingTpm(hw).unseal_with_pcrs(obj, state, tree, 0, authorize, epoch) == SECRET
    counters.increment(epoch.nv)
    for claimed in (epoch, epoch.next()):  # neither the old epoch nor a lie about it opens it
        with pytest.raises(SealError):
            SealingTpm(hw).unseal_with_pcrs(obj, state, tree, 0, authorize, claimed)


def test_a_tpm_that_went_away_is_refused_at_once_then_revived(sim: Simulator) -> None:
    """Down: each call makes one quick attempt; the simulator is restarted once that is due.
    Another TPM on the same port is refused (pinned storage primary)."""
    hw = HardwareTpm(sim.tcti, retries=2, revive=sim.revive, recover_first=1.0)
    hw.open()
    try:
        assert hw.health.state == "ok"
        dead = sim.pid
        _kill_and_wait(sim.pid, sim.port)
        with pytest.raises(HwTpmError, match="unreachable"):
            hw.read_pcrs([0])
        assert hw.health.state == "down" and "unreachable" in hw.health.error
        started = time.monotonic()
        with pytest.raises(HwTpmError, match=r"unreachable \(1 attempt;"):
            hw.read_pcrs([0])
        assert time.monotonic() - started < 0.5  # one connection attempt, no retry loop
        assert sim.pid == dead  # no restart before it is due
        time.sleep(1.1)
        assert hw.read_pcrs([0])[0] == bytes(32)  # revived: a rebooted TPM
        assert hw.health.state == "ok" and sim.pid != dead and sim.tcti == hw.tcti

        # a TPM that is not this one takes the port: refused, and the outage goes on
        plain = HardwareTpm(sim.tcti, retries=1)  # no revive: only what answers at the port
        plain.open()
        pinned = plain.primary_name
        _kill_and_wait(sim.pid, sim.port)
        other_dir = sim.state_dir.parent / "other"
        other_dir.mkdir()
        (other_dir / "simulator.json").write_text(json.dumps({"pid": dead, "port": sim.port}))
        other = Simulator(other_dir, manufacture=False)
        assert other.start() == sim.tcti
        try:
            with HardwareTpm(other.tcti, retries=0) as fresh:
                assert fresh.primary_name != pinned
            with pytest.raises(HwTpmError, match="another TPM"):
                plain.read_pcrs([0])
            assert plain.health.state == "down"
        finally:
            plain.close()
            other.stop()
    finally:
        hw.close()
