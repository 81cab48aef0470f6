"""The directory store in a directory another user owns (the orchestrator's): planted
symlinks and FIFOs are refused, never followed or blocked on; and --accept-state."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests.helpers import DictJournal
from vtpm.engine.engine import TpmVersion
from vtpm.errors import StateError, StateIntegrityError
from vtpm.instance import identity
from vtpm.instance.statekey import StateKey
from vtpm.instance.statestore import StateStore

KEY = StateKey(bytes(range(32)))
UID = uuid.UUID(int=1)
ACCEPT = f"run `vtpm accept-state {UID}` to accept this state on purpose"


def dstore(d: Path, journal: DictJournal | None = None, accept: bool = False) -> StateStore:
    s = StateStore(d, UID, KEY, journal=journal, accept_state=accept)
    s.open()
    return s


def test_a_symlink_planted_as_a_blob_is_refused_never_followed(tmp_path: Path) -> None:
    d = tmp_path / "state"
    s = dstore(d)
    s.store("permall", b"real")
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file")
    real = d / "permall.blob"
    os.replace(real, tmp_path / "saved")
    real.symlink_to(victim)
    with pytest.raises(StateError, match="is a symbolic link; refusing to follow it"):
        s.load("permall")
    # a write replaces the link by a file; the target is never written through it
    s.store("permall", b"new")
    assert victim.read_bytes() == b"root's file" and not real.is_symlink()
    assert s.load("permall") == b"new"
    s.close()


def test_a_fifo_planted_as_a_blob_is_refused_without_blocking(tmp_path: Path) -> None:
    d = tmp_path / "state"
    s = dstore(d)
    os.mkfifo(d / "permall.blob")
    with pytest.raises(StateError, match="is not a regular file"):
        s.load("permall")
    s.close()


def test_a_symlinked_lock_file_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.mkdir()
    victim = tmp_path / "victim"
    (d / "lock").symlink_to(victim)
    with pytest.raises(StateError, match=r"lock file .* is a symbolic link"):
        dstore(d)
    assert not victim.exists()  # not created through the link


def test_a_symlinked_identity_file_is_not_followed(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.mkdir()
    elsewhere = tmp_path / "other.json"
    identity.write(tmp_path, identity.Identity(UID, TpmVersion.TPM20))
    os.replace(tmp_path / identity.FILENAME, elsewhere)
    (d / identity.FILENAME).symlink_to(elsewhere)
    with pytest.raises(StateError, match="refusing to start"):
        identity.resolve(d, None, TpmVersion.TPM20)


def test_a_planted_temp_file_does_not_block_a_write(tmp_path: Path) -> None:
    d = tmp_path / "state"
    s = dstore(d)
    (d / "permall.blob.tmp").write_bytes(b"planted after open")
    s.store("permall", b"written")
    assert s.load("permall") == b"written"
    s.close()


def test_accept_state_takes_an_older_copy_put_back_and_records_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    d, backup = tmp_path / "state", tmp_path / "backup"
    j = DictJournal()
    s = dstore(d, j)
    s.store("permall", b"old")
    s.store("savestate", b"saved")
    s.close()
    shutil.copytree(d, backup)
    s = dstore(d, j)
    s.store("permall", b"new")
    s.delete("savestate", True)
    s.store("volatilestate", b"v")
    s.close()
    shutil.rmtree(d)
    shutil.copytree(backup, d)
    s = dstore(d, j)
    with pytest.raises(StateIntegrityError, match="does not match the recorded state") as e:
        s.load("permall")
    assert ACCEPT in str(e.value)
    with pytest.raises(StateIntegrityError, match="Manager records no savestate") as e:
        s.load("savestate")
    assert ACCEPT in str(e.value)
    s.close()
    with caplog.at_level(logging.WARNING, logger="vtpm.instance.statestore"):
        s = dstore(d, j, accept=True)
        assert s.load("permall") == b"old"
        assert s.load("savestate") == b"saved"
        assert s.load("volatilestate") is None  # recorded, missing: no saved volatile state
    assert "accepted on purpose (--accept-state)" in caplog.text
    assert j.digests["permall"] == hashlib.sha256((d / "permall.blob").read_bytes()).digest()
    assert "volatilestate" in j.deletions
    s.close()
    s = dstore(d, j)  # recorded: no flag needed any more
    assert s.load("permall") == b"old" and s.load("savestate") == b"saved"
    s.close()


def test_accept_state_refuses_a_blob_that_does_not_open(tmp_path: Path) -> None:
    d = tmp_path / "state"
    j = DictJournal()
    s = dstore(d, j)
    s.store("permall", b"mine")
    raw = bytearray((d / "permall.blob").read_bytes())
    raw[-1] ^= 1
    (d / "permall.blob").write_bytes(bytes(raw))
    s.close()
    recorded = dict(j.digests)
    s = dstore(d, j, accept=True)
    with pytest.raises(StateIntegrityError, match="corrupt, truncated, or not this vTPM's"):
        s.load("permall")
    assert j.digests == recorded
    s.close()
