"""State through the control channel (CMD_GET_STATEBLOB / CMD_SET_STATEBLOB), as a local user
who reaches a vTPM's TCP control port would try it: no plaintext comes out (unless a standalone
instance was started to allow it), and garbage, another vTPM's blobs, older blobs and blobs
libtpms refuses do not go in; the vTPM keeps its acknowledged NV data. A sealed round trip
keeps the volatile state (PCRs) across INIT(DELETE_VOLATILE)."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.helpers import VTPM, ctrl_call, free_port_pair, instance, raw_call, tpm2
from tests.mgr import GUEST1, GUEST2, ManagerProc, manager, new_group, new_vtpm, owner_key
from vtpm.engine.engine import StateType
from vtpm.instance import identity
from vtpm.instance.statekey import load_key_file
from vtpm.instance.transfer import TransferBlob, TransferKey
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_ALG
from vtpm.wire import ctrl as w

pytestmark = pytest.mark.integration

NV_INDEX = "0x1500020"
PERM = int(w.StateBlobType.PERMANENT)
VOL = int(w.StateBlobType.VOLATILE)


def tcti(port: int) -> str:
    return f"swtpm:host=127.0.0.1,port={port}"


def write_nv(port: int, data: bytes, *, define: bool) -> None:
    t = tcti(port)
    if define:
        tpm2("nvdefine", NV_INDEX, "-C", "o", "-s", str(len(data)), "-a",
             "ownerread|ownerwrite", tcti=t)  # fmt: skip
    tpm2("nvwrite", NV_INDEX, "-C", "o", "-i-", tcti=t, input_=data)


def read_nv(port: int, size: int) -> bytes:
    return tpm2("nvread", NV_INDEX, "-C", "o", "-s", str(size), tcti=tcti(port)).stdout


def get_blob(port: int, kind: int, flags: int = 0) -> w.StateBlobResult:
    ans = ctrl_call(("127.0.0.1", port + 1), w.GetStateBlob(flags, kind))
    assert isinstance(ans, w.StateBlobResult), ans
    assert ans.result == 0
    return ans


def push(port: int, blobs: dict[int, bytes]) -> tuple[list[int], int]:
    """What QEMU's incoming migration sends: STOP, SET_STATEBLOB per blob, INIT(DELETE_VOLATILE).
    The SET results and the INIT result."""
    ctrl = ("127.0.0.1", port + 1)
    assert ctrl_call(ctrl, w.Stop()) == w.Result(0)
    results = []
    for kind, data in blobs.items():
        ans = ctrl_call(ctrl, w.SetStateBlob(w.STATE_FLAG_ENCRYPTED, kind, data))
        assert isinstance(ans, w.Result)
        results.append(ans.result)
    init = ctrl_call(ctrl, w.Init(w.INIT_FLAG_DELETE_VOLATILE))
    assert isinstance(init, w.Result)
    return results, init.result


def refused_and_nv_kept(port: int, blobs: dict[int, bytes], nv: bytes) -> None:
    sets, _init = push(port, blobs)
    assert sets[0] != 0, "the blob was accepted"
    tpm2("startup", "-c", tcti=tcti(port))  # INIT restarted the TPM (its own state)
    assert read_nv(port, len(nv)) == nv


def test_no_plaintext_state_over_the_tcp_control_port(tmp_path: Path) -> None:
    """Finding 1: a local user reading the state through the TCP control port gets no byte of
    an NV secret, whether it asks for the blob decrypted (as QEMU does) or not."""
    secret = secrets.token_bytes(32)
    with instance(tmp_path / "state", tmp_path / "key", mssim=False) as inst:
        assert inst.port is not None
        tpm2("startup", "-c", tcti=inst.tcti_swtpm)
        write_nv(inst.port, secret, define=True)
        for flags in (w.STATE_FLAG_DECRYPTED, 0):
            for kind in (PERM, VOL, int(w.StateBlobType.SAVESTATE)):
                ans = get_blob(inst.port, kind, flags)
                assert secret not in ans.data
                assert secret[:8] not in ans.data
                if ans.data:
                    assert ans.flags == w.STATE_FLAG_ENCRYPTED
            assert len(get_blob(inst.port, PERM, flags).data) > 1000
        assert read_nv(inst.port, 32) == secret  # the exports changed nothing


def test_plaintext_export_only_when_a_standalone_instance_was_started_for_it(
    tmp_path: Path,
) -> None:
    secret = secrets.token_bytes(32)
    with instance(
        tmp_path / "state", tmp_path / "key", mssim=False, extra=["--export-plaintext-state"]
    ) as inst:
        assert inst.port is not None
        tpm2("startup", "-c", tcti=inst.tcti_swtpm)
        write_nv(inst.port, secret, define=True)
        clear = get_blob(inst.port, PERM, w.STATE_FLAG_DECRYPTED)
        assert clear.flags == 0 and secret in clear.data
        sealed = get_blob(inst.port, PERM, 0)  # not asked for: sealed all the same
        assert sealed.flags == w.STATE_FLAG_ENCRYPTED and secret not in sealed.data
        assert "sent in clear" in inst.log()


def test_plaintext_export_flag_is_refused_under_a_manager(tmp_path: Path) -> None:
    a, b = socket.socketpair()
    try:
        res = subprocess.run(
            [*VTPM, "instance", "run", "--state-dir", str(tmp_path / "s"), "--uuid",
             str(uuid.uuid4()), "--manager-fd", str(b.fileno()), "--ctrl",
             f"tcp:127.0.0.1:{free_port_pair()}", "--export-plaintext-state"],
            pass_fds=(b.fileno(),), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        a.close()
        b.close()
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused under a Manager" in lines[0], res.stderr
    assert not (tmp_path / "s").exists()


def test_sealed_round_trip_keeps_the_volatile_state(tmp_path: Path) -> None:
    """Finding 2 without QEMU: blobs got from the running TPM and set back, then
    INIT(DELETE_VOLATILE), resume the TPM where it was (PCRs kept, no Startup needed)."""
    with instance(tmp_path / "state", tmp_path / "key", mssim=False) as inst:
        assert inst.port is not None
        tpm2("startup", "-c", tcti=inst.tcti_swtpm)
        tpm2("pcrextend", "16:sha256=" + "ab" * 32, tcti=inst.tcti_swtpm)
        before = read_pcr16(inst.port)
        blobs = {
            kind: get_blob(inst.port, kind, w.STATE_FLAG_DECRYPTED).data for kind in (PERM, VOL)
        }
        sets, init = push(inst.port, blobs)
        assert sets == [0, 0] and init == 0, inst.log()
        assert read_pcr16(inst.port) == before != bytes(32)
        assert not (inst.state_dir / "volatilestate.blob").exists()  # consumed by the load


def read_pcr16(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        return frames.parse_pcr_read(raw_call(s, frames.pcr_read(TPM_ALG.SHA256, [16])))[0]


def test_garbage_foreign_and_older_blobs_are_refused(tmp_path: Path) -> None:
    first, second = secrets.token_bytes(16), secrets.token_bytes(16)
    key = tmp_path / "key"
    with (
        instance(tmp_path / "a", key, mssim=False) as a,
        instance(tmp_path / "b", key, mssim=False) as other,  # same key file, another vTPM
    ):
        assert a.port is not None and other.port is not None
        tpm2("startup", "-c", tcti=other.tcti_swtpm)
        write_nv(other.port, b"cloned!!" * 2, define=True)
        foreign = get_blob(other.port, PERM).data

        tpm2("startup", "-c", tcti=a.tcti_swtpm)
        write_nv(a.port, first, define=True)
        older = get_blob(a.port, PERM).data
        write_nv(a.port, second, define=False)  # acknowledged: the newest state

        refused_and_nv_kept(a.port, {PERM: os.urandom(1400)}, second)
        refused_and_nv_kept(a.port, {PERM: foreign}, second)  # a clone attempt
        refused_and_nv_kept(a.port, {PERM: older}, second)  # a rollback
        refused_and_nv_kept(a.port, {PERM: b""}, second)  # erasing it
        tampered = bytearray(get_blob(a.port, PERM).data)
        tampered[-20] ^= 1
        refused_and_nv_kept(a.port, {PERM: bytes(tampered)}, second)
        vol_as_perm = get_blob(a.port, VOL).data
        refused_and_nv_kept(a.port, {PERM: vol_as_perm}, second)  # the wrong type
        log = a.log()
        assert "refused as a rollback" in log
        assert log.count("not a sealed state blob of this vTPM") >= 4


def test_a_sealed_blob_libtpms_refuses_leaves_the_previous_state_running(tmp_path: Path) -> None:
    """The test-load: a blob that opens (sealed with the vTPM's own key, e.g. by a broken host
    tool) but that libtpms cannot start with is not installed; the TPM runs its old state."""
    nv = secrets.token_bytes(16)
    state, key = tmp_path / "state", tmp_path / "key"
    with instance(state, key, mssim=False) as inst:
        assert inst.port is not None
        tpm2("startup", "-c", tcti=inst.tcti_swtpm)
        write_nv(inst.port, nv, define=True)
        ident = identity.read(state)
        assert ident is not None
        bad = TransferKey(load_key_file(key)).seal(
            TransferBlob(ident.vtpm_uuid, StateType.PERMANENT, 1 << 40, os.urandom(1400))
        )
        assert ctrl_call(("127.0.0.1", inst.port + 1), w.Stop()) == w.Result(0)
        before = (state / "permall.blob").read_bytes()  # after STOP's Shutdown(STATE)
        sets, init = push(inst.port, {PERM: bad})
        assert sets == [0] and init != 0
        assert (state / "permall.blob").read_bytes() == before
        tpm2("startup", "-c", tcti=inst.tcti_swtpm)
        assert read_nv(inst.port, 16) == nv
        assert "refused" in inst.log()
    with instance(state, key, mssim=False) as again:  # and it still starts
        assert again.port is not None
        tpm2("startup", "-c", tcti=again.tcti_swtpm)
        assert read_nv(again.port, 16) == nv


def test_under_a_manager_garbage_foreign_and_older_blobs_are_refused(tmp_path: Path) -> None:
    first, second = secrets.token_bytes(16), secrets.token_bytes(16)
    with manager(tmp_path / "data") as mgr:
        new_group(mgr, "guests", owner_key(tmp_path))
        v, port = new_vtpm(mgr, "guests", GUEST1)
        _other, other_port = new_vtpm(mgr, "guests", GUEST2)
        tpm2("startup", "-c", tcti=tcti(other_port))
        write_nv(other_port, b"cloned!!" * 2, define=True)
        foreign = get_blob(other_port, PERM).data

        tpm2("startup", "-c", tcti=tcti(port))
        write_nv(port, first, define=True)
        older = get_blob(port, PERM).data
        write_nv(port, second, define=False)

        refused_and_nv_kept(port, {PERM: os.urandom(1400)}, second)
        refused_and_nv_kept(port, {PERM: foreign}, second)
        refused_and_nv_kept(port, {PERM: older}, second)
        check_restart(mgr, v["uuid"], port, second)


def check_restart(mgr: ManagerProc, vtpm_uuid: str, port: int, nv: bytes) -> None:
    """The Manager's record was not moved either: the vTPM restarts on its own state."""
    mgr.cli("stop", vtpm_uuid)
    mgr.cli("start", vtpm_uuid)
    tpm2("startup", "-c", tcti=tcti(port))
    assert read_nv(port, len(nv)) == nv
