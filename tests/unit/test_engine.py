"""The libtpms facade, in-process against the real library."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

import pytest

from vtpm.engine.engine import Engine, StateType, TpmVersion
from vtpm.errors import StateIntegrityError, TpmError
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_ALG, TPM_RC, TPM_SU


class MemoryNvram:
    """An in-memory NVRAM backend: the blobs libtpms stores, by name."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.stores: list[str] = []

    def load(self, name: str) -> bytes | None:
        return self.blobs.get(name)

    def store(self, name: str, data: bytes) -> None:
        self.blobs[name] = data
        self.stores.append(name)

    def delete(self, name: str, must_exist: bool) -> bool:
        return self.blobs.pop(name, None) is not None


class FaultInjectingNvram(MemoryNvram):
    """Fake that refuses to load, as a tampered blob would: a fault a real store can't be
    asked to produce on demand."""

    def load(self, name: str) -> bytes | None:
        raise StateIntegrityError(f"state blob {name} is corrupt; refusing to start")


@pytest.fixture
def tpm2() -> Iterator[tuple[Engine, MemoryNvram]]:
    nv = MemoryNvram()
    with Engine(TpmVersion.TPM20, nv) as eng:
        eng.start()
        assert frames.response_code(eng.process(frames.startup())) == TPM_RC.SUCCESS
        yield eng, nv


def test_library_version_is_checked_and_reported() -> None:
    with Engine(TpmVersion.TPM20, MemoryNvram()) as eng:
        major, minor, _patch = (int(x) for x in eng.library_version.split("."))
        assert (major, minor) >= (0, 9)


def test_manufacture_stores_permanent_state(tpm2: tuple[Engine, MemoryNvram]) -> None:
    _eng, nv = tpm2
    assert "permall" in nv.stores


def test_getrandom_and_extend(tpm2: tuple[Engine, MemoryNvram]) -> None:
    eng, _ = tpm2
    r1 = frames.parse_get_random(eng.process(frames.get_random(32)))
    r2 = frames.parse_get_random(eng.process(frames.get_random(32)))
    assert len(r1) == 32 and r1 != r2
    digest = hashlib.sha256(b"measured").digest()
    rc = frames.response_code(eng.process(frames.pcr_extend(16, {TPM_ALG.SHA256: digest})))
    assert rc == TPM_RC.SUCCESS
    (value,) = frames.parse_pcr_read(eng.process(frames.pcr_read(TPM_ALG.SHA256, [16])))
    assert value == hashlib.sha256(bytes(32) + digest).digest()


def test_state_survives_a_restart_through_the_backend() -> None:
    nv = MemoryNvram()
    digest = hashlib.sha256(b"x").digest()
    with Engine(TpmVersion.TPM20, nv) as eng:
        eng.start()
        eng.process(frames.startup())
        eng.process(frames.pcr_extend(10, {TPM_ALG.SHA256: digest}))
    # orderly stop stored the Shutdown(STATE): Startup(STATE) resumes PCR 10 (PCR 16, the
    # debug PCR, is not preserved by the spec)
    with Engine(TpmVersion.TPM20, nv) as eng:
        eng.start()
        rc = frames.response_code(eng.process(frames.startup(TPM_SU.STATE)))
        assert rc == TPM_RC.SUCCESS
        (value,) = frames.parse_pcr_read(eng.process(frames.pcr_read(TPM_ALG.SHA256, [10])))
        assert value == hashlib.sha256(bytes(32) + digest).digest()


def test_a_backend_error_stops_start_and_surfaces_as_itself() -> None:
    with Engine(TpmVersion.TPM20, FaultInjectingNvram()) as eng:
        with pytest.raises(StateIntegrityError, match="refusing to start"):
            eng.start()
        assert not eng.running
        with pytest.raises(TpmError, match="not running"):
            eng.process(frames.get_random(8))


def test_one_engine_per_process() -> None:
    with (
        Engine(TpmVersion.TPM20, MemoryNvram()),
        pytest.raises(TpmError, match="already hosts"),
    ):
        Engine(TpmVersion.TPM20, MemoryNvram())
    with Engine(TpmVersion.TPM20, MemoryNvram()):
        pass  # released after close


def test_buffer_size_query_and_set() -> None:
    with Engine(TpmVersion.TPM20, MemoryNvram()) as eng:
        size, lo, hi = eng.set_buffer_size(0)
        assert lo <= size <= hi and lo >= 2048
        assert eng.set_buffer_size(3000)[0] == 3000
        eng.start()
        with pytest.raises(TpmError):
            eng.set_buffer_size(4096)


def test_established_flag_and_locality_four_hash(tpm2: tuple[Engine, MemoryNvram]) -> None:
    eng, _ = tpm2
    eng.locality = 4
    eng.hash_start()
    eng.hash_data(b"dynamic root of trust")
    eng.hash_end()
    assert eng.established() is True
    eng.reset_established(3)
    assert eng.established() is False
    with pytest.raises(TpmError):
        eng.locality = 5


def test_state_blobs_round_trip_through_get_and_set() -> None:
    nv = MemoryNvram()
    with Engine(TpmVersion.TPM20, nv) as eng:
        eng.start()
        eng.process(frames.startup())
        perm = eng.get_state(StateType.PERMANENT)
        vol = eng.store_volatile()
        assert perm and vol
        eng.stop()
        eng.set_state(StateType.PERMANENT, perm)
        eng.set_state(StateType.VOLATILE, vol)
        eng.start()
        # the volatile state says Startup already happened
        rc = frames.response_code(eng.process(frames.startup()))
        assert rc == TPM_RC.INITIALIZE


def test_tpm12_startup_getrandom_extend() -> None:
    nv = MemoryNvram()
    with Engine(TpmVersion.TPM12, nv) as eng:
        eng.start()
        assert frames.response_code(eng.process(frames.startup12())) == 0
        resp = eng.process(frames.get_random12(16))
        assert frames.response_code(resp) == 0
        (n,) = struct.unpack_from(">I", resp, 10)
        assert n == 16 and len(resp) == 14 + 16
        digest = hashlib.sha1(b"m").digest()  # TPM 1.2 PCRs are SHA-1
        resp = eng.process(frames.extend12(10, digest))
        assert frames.response_code(resp) == 0
        assert resp[10:30] == hashlib.sha1(bytes(20) + digest).digest()
    assert "permall" in nv.blobs


def test_locality_reaches_the_tpm_and_returns_to_zero(tpm2: tuple[Engine, MemoryNvram]) -> None:
    # PCR 21 may be reset only at locality 2, PCR 16 at any locality but 4 (PC Client
    # attributes in libtpms); the engine drops its locality callback at locality 0
    eng, _ = tpm2
    reset21, reset16 = frames.pcr_reset(21), frames.pcr_reset(16)
    assert frames.response_code(eng.process(reset21)) == TPM_RC.LOCALITY
    assert frames.response_code(eng.process(reset21, 2)) == TPM_RC.SUCCESS
    assert eng.locality == 2
    assert frames.response_code(eng.process(reset21)) == TPM_RC.SUCCESS  # the locality stays
    eng.locality = 0
    assert frames.response_code(eng.process(reset21)) == TPM_RC.LOCALITY
    assert frames.response_code(eng.process(reset16)) == TPM_RC.SUCCESS
    eng.locality = 4
    assert frames.response_code(eng.process(reset16)) == TPM_RC.LOCALITY
    eng.reset_established(3)  # borrows locality 3 and gives 4 back
    assert eng.locality == 4
    assert frames.response_code(eng.process(reset16)) == TPM_RC.LOCALITY
