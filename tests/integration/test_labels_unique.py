"""A label names one vTPM of a Manager (issue 11, finding 7): the same-user rule and the label
in a deep quote identify the vTPM only if no other carries it. A second `vtpm new` with a
label in use is refused (and audited), also when many race for it; a deleted vTPM frees its
label."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tests.mgr import GUEST1, GUEST2, admin_call, manager, new_group, owner_key
from vtpm.errors import VtpmError

pytestmark = pytest.mark.integration


def test_a_label_in_use_is_refused_and_freed_by_delete(tmp_path: Path) -> None:
    with manager(tmp_path / "data") as m:
        new_group(m, "guests", owner_key(tmp_path))
        first = m.json("new", "--group", "guests", "--label", GUEST1)
        res = m.cli("new", "--group", "guests", "--label", GUEST1, check=False)
        assert res.returncode == 1 and res.stderr.count("\n") == 1
        assert f"label {GUEST1} is already carried by vTPM {first['uuid']}" in res.stderr
        assert [v["uuid"] for v in m.json("list")] == [first["uuid"]]
        refused = [e for e in m.json("audit") if e["outcome"] == "refused"]
        assert refused[-1]["action"] == "vtpm.new"
        m.json("new", "--group", "guests", "--label", GUEST2)  # another label is fine
        m.cli("del", first["uuid"])
        again = m.json("new", "--group", "guests", "--label", GUEST1)
        assert again["label"] == GUEST1


def test_concurrent_creates_of_one_label_make_one_vtpm(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with manager(data) as m:
        new_group(m, "guests", owner_key(tmp_path))
        results: list[Any] = []
        errors: list[str] = []
        go = threading.Barrier(8)

        def create() -> None:
            go.wait()
            try:
                results.append(admin_call(data, "vtpm.new", group="guests", label=GUEST1))
            except VtpmError as e:
                errors.append(str(e))

        threads = [threading.Thread(target=create) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 1 and len(errors) == 7, (results, errors)
        assert all("is already carried by vTPM" in e for e in errors)
        assert len(m.json("list")) == 1
