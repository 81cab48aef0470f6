"""State survives restarts; damaged state is refused and left untouched."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import VTPM, instance, start_instance, tpm2

pytestmark = pytest.mark.integration

SECRET = b"sealed before the restart\n"
NV_INDEX = "0x1500020"
PERSISTENT = "0x81000005"


def test_nv_index_and_persistent_key_survive_restart(tmp_path: Path) -> None:
    state, key = tmp_path / "state", tmp_path / "state.key"
    data = os.urandom(32)
    (tmp_path / "nv.bin").write_bytes(data)
    with instance(state, key, mssim=False) as inst:
        t = inst.tcti_swtpm
        tpm2("startup", "-c", tcti=t)
        tpm2(
            "nvdefine",
            NV_INDEX,
            "-C",
            "o",
            "-s",
            "32",
            "-a",
            "ownerread|ownerwrite|authread|authwrite",
            tcti=t,
        )
        tpm2("nvwrite", NV_INDEX, "-C", "o", "-i", str(tmp_path / "nv.bin"), tcti=t)
        tpm2("createprimary", "-C", "o", "-c", "primary.ctx", tcti=t, cwd=tmp_path)
        tpm2("evictcontrol", "-C", "o", "-c", "primary.ctx", PERSISTENT, tcti=t, cwd=tmp_path)
        tpm2("flushcontext", "-t", tcti=t)
        tpm2(
            "create",
            "-C",
            PERSISTENT,
            "-i-",
            "-u",
            "seal.pub",
            "-r",
            "seal.priv",
            tcti=t,
            cwd=tmp_path,
            input_=SECRET,
        )
    assert inst.proc.returncode == 0, inst.log()

    with instance(state, key, mssim=False) as inst:
        t = inst.tcti_swtpm
        tpm2("startup", "-c", tcti=t)
        assert tpm2("nvread", NV_INDEX, "-C", "o", "-s", "32", tcti=t).stdout == data
        handles = tpm2("getcap", "handles-persistent", tcti=t).stdout.decode()
        assert PERSISTENT in handles.lower()
        tpm2(
            "load",
            "-C",
            PERSISTENT,
            "-u",
            "seal.pub",
            "-r",
            "seal.priv",
            "-c",
            "seal.ctx",
            tcti=t,
            cwd=tmp_path,
        )
        assert tpm2("unseal", "-c", "seal.ctx", tcti=t, cwd=tmp_path).stdout == SECRET


def test_flipped_bit_in_state_blob_is_refused_and_left_untouched(tmp_path: Path) -> None:
    state, key = tmp_path / "state", tmp_path / "state.key"
    with instance(state, key, mssim=False) as inst:
        tpm2("startup", "-c", tcti=inst.tcti_swtpm)
        tpm2("nvdefine", NV_INDEX, "-C", "o", "-s", "8", tcti=inst.tcti_swtpm)
    blob = state / "permall.blob"
    raw = bytearray(blob.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    blob.write_bytes(bytes(raw))
    with pytest.raises(RuntimeError) as excinfo:
        start_instance(state, key, mssim=False)
    message = str(excinfo.value)
    assert "permall" in message and "refusing to start" in message
    assert "Traceback" not in message
    assert blob.read_bytes() == bytes(raw)


def test_wrong_key_is_refused(tmp_path: Path) -> None:
    state, key = tmp_path / "state", tmp_path / "state.key"
    with instance(state, key, mssim=False) as inst:
        tpm2("startup", "-c", tcti=inst.tcti_swtpm)
    other = tmp_path / "other.key"
    subprocess.run([*VTPM, "instance", "keygen", str(other)], check=True, capture_output=True)
    with pytest.raises(RuntimeError, match="refusing to start"):
        start_instance(state, other, mssim=False)
