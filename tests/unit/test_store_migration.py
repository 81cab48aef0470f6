"""The store's schema migrations: a version 1 database opens under the current version with its
groups, vTPMs and meta intact; the attestation-key columns start empty and can then be
written; v3 makes labels unique (and refuses, by name, a database where two vTPMs share one)
and carries each group's approval NV index. `database_present` tells a lost database."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import uuid
from pathlib import Path

import pytest

from vtpm.errors import ConfigError, ManagerError
from vtpm.manager import schema
from vtpm.manager.store import (
    CertRecord,
    GroupCaRecord,
    GroupRecord,
    LocationRecord,
    Store,
    VtpmRecord,
    database_present,
)
from vtpm.tpm.policy import PcrState

GROUP = uuid.UUID("11111111-2222-3333-4444-555555555555")
VTPM = uuid.UUID("66666666-7777-8888-9999-000000000000")
MANAGER = "0f0e0d0c-0b0a-0908-0706-050403020100"
STATE = PcrState((0, 7), (bytes(32), b"\x07" * 32))


def make_v1(path: Path, *, up_to: int = 1, extra_vtpms: tuple[tuple[str, str], ...] = ()) -> None:
    """A database as vtpm with schema version `up_to` (1 or 2) wrote it: its statements, its
    rows; `extra_vtpms`: (uuid, label) of more vTPMs in the group."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        for v in range(1, up_to + 1):
            for stmt in filter(None, (s.strip() for s in schema._MIGRATIONS[v].split(";"))):
                db.execute(stmt)
        db.execute("INSERT INTO meta(key, value) VALUES('schema_version', ?)", (str(up_to),))
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
        for u, label in extra_vtpms:
            db.execute(
                "INSERT INTO vtpms(uuid, group_uuid, label, tpm, frontends, wrapped_key, created) "
                "VALUES(?,?,?,?,?,?,?)",
                (u, str(GROUP), label, "2.0", "[]", b"w", 1700000002.0),
            )
    finally:
        db.close()


def test_a_v1_database_opens_under_v5_with_its_groups_intact(tmp_path: Path) -> None:
    path = tmp_path / "manager.db"
    make_v1(path)
    s = Store(path)
    s.open()
    try:
        assert s.meta("schema_version") == str(schema.SCHEMA_VERSION) == "5"
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
        assert g3 is not None and g3.ak_alg == "rsa" and s.meta("schema_version") == "5"
    finally:
        s.close()


def test_a_new_database_is_created_at_v5_and_keeps_the_ak(tmp_path: Path) -> None:
    s = Store(tmp_path / "manager.db")
    s.open()
    try:
        assert s.meta("schema_version") == "5"
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
            approval_nv=0x01500100,
        )
        s.add_group(g)
        assert s.group("new") == g
        assert s.groups() == [g]
        moved = dataclasses.replace(g, seq=1, approval_nv=0x01500101)
        s.update_group(moved)
        assert s.group("new") == moved
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


def test_v3_makes_labels_unique_and_keeps_approval_nv(tmp_path: Path) -> None:
    path = tmp_path / "manager.db"
    make_v1(path, up_to=2)
    s = Store(path)
    s.open()
    try:
        g = s.group("legacy")
        assert g is not None and g.approval_nv == 0  # the column's default in old groups
        other = VtpmRecord(uuid.uuid4(), GROUP, "guest1_u:vm_r:vtpm_t", "2.0", None, None, ())
        with pytest.raises(ConfigError, match=f"label guest1_u:vm_r:vtpm_t is already .* {VTPM}"):
            s.add_vtpm(other)
        with pytest.raises(sqlite3.IntegrityError):  # the index holds even past the check
            s._conn().execute(
                "INSERT INTO vtpms(uuid, group_uuid, label, tpm, frontends, wrapped_key, "
                "created) VALUES(?,?,?,?,?,?,?)",
                (str(other.uuid), str(GROUP), other.label, "2.0", "[]", b"", 1.0),
            )
        s.add_vtpm(dataclasses.replace(other, label="guest2_u:vm_r:vtpm_t"))
        assert len(s.vtpms()) == 2
    finally:
        s.close()


