"""The Manager database's schema and its migrations, one per version, in one transaction.

v1: meta, groups, vTPMs, state digests, audit. v2: groups gain their attestation key. v3: a
vTPM's label is unique within the Manager (the same-user rule and the label in a deep quote
must name one vTPM), and groups gain `approval_nv`, the hardware-TPM NV index behind their
owner approvals (0: none). v4: groups gain their CA (key blobs, certificate, the AK's
certification of the key: `vtpm.manager.ca`), and `vtpm_certs` holds the certificates it issued
to each vTPM. v5: `vtpm_locations` holds where the front door's vTPMs
(`vtpm.manager.frontdoor`) keep their state (the orchestrator's path, its device and inode,
the check value of a secret), and vTPMs gain `accept_state` (the next start accepts on-disk
state the Manager does not record, once: `vtpm accept-state`). A migration that cannot be
applied (v3 on a database where two vTPMs share a label) refuses with a ManagerError naming
what is in the way, and the transaction leaves the database as it was.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path

from vtpm.errors import ManagerError

SCHEMA_VERSION = 5

_SCHEMA_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE groups (
    uuid TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    owner_pub BLOB NOT NULL,
    seq INTEGER NOT NULL,
    pcr_states TEXT NOT NULL,
    labels TEXT NOT NULL,
    sealed_public BLOB NOT NULL,
    sealed_private BLOB NOT NULL,
    sealed_root BLOB NOT NULL,
    approval BLOB NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE vtpms (
    uuid TEXT PRIMARY KEY,
    group_uuid TEXT NOT NULL REFERENCES groups(uuid),
    label TEXT NOT NULL,
    tpm TEXT NOT NULL,
    owner_uid INTEGER,
    owner_gid INTEGER,
    frontends TEXT NOT NULL,
    wrapped_key BLOB NOT NULL,
    wanted_running INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
CREATE TABLE state_digests (
    vtpm_uuid TEXT NOT NULL REFERENCES vtpms(uuid) ON DELETE CASCADE,
    name TEXT NOT NULL,
    counter INTEGER NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (vtpm_uuid, name)
);
CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    detail TEXT NOT NULL
);
"""

# v2: each group's attestation key; empty in groups made before it (one is made on first need)
_SCHEMA_V2 = """
ALTER TABLE groups ADD COLUMN ak_alg TEXT NOT NULL DEFAULT '';
ALTER TABLE groups ADD COLUMN ak_public BLOB NOT NULL DEFAULT x'';
ALTER TABLE groups ADD COLUMN ak_private BLOB NOT NULL DEFAULT x''
"""

# v3: one vTPM per label; the NV index of a group's revocable owner approvals
_SCHEMA_V3 = """
ALTER TABLE groups ADD COLUMN approval_nv INTEGER NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX vtpms_label ON vtpms(label)
"""

# v4: each group's CA in the hardware TPM (empty until made) and the certificates it issued
_SCHEMA_V4 = """
ALTER TABLE groups ADD COLUMN ca_public BLOB NOT NULL DEFAULT x'';
ALTER TABLE groups ADD COLUMN ca_private BLOB NOT NULL DEFAULT x'';
ALTER TABLE groups ADD COLUMN ca_cert BLOB NOT NULL DEFAULT x'';
ALTER TABLE groups ADD COLUMN ca_certify_attest BLOB NOT NULL DEFAULT x'';
ALTER TABLE groups ADD COLUMN ca_certify_signature BLOB NOT NULL DEFAULT x'';
CREATE TABLE vtpm_certs (
    vtpm_uuid TEXT NOT NULL REFERENCES vtpms(uuid) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    ek_name BLOB NOT NULL,
    certificate BLOB NOT NULL,
    PRIMARY KEY (vtpm_uuid, kind)
)
"""

# v5: the front door's state locations; a one-time acceptance of unrecorded state
_SCHEMA_V5 = """
ALTER TABLE vtpms ADD COLUMN accept_state INTEGER NOT NULL DEFAULT 0;
CREATE TABLE vtpm_locations (
    vtpm_uuid TEXT PRIMARY KEY REFERENCES vtpms(uuid) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    path TEXT NOT NULL UNIQUE,
    st_dev TEXT NOT NULL,
    st_ino TEXT NOT NULL,
    secret_check BLOB NOT NULL DEFAULT x''
)
"""

_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3, 4: _SCHEMA_V4, 5: _SCHEMA_V5}


def _no_shared_labels(tx: sqlite3.Connection, path: Path) -> None:
    rows = tx.execute(
        "SELECT label, group_concat(uuid, ', ') FROM vtpms GROUP BY label HAVING COUNT(*) > 1 "
        "ORDER BY label"
    ).fetchall()
    if rows:
        shared = "; ".join(f"label {label} is carried by {uuids}" for label, uuids in rows)
        raise ManagerError(
            f"cannot upgrade {path} to schema 3, where a label names one vTPM: {shared}; "
            f"delete all but one of each (vtpm del UUID, with the vtpm that made them)"
        )


# checks run before a version's statements, in its transaction
_PRECHECKS: dict[int, Callable[[sqlite3.Connection, Path], None]] = {3: _no_shared_labels}


def version(db: sqlite3.Connection) -> int:
    """The database's schema version; 0 for one with no schema at all."""
    has_meta = db.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'"
    ).fetchone()
    if not has_meta:
        return 0
    row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row[0]) if row else 0


def migrate(tx: sqlite3.Connection, path: Path) -> None:
    """Bring the database in `tx` (a transaction the caller commits) to SCHEMA_VERSION."""
    current = version(tx)
    if current > SCHEMA_VERSION:
        raise ManagerError(
            f"{path} has schema version {current}; this vtpm knows up to "
            f"{SCHEMA_VERSION}: upgrade vtpm"
        )
    for v in range(current + 1, SCHEMA_VERSION + 1):
        check = _PRECHECKS.get(v)
        if check is not None:
            check(tx, path)
        for stmt in filter(None, (s.strip() for s in _MIGRATIONS[v].split(";"))):
            tx.execute(stmt)
        tx.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('schema_version', ?)", (v,))
    if current == 0:
        tx.execute("INSERT INTO meta(key, value) VALUES('manager_uuid', ?)", (str(uuid.uuid4()),))
