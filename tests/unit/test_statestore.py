"""The encrypted state store and its key, on real files."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.helpers import DictJournal
from vtpm.errors import InstanceLockedError, StateError, StateIntegrityError, StateKeyError
from vtpm.instance.statekey import StateKey, generate_key_file, load_key_fd, load_key_file
from vtpm.instance.statestore import HEADER, StateStore

KEY = StateKey(bytes(range(32)))
OTHER_KEY = StateKey(bytes(32))
SENTINEL = b"PLAINTEXT-SENTINEL-0123456789" * 4
REFUSED = "corrupt, truncated, or not this vTPM's; refusing to start"


def store(tmp_path: Path, key: StateKey = KEY, vid: uuid.UUID | None = None) -> StateStore:
    s = StateStore(tmp_path / "state", vid or uuid.UUID(int=1), key)
    s.open()
    return s


def test_round_trip_and_no_clear_text_on_disk(tmp_path: Path) -> None:
    s = store(tmp_path)
    for name in ("permall", "volatilestate", "savestate"):
        s.store(name, SENTINEL + name.encode())
        assert s.load(name) == SENTINEL + name.encode()
    s.close()
    files = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert files == ["lock", "permall.blob", "savestate.blob", "volatilestate.blob"]
    for p in (tmp_path / "state").iterdir():
        assert b"PLAINTEXT-SENTINEL" not in p.read_bytes()


def test_leftover_temp_file_is_removed_at_open(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "permall.blob.tmp").write_bytes(b"half written")
    s = store(tmp_path)
    assert not (tmp_path / "state" / "permall.blob.tmp").exists()
    s.close()


def test_every_damage_is_refused_and_the_file_untouched(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.store("permall", SENTINEL)
    path = s.path("permall")
    good = path.read_bytes()
    positions = [
        0,
        7,
        8,
        12,
        19,
        20,
        31,
        HEADER.size,
        HEADER.size + 5,
        len(good) - 17,
        len(good) - 1,
    ]
    for pos in positions:
        bad = bytearray(good)
        bad[pos] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(StateIntegrityError, match=REFUSED):
            s.load("permall")
        assert path.read_bytes() == bytes(bad)
    for length in (0, 5, HEADER.size, HEADER.size + 15, len(good) - 1):
        path.write_bytes(good[:length])
        with pytest.raises(StateIntegrityError, match=REFUSED):
            s.load("permall")
    path.write_bytes(good)
    assert s.load("permall") == SENTINEL
    s.close()


def test_foreign_renamed_and_wrong_key_blobs_are_refused(tmp_path: Path) -> None:
    a = store(tmp_path / "a", vid=uuid.UUID(int=1))
    a.store("permall", SENTINEL)
    blob = a.path("permall").read_bytes()
    a.close()
    b = store(tmp_path / "b", vid=uuid.UUID(int=2))
    b.path("permall").write_bytes(blob)
    with pytest.raises(StateIntegrityError):
        b.load("permall")
    b.path("volatilestate").write_bytes(blob)
    b.close()
    a2 = store(tmp_path / "a", vid=uuid.UUID(int=1))
    a2.path("volatilestate").write_bytes(blob)
    with pytest.raises(StateIntegrityError):
        a2.load("volatilestate")
    a2.close()
    wrong = store(tmp_path / "a", key=OTHER_KEY, vid=uuid.UUID(int=1))
    with pytest.raises(StateIntegrityError):
        wrong.load("permall")
    wrong.close()


def test_expected_digest_and_counter(tmp_path: Path) -> None:
    s = store(tmp_path)
    first = s.store("permall", b"one")
    second = s.store("permall", b"two")
    assert (first.counter, second.counter) == (1, 2)
    assert s.load("permall", expected_digest=second.digest) == b"two"
    with pytest.raises(StateIntegrityError, match="rollback"):
        s.load("permall", expected_digest=first.digest)
    s.close()
    s = store(tmp_path)
    assert s.store("permall", b"three").counter == 3
    with pytest.raises(StateError):
        s.store("other", b"x")
    s.close()


def test_state_directory_lock(tmp_path: Path) -> None:
    s = store(tmp_path)
    with pytest.raises(InstanceLockedError, match="already running"):
        store(tmp_path)
    code = (
        "import sys, uuid; from pathlib import Path\n"
        "from vtpm.instance.statestore import StateStore\n"
        "from vtpm.instance.statekey import StateKey\n"
        "StateStore(Path(sys.argv[1]), uuid.UUID(int=1), StateKey(bytes(32))).open()\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "state")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode != 0 and "InstanceLockedError" in res.stderr
    s.close()
    store(tmp_path).close()


def test_key_file_rules(tmp_path: Path) -> None:
    path = tmp_path / "k"
    generate_key_file(path)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert len(load_key_file(path).secret) == 32
    with pytest.raises(StateKeyError, match="refusing to overwrite"):
        generate_key_file(path)
    raw = tmp_path / "raw"
    raw.write_bytes(os.urandom(32))
    raw.chmod(0o600)
    assert load_key_file(raw).secret == raw.read_bytes()
    raw.chmod(0o644)
    with pytest.raises(StateKeyError, match="0644"):
        load_key_file(raw)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(StateKeyError, match="symlink"):
        load_key_file(link)
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    short.chmod(0o600)
    with pytest.raises(StateKeyError, match="does not hold a state key"):
        load_key_file(short)
    with pytest.raises(StateKeyError, match="does not exist"):
        load_key_file(tmp_path / "missing")
    key = load_key_file(path)
    assert key.secret.hex() not in repr(key) and "secret" in repr(key)


def test_key_from_a_descriptor(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.write(w, b"ab" * 32 + b"\n")
    os.close(w)
    assert load_key_fd(r).secret == bytes.fromhex("ab" * 32)
    with pytest.raises(OSError):
        os.close(r)  # closed by load_key_fd
    with pytest.raises(StateKeyError, match="cannot be read"):
        load_key_fd(r)


# under a journal (the Manager's record): which file is current, and what is never deleted ----


def journaled(tmp_path: Path, journal: DictJournal) -> StateStore:
    s = StateStore(tmp_path / "state", uuid.UUID(int=1), KEY, journal=journal)
    s.open()
    return s


def test_a_blob_the_manager_does_not_record_is_refused_and_kept(tmp_path: Path) -> None:
    """An older copy of the Manager's database (it records no permall yet) must not make the
    instance delete the newer state: refused, naming the file and what to do."""
    j = DictJournal()
    s = journaled(tmp_path, j)
    s.store("permall", SENTINEL)
    path = s.path("permall")
    raw = path.read_bytes()
    j.digests.clear()  # the database put back predates the first write
    with pytest.raises(StateIntegrityError, match="Manager records no permall") as e:
        s.load("permall")
    assert str(path) in str(e.value) and "restore the Manager's database" in str(e.value)
    assert path.read_bytes() == raw
    # a newer state than the record: the same, files kept
    old_digest = s.store("permall", b"old").digest
    newer = s.store("permall", b"newer")
    j.digests["permall"] = old_digest
    with pytest.raises(StateIntegrityError, match="does not match the recorded state"):
        s.load("permall")
    assert hashlib.sha256(path.read_bytes()).digest() == newer.digest
    j.digests["permall"] = newer.digest  # the right database back: it opens
    assert s.load("permall") == b"newer"
    s.close()


def test_unrecorded_leftovers_of_writes_and_deletions_in_flight_are_discarded(
    tmp_path: Path,
) -> None:
    j = DictJournal()
    s = journaled(tmp_path, j)
    d = tmp_path / "state"
    # a first write that was never recorded: .next only
    s.store("savestate", b"x")
    os.replace(d / "savestate.blob", d / "savestate.next")
    j.digests.clear()
    assert s.load("savestate") is None and not (d / "savestate.next").exists()
    # a recorded write whose rename did not happen: .next is promoted over the old .blob
    first = s.store("permall", b"one")
    os.replace(s.path("permall"), d / "keep")
    second = s.store("permall", b"two")
    os.replace(s.path("permall"), d / "permall.next")
    os.replace(d / "keep", s.path("permall"))
    assert j.digests["permall"] == second.digest != first.digest
    assert s.load("permall") == b"two" and not (d / "permall.next").exists()
    # a deletion renamed the blob, then the process died before the Manager recorded it
    s.store("volatilestate", b"v")
    os.replace(s.path("volatilestate"), d / "volatilestate.gone")
    assert s.load("volatilestate") == b"v" and s.path("volatilestate").exists()
    # ... or after it was recorded
    os.replace(s.path("volatilestate"), d / "volatilestate.gone")
    del j.digests["volatilestate"]
    assert s.load("volatilestate") is None and not (d / "volatilestate.gone").exists()
    # a delete leaves nothing behind and is recorded
    s.store("volatilestate", b"v")
    assert s.delete("volatilestate", True) and "volatilestate" not in j.digests
    assert sorted(p.name for p in d.iterdir()) == ["lock", "permall.blob"]
    s.close()


def test_a_missing_volatile_blob_is_no_saved_state_a_missing_permall_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    j = DictJournal()
    s = journaled(tmp_path, j)
    s.store("permall", SENTINEL)
    s.store("volatilestate", b"volatile")
    s.path("volatilestate").unlink()
    with caplog.at_level(logging.WARNING, logger="vtpm.instance.statestore"):
        assert s.load("volatilestate") is None
    assert "needs Startup(CLEAR)" in caplog.text
    assert j.deletions == ["volatilestate"] and not s.exists("volatilestate")
    s.path("permall").unlink()
    with pytest.raises(StateIntegrityError, match="missing but the Manager records it"):
        s.load("permall")
    s.close()


class AnswerLosingJournal(DictJournal):
    """Records a write, then fails as a Manager killed before its Ack would (the recording's
    fate unknown to the instance): a fault a real Manager cannot be asked to produce."""

    lose = True

    def written(self, name: str, counter: int, digest: bytes) -> None:
        super().written(name, counter, digest)
        if self.lose:
            raise StateError(f"the write of {name} cannot be recorded: the link is lost")


def test_a_write_whose_recording_is_unknown_is_retried_as_the_same_file(tmp_path: Path) -> None:
    """The retry of a held write must not replace a `.next` the Manager may have recorded."""
    j = AnswerLosingJournal()
    s = journaled(tmp_path, j)
    with pytest.raises(StateError):
        s.store("permall", b"state one")
    nxt = tmp_path / "state" / "permall.next"
    first = nxt.read_bytes()
    with pytest.raises(StateError):
        s.store("permall", b"state one")  # the retry: the same bytes again
    assert nxt.read_bytes() == first and j.digests["permall"] == hashlib.sha256(first).digest()
    with pytest.raises(StateError, match="may or may not have been recorded"):
        s.store("permall", b"another state")
    assert nxt.read_bytes() == first
    j.lose = False
    assert s.store("permall", b"state one").digest == hashlib.sha256(first).digest()
    assert s.load("permall") == b"state one"
    assert s.store("permall", b"another state").counter == 2
    s.close()
