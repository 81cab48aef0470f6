"""The single-file state store (instance/statefile.py) on real files, with a journal held in
a dict (the Manager's record without a Manager)."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests.helpers import DictJournal
from vtpm.endpoints import Endpoint
from vtpm.engine.engine import TpmVersion
from vtpm.errors import ConfigError, InstanceLockedError, StateError, StateIntegrityError
from vtpm.instance.config import InstanceConfig
from vtpm.instance.stateblob import BlobStore
from vtpm.instance.statefile import DEFAULT_SIZE, MIN_SIZE, StateFile
from vtpm.instance.statekey import StateKey
from vtpm.instance.statestore import StateStore
from vtpm.wire import statefile as layout

KEY = StateKey(bytes(range(32)))
OTHER_KEY = StateKey(bytes(32))
UID = uuid.UUID(int=1)
SENTINEL = b"PLAINTEXT-SENTINEL-0123456789" * 4
ACCEPT = f"run `vtpm accept-state {UID}` to accept this state on purpose"


class FailingJournal(DictJournal):
    """Fails to record (`lose`: after recording, as a Manager killed before its Ack would; else
    before): a fault a real Manager cannot be asked to produce."""

    fail = True
    lose = False

    def written(self, name: str, counter: int, digest: bytes) -> None:
        if self.fail and self.lose:
            super().written(name, counter, digest)
        if self.fail:
            raise StateError(f"the write of {name} cannot be recorded: the link is lost")
        super().written(name, counter, digest)

    def deleted(self, name: str) -> None:
        if self.fail:
            raise StateError(f"the deletion of {name} cannot be recorded: the link is lost")
        super().deleted(name)


def sfile(
    path: Path,
    journal: DictJournal | None = None,
    key: StateKey = KEY,
    vid: uuid.UUID | None = UID,
    tpm: TpmVersion = TpmVersion.TPM20,
    accept: bool = False,
) -> StateFile:
    s = StateFile(path, vid, tpm, key, journal=journal, accept_state=accept)
    s.open()
    return s


def test_both_stores_satisfy_the_interface(tmp_path: Path) -> None:
    stores: list[BlobStore] = [
        StateFile(tmp_path / "f", UID, TpmVersion.TPM20, KEY),
        StateStore(tmp_path / "d", UID, KEY),
    ]
    for s in stores:
        s.open()
        assert s.vtpm_uuid == UID and not s.exists("permall")
        info = s.store("permall", b"x")
        assert s.load("permall") == b"x" and s.counter("permall") == info.counter == 1
        s.raise_counter("permall", 9)
        assert s.store("permall", b"y").counter == 10
        assert s.delete("permall", True) and not s.exists("permall")
        s.close()


def test_round_trip_no_clear_text_and_a_fresh_file_is_4_mib(tmp_path: Path) -> None:
    f = tmp_path / "tpm.img"
    s = sfile(f)
    assert f.stat().st_size == DEFAULT_SIZE and f.stat().st_mode & 0o777 == 0o600
    for name in ("permall", "volatilestate", "savestate"):
        s.store(name, SENTINEL + name.encode())
    s.delete("savestate", True)
    s.close()
    assert b"PLAINTEXT-SENTINEL" not in f.read_bytes()
    assert f.stat().st_size == DEFAULT_SIZE
    s = sfile(f, vid=None)  # the uuid from the header
    assert s.vtpm_uuid == UID
    assert s.load("permall") == SENTINEL + b"permall"
    assert s.load("volatilestate") == SENTINEL + b"volatilestate"
    assert s.load("savestate") is None and not s.exists("savestate")
    assert s.counter("permall") == 1 and s.counter("savestate") == 1
    s.close()


def test_a_preallocated_file_keeps_its_size_and_a_new_uuid_is_recorded(tmp_path: Path) -> None:
    f = tmp_path / "vol"
    size = MIN_SIZE + 12345
    f.write_bytes(bytes(size))
    s = sfile(f, vid=None)
    made = s.vtpm_uuid
    s.store("permall", b"p")
    s.close()
    assert f.stat().st_size == size
    s = sfile(f, vid=None)
    assert s.vtpm_uuid == made and s.load("permall") == b"p"
    s.close()


def test_too_small_files_are_refused_clearly(tmp_path: Path) -> None:
    f = tmp_path / "small"
    f.write_bytes(bytes(MIN_SIZE - 1))
    with pytest.raises(StateError, match=f"too small .* at least {MIN_SIZE} bytes"):
        sfile(f)
    assert f.read_bytes() == bytes(MIN_SIZE - 1)  # nothing written
    f.write_bytes(bytes(MIN_SIZE))
    s = sfile(f)
    s.store("permall", b"fits")
    with pytest.raises(StateError, match="too small for this vTPM's state: a slot needs"):
        s.store("volatilestate", os.urandom(layout.MIN_SLOT))
    s.close()
    s = sfile(f)
    assert s.load("permall") == b"fits" and s.load("volatilestate") is None
    s.close()


def test_a_file_that_is_not_a_state_file_is_never_overwritten(tmp_path: Path) -> None:
    f = tmp_path / "disk"
    data = bytes(4096) + b"a filesystem, say" + bytes(DEFAULT_SIZE)
    f.write_bytes(data)
    with pytest.raises(StateIntegrityError, match="not a vTPM state file; refusing to overwrite"):
        sfile(f)
    f.write_bytes(b"\x7fELF" + bytes(DEFAULT_SIZE))
    with pytest.raises(StateIntegrityError, match="is not a vTPM state file"):
        sfile(f)
    assert f.read_bytes() == b"\x7fELF" + bytes(DEFAULT_SIZE)
    d = tmp_path / "dir"
    d.mkdir()
    with pytest.raises(StateError, match="not a regular file or block device"):
        sfile(d)


def test_another_vtpm_key_or_version_is_refused_and_the_file_untouched(tmp_path: Path) -> None:
    f = tmp_path / "f"
    s = sfile(f)
    s.store("permall", SENTINEL)
    s.close()
    before = f.read_bytes()
    with pytest.raises(ConfigError, match=f"holds vTPM {UID}, not"):
        sfile(f, vid=uuid.UUID(int=2))
    with pytest.raises(ConfigError, match=r"holds a TPM 2.0, not 1.2; pass --tpm 2.0"):
        sfile(f, tpm=TpmVersion.TPM12)
    with pytest.raises(StateIntegrityError, match="corrupt or not this vTPM's"):
        sfile(f, key=OTHER_KEY)
    assert f.read_bytes() == before
    with open(f, "r+b") as fh:
        fh.truncate(4096 + layout.MIN_SLOT)
    with pytest.raises(StateIntegrityError, match="truncated"):
        sfile(f)


def test_the_newest_whole_slot_is_used_and_a_torn_write_falls_back(tmp_path: Path) -> None:
    f = tmp_path / "f"
    s = sfile(f)
    s.store("permall", b"one")  # slot A, generation 1
    s.store("permall", b"two")  # slot B, generation 2
    s.close()
    raw = bytearray(f.read_bytes())
    header = layout.decode_header(bytes(raw))
    assert isinstance(header, layout.FileHeader)
    b_at = header.slot_at(1)
    assert layout.decode_slot(bytes(raw[b_at : b_at + 4096]), header.slot_size) != layout.TORN
    s = sfile(f)
    assert s.load("permall") == b"two"
    s.store("permall", b"three")  # slot A again, generation 3
    s.close()
    raw = bytearray(f.read_bytes())
    a_at = header.slot_at(0)
    raw[a_at + 70] ^= 0xFF  # the write of "three" cut short
    f.write_bytes(bytes(raw))
    s = sfile(f)
    assert s.load("permall") == b"two"
    assert s.counter("permall") == 2  # the torn slot's counter is not trusted
    s.store("permall", b"four")  # goes over the torn slot: B stays whole
    s.close()
    s = sfile(f)
    assert s.load("permall") == b"four"
    s.close()


def test_lock_held_twice(tmp_path: Path) -> None:
    f = tmp_path / "f"
    s = sfile(f)
    with pytest.raises(InstanceLockedError, match="already running"):
        sfile(f)
    fd = os.open(f, os.O_RDWR)
    try:  # the Manager's form: an inherited descriptor, reopened through /proc
        with pytest.raises(InstanceLockedError):
            sfile(Path(f"/proc/self/fd/{fd}"))
        s.close()
        t = sfile(Path(f"/proc/self/fd/{fd}"))
        t.store("permall", b"through the fd")
        t.close()
    finally:
        os.close(fd)
    s = sfile(f)
    assert s.load("permall") == b"through the fd"
    s.close()


# under a journal -----------------------------------------------------------------------------


def test_the_journal_picks_the_slot_and_a_crash_before_the_record_keeps_the_old(
    tmp_path: Path,
) -> None:
    f = tmp_path / "f"
    j = FailingJournal()
    j.fail = False
    s = sfile(f, j)
    one = s.store("permall", b"one")
    assert j.digests == {"permall": one.digest} and j.counters == {"permall": 1}
    j.fail = True  # the Manager dies before it records the next write
    with pytest.raises(StateError, match="cannot be recorded"):
        s.store("permall", b"two")
    s.close()
    j.fail = False
    s = sfile(f, j)  # the written slot is newer, but the journal holds the old one
    assert s.load("permall") == b"one"
    two = s.store("permall", b"two again")
    assert two.counter == 3  # above the unrecorded write's counter
    s.close()
    s = sfile(f, j)
    assert s.load("permall") == b"two again"
    # a deletion not recorded: the blob is still there
    s.store("volatilestate", b"v")
    j.fail = True
    with pytest.raises(StateError):
        s.delete("volatilestate", True)
    s.close()
    j.fail = False
    s = sfile(f, j)
    assert s.load("volatilestate") == b"v"
    assert s.delete("volatilestate", True) and j.deletions == ["volatilestate"]
    s.close()
    s = sfile(f, j)
    assert not s.exists("volatilestate") and s.load("permall") == b"two again"
    s.close()


def test_a_write_whose_recording_is_unknown_is_retried_as_the_same_bytes(tmp_path: Path) -> None:
    f = tmp_path / "f"
    j = FailingJournal()
    j.lose = True  # recorded, but the answer lost
    s = sfile(f, j)
    with pytest.raises(StateError):
        s.store("permall", b"state one")
    first = f.read_bytes()
    recorded = j.digests["permall"]
    with pytest.raises(StateError):
        s.store("permall", b"state one")  # the engine's retry: the same bytes again
    assert f.read_bytes() == first and j.digests["permall"] == recorded
    with pytest.raises(StateError, match="may or may not have been recorded"):
        s.store("permall", b"another state")
    with pytest.raises(StateError, match="may or may not have been recorded"):
        s.store("savestate", b"another blob")
    assert f.read_bytes() == first
    j.fail = False
    assert s.store("permall", b"state one").digest == recorded
    assert s.store("permall", b"another state").counter == 2
    s.close()
    s = sfile(f, j)
    assert s.load("permall") == b"another state"
    s.close()


def test_an_older_copy_put_back_is_refused_then_accepted_on_purpose(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    f, backup = tmp_path / "f", tmp_path / "backup"
    j = DictJournal()
    s = sfile(f, j)
    s.store("permall", b"old")
    s.store("savestate", b"saved")
    s.close()
    shutil.copyfile(f, backup)
    s = sfile(f, j)
    s.store("permall", b"new")
    s.store("permall", b"newer")
    s.delete("savestate", True)
    s.close()
    shutil.copyfile(backup, f)  # the old volume put back byte for byte
    with pytest.raises(
        StateIntegrityError, match="does not hold the state the Manager records"
    ) as e:
        sfile(f, j)
    assert ACCEPT in str(e.value) and str(f) in str(e.value)
    assert f.read_bytes() == backup.read_bytes()
    with caplog.at_level(logging.WARNING, logger="vtpm.instance.statefile"):
        s = sfile(f, j, accept=True)
    assert "accepted on purpose (--accept-state)" in caplog.text
    assert s.load("permall") == b"old" and s.load("savestate") == b"saved"
    s.close()
    s = sfile(f, j)  # recorded: the next start needs no flag
    assert s.load("permall") == b"old"
    assert s.store("permall", b"on").counter == 2  # counting on from the accepted state
    s.close()


def test_accept_state_never_accepts_what_does_not_open(tmp_path: Path) -> None:
    f = tmp_path / "f"
    j = DictJournal()
    s = sfile(f, key=OTHER_KEY)  # another vTPM's state (same uuid, another key)
    s.store("permall", b"theirs")
    s.close()
    j.digests["permall"] = hashlib.sha256(b"ours").digest()
    with pytest.raises(StateIntegrityError, match="corrupt or not this vTPM's"):
        sfile(f, j, accept=True)
    assert j.digests["permall"] == hashlib.sha256(b"ours").digest()


def test_a_state_the_journal_does_not_record_at_all(tmp_path: Path) -> None:
    f = tmp_path / "f"
    j = DictJournal()
    s = sfile(f, j)
    s.store("permall", b"p")
    s.close()
    with pytest.raises(StateIntegrityError, match=ACCEPT.replace("`", ".")):
        sfile(f, DictJournal())  # an older Manager database: it records nothing
    g = tmp_path / "blank"
    with pytest.raises(StateIntegrityError, match="holds no state but the Manager records some"):
        sfile(g, j)
    assert not g.exists() or not any(g.read_bytes())  # not formatted
    with pytest.raises(StateIntegrityError, match="refusing to start even with --accept-state"):
        # formatted, no permall in the newest slot, the journal records one
        s = sfile(tmp_path / "h")
        s.store("savestate", b"s")
        s.close()
        sfile(tmp_path / "h", j, accept=True)


def test_the_configuration_takes_exactly_one_state_location(tmp_path: Path) -> None:
    ep = (Endpoint.parse("tcp:2321"),)
    key = tmp_path / "k"
    assert InstanceConfig(state_file=tmp_path / "f", key_file=key, server=ep).state_dir is None
    with pytest.raises(ConfigError, match="exactly one of --state-dir and --state-file"):
        InstanceConfig(key_file=key, server=ep)
    with pytest.raises(ConfigError, match="exactly one of --state-dir and --state-file"):
        InstanceConfig(state_dir=tmp_path, state_file=tmp_path / "f", key_file=key, server=ep)
    with pytest.raises(ConfigError, match="--accept-state needs a Manager"):
        InstanceConfig(state_dir=tmp_path, key_file=key, server=ep, accept_state=True)
