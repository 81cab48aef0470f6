"""The Manager's choice of the EK a deep quote binds (`vtpm.manager.quotes.certified_ek_name`),
on a real SQLite store. Needs `Store.record_cert` (branch `ca`): skipped until it is merged, then
run by the lead: the RSA EK is preferred, else the first EK kind; platform certificates never."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from vtpm.manager.quotes import certified_ek_name
from vtpm.manager.store import GroupRecord, Store, VtpmRecord


def test_rsa_ek_preferred_else_first_ek(tmp_path: Path) -> None:
    store = Store(tmp_path / "m.db")
    store.open()
    if not hasattr(store, "record_cert"):
        pytest.skip("Store.record_cert arrives with branch ca")
    g = GroupRecord(uuid.uuid4(), "g", b"", 1, (), ("a_u:b_r:c_t",), b"", b"", b"", b"")
    store.add_group(g)
    v = VtpmRecord(uuid.uuid4(), g.uuid, "a_u:b_r:c_t", "2.0", None, None, ())
    store.add_vtpm(v)
    assert certified_ek_name(store, v.uuid) == b""
    store.record_cert(v.uuid, "platform", b"\x00\x0bP" + bytes(31), b"cert")
    assert certified_ek_name(store, v.uuid) == b""
    store.record_cert(v.uuid, "ek-ecc256", b"\x00\x0bE" + bytes(31), b"cert")
    assert certified_ek_name(store, v.uuid) == b"\x00\x0bE" + bytes(31)
    store.record_cert(v.uuid, "ek-rsa2048", b"\x00\x0bR" + bytes(31), b"cert")
    assert certified_ek_name(store, v.uuid) == b"\x00\x0bR" + bytes(31)
