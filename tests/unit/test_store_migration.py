"""The store's schema migrations: a version 1 database opens under version 2 with its groups,
vTPMs and meta intact; the attestation-key columns start empty and can then be written."""

from __future__ import annotations

import json
import sqlite3
import uuid
from pathlib import Path

import pytest

from vtpm.errors import ManagerError
from vtpm.manager import store as store_mod
from vtpm.manager.store import GroupRecord, Store
from vtpm.tpm.policy import PcrState

GROUP = uuid.UUID("11111111-2222-3333-4444-555555555555")
VTPM = uuid.UUID("66666666-7777-8888-9999-000000000000")
MANAGER = "0f0e0d0c-0b0a-0908-0706-050403020100"
STATE = PcrState((0, 7), (bytes(32), b"\x07" * 32))


def make_v1(path: Path) -> None:
    """A database as vtpm with schema version 1 wrote it: its statements, its rows."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for stmt in filter(None, (s.strip() for s in store_mod._SCHEMA_V1.split(";"))):
            db.execute(stmt)
        db.execute("INSERT INTO meta(key, value) VALUES('schema_version', '1')")
        db.execute("INSERT INTO meta(key, value) VALUES('manager_uuid', ?)", (MANAGER,))
        db.execute(
            "INSERT INTO groups(uuid, name, owner_pub, seq, pcr_states, labels, sealed_public, "
            "sealed_private, sealed_root, approval, created) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
            (
                str(GROUP),
                "legacy",
                b"-----BEGIN PUBLIC KEY-----\n",
                3,
                json.dumps([STATE.to_json()]),
                json.dumps(["*:vm_r:vtpm_t"]),
                b"sealed-public",
                b"sealed-private",
                b"\x01" * 32,
                b"approval",
                1700000000.0,
            ),
        )
        db.execute(
            "INSERT INTO vtpms(uuid, group_uuid, label, tpm, owner_uid, owner_gid, frontends, "
            "wrapped_key, wanted_running, created) VALUES(?,?,?,?,?,?,?,?,?,?)",
            (
                str(VTPM),
                str(GROUP),
                "guest1_u:vm_r:vtpm_t",
                "2.0",
                None,
                None,
                json.dumps(["ctrl=unix:/run/x.ctrl"]),
                b"wrapped",
                1,
                1700000001.0,
            ),
        )
    finally:
        db.close()


def test_a_v1_database_opens_under_v2_with_its_groups_intact(tmp_path: Path) -> None:
    path = tmp_path / "manager.db"
    make_v1(path)
    s = Store(path)
    s.open()
    try:
        assert s.meta("schema_version") == str(store_mod.SCHEMA_VERSION) == "3"
        assert s.meta("manager_uuid") == MANAGER  # not replaced by the migration
        g = s.group("legacy")
        assert g == GroupRecord(
            uuid=GROUP,
            name="legacy",
            owner_pub=b"-----BEGIN PUBLIC KEY-----\n",
            seq=3,
            pcr_states=(STATE,),
            labels=("*:vm_r:vtpm_t",),
            sealed_public=b"sealed-public",
            sealed_private=b"sealed-private",
            sealed_root=b"\x01" * 32,
            approval=b"approval",
            created=1700000000.0,
        )
        assert (g.ak_alg, g.ak_public, g.ak_private) == ("", b"", b"")  # made on first need
        v = s.vtpm(VTPM)
        assert v is not None and v.group_uuid == GROUP and v.wanted_running
        assert v.wrapped_key == b"wrapped"

        s.set_group_ak(GROUP, "rsa", b"ak-public", b"ak-private")
        s.update_group(g)  # the other group writes leave the AK alone
        g2 = s.group(str(GROUP))
        assert g2 is not None
        assert (g2.ak_alg, g2.ak_public, g2.ak_private) == ("rsa", b"ak-public", b"ak-private")
        with pytest.raises(ManagerError):
            s.set_group_ak(uuid.uuid4(), "ecc", b"p", b"q")
    finally:
        s.close()

    # opening again migrates nothing twice
    s = Store(path)
    s.open()
    try:
        g3 = s.group("legacy")
        assert g3 is not None and g3.ak_alg == "rsa" and s.meta("schema_version") == "3"
    finally:
        s.close()


def test_a_new_database_is_created_at_v2_and_keeps_the_ak(tmp_path: Path) -> None:
    s = Store(tmp_path / "manager.db")
    s.open()
    try:
        assert s.meta("schema_version") == "3"
        assert s.meta("manager_uuid")
        g = GroupRecord(
            uuid=GROUP,
            name="new",
            owner_pub=b"pem",
            seq=0,
            pcr_states=(STATE,),
            labels=(),
            sealed_public=b"p",
            sealed_private=b"q",
            sealed_root=bytes(32),
            approval=b"",
            created=1.0,
            ak_alg="ecc",
            ak_public=b"ak-pub",
            ak_private=b"ak-priv",
        )
        s.add_group(g)
        assert s.group("new") == g
        assert s.groups() == [g]
    finally:
        s.close()


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "manager.db"
    make_v1(path)
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    db.commit()
    db.close()
    s = Store(path)
    with pytest.raises(ManagerError, match="schema version 99"):
        s.open()
    s.close()