def test_v3_refuses_a_database_where_two_vtpms_share_a_label_and_names_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "manager.db"
    dup = "aaaaaaaa-0000-0000-0000-000000000001"
    make_v1(
        path,
        up_to=2,
        extra_vtpms=((dup, "guest1_u:vm_r:vtpm_t"), (str(uuid.uuid4()), "guest2_u:vm_r:vtpm_t")),
    )
    s = Store(path)
    with pytest.raises(ManagerError) as e:
        s.open()
    s.close()
    msg = str(e.value)
    assert "\n" not in msg and "schema 3" in msg
    assert "label guest1_u:vm_r:vtpm_t is carried by" in msg
    assert dup in msg and str(VTPM) in msg and "guest2_u" not in msg
    db = sqlite3.connect(path)
    try:  # the failed migration changed nothing
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("2",)
        cols = [r[1] for r in db.execute("PRAGMA table_info(groups)")]
        assert "approval_nv" not in cols
    finally:
        db.close()


def test_database_present_tells_a_lost_database(tmp_path: Path) -> None:
    path = tmp_path / "manager.db"
    assert not database_present(path)  # missing
    path.write_bytes(b"")
    assert not database_present(path)  # 0 bytes
    path.unlink()
    sqlite3.connect(path).execute("CREATE TABLE x(a)").connection.close()
    assert not database_present(path)  # SQLite, but no Manager schema
    path.unlink()
    s = Store(path)
    s.open()
    s.close()
    assert database_present(path)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 100)
    with pytest.raises(ManagerError, match="restore it from the backup"):
        database_present(garbage)


def test_v4_group_ca_and_vtpm_certificates(tmp_path: Path) -> None:
    """Schema v4: a group's CA is stored apart from its other fields, and the certificates
    issued to a vTPM are recorded per kind, replaced on re-issue, and go with the vTPM."""
    path = tmp_path / "manager.db"
    make_v1(path)
    s = Store(path)
    s.open()
    try:
        g = s.group("legacy")
        assert g is not None and g.ca is None
        ca = GroupCaRecord(b"pub", b"priv", b"cert", b"attest", b"sig")
        s.set_group_ca(GROUP, ca)
        s.update_group(g)  # the other group writes leave the CA alone
        g2 = s.group("legacy")
        assert g2 is not None and g2.ca == ca
        with pytest.raises(ManagerError):
            s.set_group_ca(uuid.uuid4(), ca)
        assert s.certs(VTPM) == []
        s.record_cert(VTPM, "ek-rsa2048", b"name1", b"der1")
        s.record_cert(VTPM, "ek-ecc256", b"name2", b"der2")
        s.record_cert(VTPM, "ek-rsa2048", b"name3", b"der3")  # re-issued: replaced
        assert s.certs(VTPM) == [
            CertRecord("ek-ecc256", b"name2", b"der2"),
            CertRecord("ek-rsa2048", b"name3", b"der3"),
        ]
        s.delete_vtpm(VTPM)
        assert s.certs(VTPM) == []
    finally:
        s.close()


def test_v5_state_locations_and_accept_state(tmp_path: Path) -> None:
    """Schema v5: a front-door vTPM is recorded with its state location in one step (a path
    names one vTPM), the location goes with the vTPM, and `accept_state` is a flag per vTPM."""
    path = tmp_path / "manager.db"
    make_v1(path)
    s = Store(path)
    s.open()
    try:
        v = s.vtpm(VTPM)
        assert v is not None and v.accept_state is False
        s.set_accept_state(VTPM, True)
        v = s.vtpm(VTPM)
        assert v is not None and v.accept_state is True
        assert s.location(VTPM) is None and s.locations() == []

        u = uuid.uuid4()
        rec = dataclasses.replace(v, uuid=u, label="door_u:vm_r:vtpm_t", accept_state=False)
        loc = LocationRecord(u, "dir", "/var/lib/x/tpm2", 2**63 + 5, 2**64 - 1)
        s.add_vtpm(rec, loc)
        assert s.location(u) == loc and s.location_at(loc.path) == loc
        s.set_secret_check(u, b"c" * 32)
        assert s.location(u) == dataclasses.replace(loc, secret_check=b"c" * 32)

        u2 = uuid.uuid4()  # the same path for another vTPM: refused, nothing recorded
        rec2 = dataclasses.replace(rec, uuid=u2, label="door2_u:vm_r:vtpm_t")
        with pytest.raises(ConfigError, match="keeps its state at"):
            s.add_vtpm(rec2, dataclasses.replace(loc, vtpm_uuid=u2))
        assert s.vtpm(u2) is None

        s.delete_vtpm(u)
        assert s.location(u) is None and s.locations() == []
    finally:
        s.close()
