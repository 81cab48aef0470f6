"""The front door's configuration (compat.json), its labels, and state locations."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from vtpm.errors import ConfigError, RequestError
from vtpm.manager import locations
from vtpm.manager.compatconfig import DEFAULT_SOCKET, CompatConfig, label_name
from vtpm.manager.records import LocationRecord
from vtpm.manager.statesecret import check_value, matches, mixed_key
from vtpm.wire.compat import StateKind, StateLocation


def test_label_names_are_sanitised_and_long_ones_cut_with_a_hash() -> None:
    assert label_name("web-01.example") == "web-01.example"
    assert label_name("web one/ä") == "web_one__"
    assert label_name("") == "_"
    a, b = label_name("x" * 80 + "a"), label_name("x" * 80 + "b")
    assert len(a) == len(b) == 48 and a != b and a.startswith("x" * 37 + "-")
    cfg = CompatConfig("guests")
    assert cfg.label("my vm") == "my_vm_u:vm_r:vtpm_t"
    assert str(cfg.wildcard()) == "*:vm_r:vtpm_t"
    assert cfg.label("y" * 200).split(":")[0].endswith("_u")


def test_the_file_round_trips_and_bad_ones_are_refused(tmp_path: Path) -> None:
    assert CompatConfig.load(tmp_path) is None  # no file: no front door
    cfg = CompatConfig("guests", Path("/run/x/c.sock"), 107, (59, 64055))
    cfg.save(tmp_path)
    assert (tmp_path / "compat.json").stat().st_mode & 0o777 == 0o600
    assert CompatConfig.load(tmp_path) == cfg
    assert CompatConfig("g").socket == DEFAULT_SOCKET
    assert cfg.uid_allowed(0) and cfg.uid_allowed(59) and not cfg.uid_allowed(1000)
    assert not cfg.uid_allowed(None)
    bad: object
    for bad in (
        {"group": 1},
        {"group": "g", "socket_gid": -1},
        {"group": "g", "allow_uids": ["tss"]},
        {"group": "g", "extra": 1},
        {"group": "g", "socket": "relative.sock"},
        {"group": "g", "label_template": "fixed_u:vm_r:vtpm_t"},
        {"group": "g", "label_template": "{name}:bad role:vtpm_t"},
        [],
    ):
        (tmp_path / "compat.json").write_text(json.dumps(bad))
        with pytest.raises(ConfigError):
            CompatConfig.load(tmp_path)


def test_a_location_is_identified_by_its_path_and_descriptor(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    fa = os.open(a, os.O_RDONLY | os.O_DIRECTORY)
    fb = os.open(b, os.O_PATH)
    try:
        ident = locations.identify(StateLocation(StateKind.DIR, str(a)), fa)
        st = a.stat()
        assert (ident.st_dev, ident.st_ino) == (st.st_dev, st.st_ino)
        with pytest.raises(RequestError, match="not of"):  # a's path, b's descriptor
            locations.identify(StateLocation(StateKind.DIR, str(a)), fb)
        with pytest.raises(RequestError, match="not a file"):
            locations.identify(StateLocation(StateKind.FILE, str(a)), fa)
        with pytest.raises(RequestError, match="absolute"):
            locations.identify(StateLocation(StateKind.DIR, "rel/a"), fa)
        rec = LocationRecord(uuid.uuid4(), "dir", str(a), st.st_dev, st.st_ino)
        assert locations.same(rec, StateLocation(StateKind.DIR, str(a)), ident)
        (a / "keep.txt").write_bytes(b"y")
        assert not locations.has_state(StateLocation(StateKind.DIR, str(a)), fa)
        (a / "permall.blob").write_bytes(b"x")
        assert locations.has_state(StateLocation(StateKind.DIR, str(a)), fa)
        pa = os.open(a, os.O_PATH)  # the compat executables may pass an O_PATH descriptor
        try:
            locations.clear(StateLocation(StateKind.DIR, str(a)), pa)
        finally:
            os.close(pa)
        assert sorted(os.listdir(a)) == ["keep.txt"]
    finally:
        os.close(fa)
        os.close(fb)


def test_removed_tells_a_removal_from_a_missing_disk(tmp_path: Path) -> None:
    d = tmp_path / "disk" / "vm"
    d.mkdir(parents=True)
    st = d.stat()
    rec = LocationRecord(uuid.uuid4(), "dir", str(d), st.st_dev, st.st_ino)
    assert not locations.removed(rec)
    d.rmdir()
    assert locations.removed(rec)  # gone, its parent there
    (tmp_path / "disk").rmdir()
    assert locations.removed(rec)  # its parent gone too, on the same device (libvirt's <uuid>/)
    on_a_disk = LocationRecord(rec.vtpm_uuid, "dir", str(d), st.st_dev + 1, st.st_ino)
    assert not locations.removed(on_a_disk)  # the nearest ancestor is on another device:
    # the location's disk is not mounted now, the vTPM is kept


def test_a_peer_other_than_root_hands_over_only_its_own_location(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    os.chown(mine, 65534, 65534)
    vol = tmp_path / "vol"
    vol.write_bytes(bytes(4096))
    os.chown(vol, 65534, 65534)
    fm = os.open(mine, os.O_RDONLY | os.O_DIRECTORY)
    ft = os.open(theirs, os.O_RDONLY | os.O_DIRECTORY)
    fr = os.open(vol, os.O_RDONLY)
    fw = os.open(vol, os.O_RDWR)
    try:
        locations.identify(StateLocation(StateKind.DIR, str(mine)), fm, 65534)
        with pytest.raises(RequestError, match="not owned by uid 65534"):
            locations.identify(StateLocation(StateKind.DIR, str(theirs)), ft, 65534)
        locations.identify(StateLocation(StateKind.DIR, str(theirs)), ft, 0)  # root: any
        with pytest.raises(RequestError, match="not open for writing"):
            locations.identify(StateLocation(StateKind.FILE, str(vol)), fr, 65534)
        locations.identify(StateLocation(StateKind.FILE, str(vol)), fw, 65534)
    finally:
        for fd in (fm, ft, fr, fw):
            os.close(fd)


def test_uuid_in_path() -> None:
    u = uuid.uuid4()
    assert locations.uuid_in_path(f"/var/lib/libvirt/swtpm/{u}/tpm2") == u
    assert locations.uuid_in_path("/var/lib/vm/tpm") is None


def test_the_secret_check_and_the_mixed_key() -> None:
    key = bytes(range(32))
    check = check_value(key, b"pw")
    assert matches(key, b"pw", check) and not matches(key, b"pW", check)
    assert not matches(bytes(32), b"pw", check)
    mixed = mixed_key(key, b"pw")
    assert len(mixed) == 32 and mixed != key and mixed != mixed_key(key, b"pw2")
    assert b"pw" not in check
