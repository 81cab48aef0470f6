"""The Manager's store: one SQLite database (WAL, synchronous FULL) in the data directory.

What it holds: groups (owner key, sequence number, permitted PCR states and labels, the group
key as a hardware-TPM sealed object, the group's attestation key and CA key as hardware-TPM blobs
with the CA's certificate), vTPMs
(group, label, TPM version, frontends, the state key as AES-GCM ciphertext under the group key),
each vTPM's recorded state-blob digests (which blob is current: the rollback check), the
certificates the group CA issued to each vTPM, and an
audit log of every administrative change, accepted or refused. Nothing secret is stored in
the clear: the group key exists only sealed by the hardware TPM, state keys only wrapped under a
group key.

The schema is versioned (`meta.schema_version`); `open()` creates or upgrades it
(`vtpm.manager.schema`). All methods are thread-safe (one connection, one lock); each write is
one transaction. An empty or missing database is what `open()` creates; whether that is
allowed (no vTPM state beside it) is for the caller to decide first, with `database_present`.
Each audited change is passed to `audit_listener` once committed (the hardware-TPM floor
advances on the administrative ones, `vtpm.manager.floor`).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vtpm.errors import ConfigError, ManagerError
from vtpm.manager import schema
from vtpm.manager.records import (
    AuditEntry,
    CertRecord,
    GroupCaRecord,
    GroupRecord,
    LocationRecord,
    StateDigest,
    VtpmRecord,
)
from vtpm.tpm.policy import PcrState

__all__ = [
    "AuditEntry",
    "CertRecord",
    "GroupCaRecord",
    "GroupRecord",
    "LocationRecord",
    "StateDigest",
    "VtpmRecord",
    "Store",
    "database_present",
    "label_taken",
]

# column lists are constants: the f-strings below build no query from input
_GROUP_COLS = (
    "uuid, name, owner_pub, seq, pcr_states, labels, sealed_public, sealed_private, "
    "sealed_root, approval, approval_nv, created, ak_alg, ak_public, ak_private, "
    "ca_public, ca_private, ca_cert, ca_certify_attest, ca_certify_signature"
)
_VTPM_COLS = (
    "uuid, group_uuid, label, tpm, owner_uid, owner_gid, frontends, wrapped_key, "
    "wanted_running, created, accept_state"
)
_LOCATION_COLS = "vtpm_uuid, kind, path, st_dev, st_ino, secret_check"


def _mutable_group_fields(g: GroupRecord) -> tuple[object, ...]:
    """The columns `update_group` may change, in `_GROUP_COLS` order (seq .. approval_nv)."""
    return (
        g.seq,
        json.dumps([s.to_json() for s in g.pcr_states]),
        json.dumps(list(g.labels)),
        g.sealed_public,
        g.sealed_private,
        g.sealed_root,
        g.approval,
        g.approval_nv,
    )


def _ca_fields(ca: GroupCaRecord | None) -> tuple[bytes, ...]:
    if ca is None:
        return (b"",) * 5
    return (ca.public, ca.private, ca.certificate, ca.certify_attest, ca.certify_signature)


def label_taken(label: str, holder: uuid.UUID) -> str:
    return (
        f"label {label} is already carried by vTPM {holder}: a label names one vTPM of this "
        f"Manager (delete that vTPM first, or choose another label)"
    )


def _unreadable(path: Path, e: Exception) -> str:
    return (
        f"the Manager's database {path} cannot be opened ({e}): restore it from the backup "
        f"taken together with {path.parent / 'vtpms'}/ (nothing was changed)"
    )


def database_present(path: Path) -> bool:
    """Whether `path` holds a Manager database (one with a schema), without changing anything.

    False for a missing file, a 0-byte one, or a SQLite file with no schema: what `open()`
    would create silently. A file SQLite cannot read raises ManagerError."""
    try:
        if path.stat().st_size == 0:
            return False
    except FileNotFoundError:
        return False
    except OSError as e:
        raise ManagerError(_unreadable(path, e)) from None
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise ManagerError(_unreadable(path, e)) from None
    try:
        return schema.version(db) > 0
    except (sqlite3.Error, ValueError) as e:
        raise ManagerError(_unreadable(path, e)) from None
    finally:
        db.close()


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.RLock()
        # told (action, outcome) of every audit entry once it is committed; must not raise
        self.audit_listener: Callable[[str, str], None] | None = None

    # lifecycle ------------------------------------------------------------------------------

    def open(self) -> None:
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA secure_delete=ON")  # a deleted vTPM's wrapped key is overwritten
            db.execute("PRAGMA busy_timeout=10000")
        except sqlite3.DatabaseError as e:
            raise ManagerError(_unreadable(self.path, e)) from None
        self._db = db
        with self._tx() as tx:
            schema.migrate(tx, self.path)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise ManagerError("the store is not open")
        return self._db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # meta -----------------------------------------------------------------------------------

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn().execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
            return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self.update_meta({key: value})

    def update_meta(self, values: dict[str, str], remove: tuple[str, ...] = ()) -> None:
        """Set `values` and delete the keys in `remove`, in one transaction."""
        with self._tx() as tx:
            for key, value in values.items():
                tx.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, value))
            for key in remove:
                tx.execute("DELETE FROM meta WHERE key=?", (key,))

    # groups ---------------------------------------------------------------------------------

    @staticmethod
    def _group(row: Any) -> GroupRecord:
        (u, name, pub, seq, states, labels, spub, spriv, root, approval, nv, created, *rest) = row
        ak_alg, ak_public, ak_private, *ca = rest
        ca_fields = tuple(bytes(c) for c in ca)
        return GroupRecord(
            uuid=uuid.UUID(str(u)),
            name=str(name),
            owner_pub=bytes(pub),
            seq=int(seq),
            pcr_states=tuple(PcrState.from_json(s) for s in json.loads(str(states))),
            labels=tuple(json.loads(str(labels))),
            sealed_public=bytes(spub),
            sealed_private=bytes(spriv),
            sealed_root=bytes(root),
            approval=bytes(approval),
            approval_nv=int(nv),
            created=float(created),
            ak_alg=str(ak_alg),
            ak_public=bytes(ak_public),
            ak_private=bytes(ak_private),
            ca=GroupCaRecord(*ca_fields) if ca_fields[0] else None,
        )

    def add_group(self, g: GroupRecord) -> None:
        with self._tx() as tx:
            if tx.execute("SELECT 1 FROM groups WHERE name=?", (g.name,)).fetchone():
                raise ConfigError(f"a group named {g.name!r} exists already")
            tx.execute(
                f"INSERT INTO groups({_GROUP_COLS}) VALUES({','.join('?' * 20)})",
                (
                    str(g.uuid),
                    g.name,
                    g.owner_pub,
                    *_mutable_group_fields(g),
                    g.created or time.time(),
                    g.ak_alg,
                    g.ak_public,
                    g.ak_private,
                    *_ca_fields(g.ca),
                ),
            )

    def update_group(self, g: GroupRecord) -> None:
        """Replace a group's mutable fields (sequence, states, labels, sealed key, approval)."""
        with self._tx() as tx:
            cur = tx.execute(
                "UPDATE groups SET seq=?, pcr_states=?, labels=?, sealed_public=?, "
                "sealed_private=?, sealed_root=?, approval=?, approval_nv=? WHERE uuid=?",
                (*_mutable_group_fields(g), str(g.uuid)),
            )
            if cur.rowcount != 1:
                raise ManagerError(f"group {g.uuid} does not exist")

    def set_group_ak(self, group_uuid: uuid.UUID, alg: str, public: bytes, private: bytes) -> None:
        """Record a group's attestation key (the only write of the ak_* columns)."""
        with self._tx() as tx:
            cur = tx.execute(
                "UPDATE groups SET ak_alg=?, ak_public=?, ak_private=? WHERE uuid=?",
                (alg, public, private, str(group_uuid)),
            )
            if cur.rowcount != 1:
                raise ManagerError(f"group {group_uuid} does not exist")

    def set_group_ca(self, group_uuid: uuid.UUID, ca: GroupCaRecord) -> None:
        """Record a group's CA (the only write of the ca_* columns)."""
        with self._tx() as tx:
            cur = tx.execute(
                "UPDATE groups SET ca_public=?, ca_private=?, ca_cert=?, ca_certify_attest=?, "
                "ca_certify_signature=? WHERE uuid=?",
                (*_ca_fields(ca), str(group_uuid)),
            )
            if cur.rowcount != 1:
                raise ManagerError(f"group {group_uuid} does not exist")

    def group(self, ref: str) -> GroupRecord | None:
        """A group by uuid or by name."""
        with self._lock:
            row = (
                self._conn()
                .execute(f"SELECT {_GROUP_COLS} FROM groups WHERE uuid=? OR name=?", (ref, ref))
                .fetchone()
            )
            return None if row is None else self._group(row)

    def groups(self) -> list[GroupRecord]:
        with self._lock:
            rows = self._conn().execute(f"SELECT {_GROUP_COLS} FROM groups ORDER BY created, name")
            return [self._group(r) for r in rows.fetchall()]

    def delete_group(self, group_uuid: uuid.UUID) -> None:
        with self._tx() as tx:
            n = tx.execute(
                "SELECT COUNT(*) FROM vtpms WHERE group_uuid=?", (str(group_uuid),)
            ).fetchone()[0]
            if n:
                raise ManagerError(f"group {group_uuid} still has {n} vTPM(s); delete them first")
            tx.execute("DELETE FROM groups WHERE uuid=?", (str(group_uuid),))

    # vTPMs ----------------------------------------------------------------------------------

    @staticmethod
    def _vtpm(row: Any) -> VtpmRecord:
        (u, g, label, tpm, uid, gid, fronts, wrapped, wanted, created, accept) = row
        return VtpmRecord(
            uuid=uuid.UUID(str(u)),
            group_uuid=uuid.UUID(str(g)),
            label=str(label),
            tpm=str(tpm),
            owner_uid=None if uid is None else int(uid),
            owner_gid=None if gid is None else int(gid),
            frontends=tuple(json.loads(str(fronts))),
            wrapped_key=bytes(wrapped),
            wanted_running=bool(wanted),
            created=float(created),
            accept_state=bool(accept),
        )

    def add_vtpm(self, v: VtpmRecord, location: LocationRecord | None = None) -> None:
        """Record a vTPM (a front-door one with its state location, in one step)."""
        with self._tx() as tx:
            if tx.execute("SELECT 1 FROM vtpms WHERE uuid=?", (str(v.uuid),)).fetchone():
                raise ConfigError(f"a vTPM with uuid {v.uuid} exists already")
            other = self.vtpm_by_label(v.label)
            if other is not None:
                raise ConfigError(label_taken(v.label, other.uuid))
            tx.execute(
                f"INSERT INTO vtpms({_VTPM_COLS}) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
                (
                    str(v.uuid),
                    str(v.group_uuid),
                    v.label,
                    v.tpm,
                    v.owner_uid,
                    v.owner_gid,
                    json.dumps(list(v.frontends)),
                    v.wrapped_key,
                    int(v.wanted_running),
                    v.created or time.time(),
                    int(v.accept_state),
                ),
            )
            if location is not None:
                self._insert_location(tx, location)

    def vtpm(self, vtpm_uuid: uuid.UUID) -> VtpmRecord | None:
        with self._lock:
            row = (
                self._conn()
                .execute(f"SELECT {_VTPM_COLS} FROM vtpms WHERE uuid=?", (str(vtpm_uuid),))
                .fetchone()
            )
            return None if row is None else self._vtpm(row)

    def vtpm_by_label(self, label: str) -> VtpmRecord | None:
        """The vTPM carrying `label` (canonical form): labels are unique per Manager."""
        with self._lock:
            row = (
                self._conn()
                .execute(f"SELECT {_VTPM_COLS} FROM vtpms WHERE label=?", (label,))
                .fetchone()
            )
            return None if row is None else self._vtpm(row)

    def vtpms(self, group_uuid: uuid.UUID | None = None) -> list[VtpmRecord]:
        with self._lock:
            if group_uuid is None:
                rows = self._conn().execute(
                    f"SELECT {_VTPM_COLS} FROM vtpms ORDER BY created, uuid"
                )
            else:
                rows = self._conn().execute(
                    f"SELECT {_VTPM_COLS} FROM vtpms WHERE group_uuid=? ORDER BY created",
                    (str(group_uuid),),
                )
            return [self._vtpm(r) for r in rows.fetchall()]

    def set_wanted_running(self, vtpm_uuid: uuid.UUID, wanted: bool) -> None:
        with self._tx() as tx:
            tx.execute(
                "UPDATE vtpms SET wanted_running=? WHERE uuid=?", (int(wanted), str(vtpm_uuid))
            )

    def set_accept_state(self, vtpm_uuid: uuid.UUID, accept: bool) -> None:
        with self._tx() as tx:
            tx.execute(
                "UPDATE vtpms SET accept_state=? WHERE uuid=?", (int(accept), str(vtpm_uuid))
            )

    def delete_vtpm(self, vtpm_uuid: uuid.UUID) -> None:
        with self._tx() as tx:
            tx.execute("DELETE FROM vtpm_locations WHERE vtpm_uuid=?", (str(vtpm_uuid),))
            tx.execute("DELETE FROM state_digests WHERE vtpm_uuid=?", (str(vtpm_uuid),))
            tx.execute("DELETE FROM vtpm_certs WHERE vtpm_uuid=?", (str(vtpm_uuid),))
            tx.execute("DELETE FROM vtpms WHERE uuid=?", (str(vtpm_uuid),))

    # the front door's state locations ------------------------------------------------------

    @staticmethod
    def _location(row: Any) -> LocationRecord:
        u, kind, path, dev, ino, check = row
        return LocationRecord(
            uuid.UUID(str(u)), str(kind), str(path), int(dev), int(ino), bytes(check)
        )

    @staticmethod
    def _insert_location(tx: sqlite3.Connection, loc: LocationRecord) -> None:
        if tx.execute("SELECT 1 FROM vtpm_locations WHERE path=?", (loc.path,)).fetchone():
            raise ConfigError(f"a vTPM keeps its state at {loc.path} already")
        tx.execute(
            f"INSERT INTO vtpm_locations({_LOCATION_COLS}) VALUES(?,?,?,?,?,?)",
            (
                str(loc.vtpm_uuid),
                loc.kind,
                loc.path,
                str(loc.st_dev),
                str(loc.st_ino),
                loc.secret_check,
            ),
        )

    def location(self, vtpm_uuid: uuid.UUID) -> LocationRecord | None:
        with self._lock:
            row = (
                self._conn()
                .execute(
                    f"SELECT {_LOCATION_COLS} FROM vtpm_locations WHERE vtpm_uuid=?",
                    (str(vtpm_uuid),),
                )
                .fetchone()
            )
            return None if row is None else self._location(row)

    def location_at(self, path: str) -> LocationRecord | None:
        with self._lock:
            row = (
                self._conn()
                .execute(f"SELECT {_LOCATION_COLS} FROM vtpm_locations WHERE path=?", (path,))
                .fetchone()
            )
            return None if row is None else self._location(row)

    def locations(self) -> list[LocationRecord]:
        with self._lock:
            rows = self._conn().execute(
                f"SELECT {_LOCATION_COLS} FROM vtpm_locations ORDER BY path"
            )
            return [self._location(r) for r in rows.fetchall()]

    def set_secret_check(self, vtpm_uuid: uuid.UUID, check: bytes) -> None:
        with self._tx() as tx:
            tx.execute(
                "UPDATE vtpm_locations SET secret_check=? WHERE vtpm_uuid=?",
                (check, str(vtpm_uuid)),
            )

    # state digests (rollback protection) -----------------------------------------------------

    def state_digests(self, vtpm_uuid: uuid.UUID) -> list[StateDigest]:
        with self._lock:
            rows = self._conn().execute(
                "SELECT name, counter, digest FROM state_digests WHERE vtpm_uuid=? ORDER BY name",
                (str(vtpm_uuid),),
            )
            return [StateDigest(str(n), int(c), bytes(d)) for n, c, d in rows.fetchall()]

    def record_state(self, vtpm_uuid: uuid.UUID, name: str, counter: int, digest: bytes) -> None:
        with self._tx() as tx:
            tx.execute(
                "INSERT OR REPLACE INTO state_digests(vtpm_uuid, name, counter, digest) "
                "VALUES(?,?,?,?)",
                (str(vtpm_uuid), name, counter, digest),
            )

    def forget_state(self, vtpm_uuid: uuid.UUID, name: str) -> None:
        with self._tx() as tx:
            tx.execute(
                "DELETE FROM state_digests WHERE vtpm_uuid=? AND name=?", (str(vtpm_uuid), name)
            )

    # certificates the group CA issued (public: nothing here is secret) ---------------------

    def record_cert(self, vtpm_uuid: uuid.UUID, kind: str, ek_name: bytes, der: bytes) -> None:
        """Record (or replace) the vTPM's certificate of `kind`."""
        with self._tx() as tx:
            tx.execute(
                "INSERT OR REPLACE INTO vtpm_certs(vtpm_uuid, kind, ek_name, certificate) "
                "VALUES(?,?,?,?)",
                (str(vtpm_uuid), kind, ek_name, der),
            )

    def certs(self, vtpm_uuid: uuid.UUID) -> list[CertRecord]:
        """The vTPM's certificates, by kind."""
        with self._lock:
            rows = self._conn().execute(
                "SELECT kind, ek_name, certificate FROM vtpm_certs WHERE vtpm_uuid=? ORDER BY kind",
                (str(vtpm_uuid),),
            )
            return [CertRecord(str(k), bytes(n), bytes(c)) for k, n, c in rows.fetchall()]

    # audit ----------------------------------------------------------------------------------

    def audit(
        self, actor: str, action: str, target: str, outcome: str, detail: dict[str, object]
    ) -> None:
        with self._tx() as tx:
            tx.execute(
                "INSERT INTO audit(ts, actor, action, target, outcome, detail) VALUES(?,?,?,?,?,?)",
                (time.time(), actor, action, target, outcome, json.dumps(detail, sort_keys=True)),
            )
        if self.audit_listener is not None:
            self.audit_listener(action, outcome)

    def audit_log(self, limit: int = 100) -> list[AuditEntry]:
        with self._lock:
            rows = self._conn().execute(
                "SELECT id, ts, actor, action, target, outcome, detail FROM audit "
                "ORDER BY id DESC LIMIT ?",
                (limit,),
            )
            return [
                AuditEntry(int(i), float(t), str(a), str(ac), str(tg), str(o), str(d))
                for i, t, a, ac, tg, o, d in rows.fetchall()
            ][::-1]
