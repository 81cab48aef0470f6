"""Deep quotes on the demo platform: a real Manager on its simulated hardware TPM, real vTPM
instances, asked on the host and from the guest's side, checked by `vtpm verify`."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import instance, raw_call, tpm2
from tests.mgr import (
    GUEST1,
    GUEST2,
    ManagerProc,
    admin_call,
    manager,
    new_group,
    new_vtpm,
    owner_key,
)
from vtpm.instance import vendor
from vtpm.wire.evidence import Evidence

pytestmark = pytest.mark.integration


def verify(m: ManagerProc, *args: str) -> tuple[int, dict[str, Any]]:
    res = m.cli("verify", *args, "--json", check=False)
    return res.returncode, json.loads(res.stdout)


def failed_ids(verdict: dict[str, Any]) -> set[str]:
    return {c["id"] for c in verdict["checks"] if not c["ok"]}


@pytest.fixture
def platform(tmp_path: Path) -> Any:
    with manager(tmp_path / "data") as m:
        key = owner_key(tmp_path)
        new_group(m, "guests", key)
        v1, p1 = new_vtpm(m, "guests", GUEST1)
        v2, p2 = new_vtpm(m, "guests", GUEST2)
        for port in (p1, p2):
            tpm2("startup", "-c", tcti=f"swtpm:host=127.0.0.1,port={port}")
        tpm2("pcrextend", f"16:sha256={'5a' * 32}", tcti=f"swtpm:host=127.0.0.1,port={p1}")
        bundle = tmp_path / "bundle.json"
        m.cli("group", "provision", "guests", "-o", str(bundle))
        yield m, (v1, p1), (v2, p2), bundle


def test_host_and_guest_deep_quotes_verify(tmp_path: Path, platform: Any) -> None:
    m, (v1, p1), _g2, bundle = platform
    host = tmp_path / "host.json"
    m.cli("quote", "--deep", v1["uuid"], "--nonce", "00112233", "-o", str(host))
    guest = tmp_path / "guest.json"
    m.cli(
        "guest-quote", "--tcti", f"swtpm:host=127.0.0.1,port={p1}",
        "--nonce", "a1b2c3d4e5", "-o", str(guest),
    )  # fmt: skip
    extended = hashlib.sha256(bytes(32) + bytes.fromhex("5a" * 32)).digest()
    for path, nonce in ((host, "00112233"), (guest, "a1b2c3d4e5")):
        ev = Evidence.from_json(json.loads(path.read_text()))
        assert str(ev.info.vtpm_uuid) == v1["uuid"] and ev.info.label == GUEST1
        assert ev.info.pcr_dict()[16] == extended  # the vTPM's own PCR, as the guest set it
        rc, verdict = verify(m, "--bundle", str(bundle), "--evidence", str(path), "--nonce", nonce)
        assert rc == 0 and verdict["ok"] is True, verdict
        ids = {c["id"] for c in verdict["checks"]}
        assert {"quote.signature", "quote.pcr_selection", "deep.merkle", "deep.nonce"} <= ids

    rc, verdict = verify(m, "--bundle", str(bundle), "--evidence", str(host), "--nonce", "ff")
    assert rc == 1 and "deep.nonce" in failed_ids(verdict)


def test_another_vtpms_quote_is_refused(tmp_path: Path, platform: Any) -> None:
    m, (v1, _p1), (v2, _p2), bundle = platform
    ev = tmp_path / "g1.json"
    m.cli("quote", "--deep", v1["uuid"], "--nonce", "0102", "-o", str(ev))
    policy = tmp_path / "expect-guest2.json"
    policy.write_text(
        json.dumps({"format": "vtpm-verify-policy/1", "vtpm_uuid": v2["uuid"], "label": GUEST2})
    )
    rc, verdict = verify(
        m, "--bundle", str(bundle), "--evidence", str(ev), "--nonce", "0102",
        "--policy", str(policy),
    )  # fmt: skip
    assert rc == 1
    assert {"deep.uuid", "deep.label_expected"} <= failed_ids(verdict), verdict

    doc = json.loads(ev.read_text())
    doc["info"] = doc["info"][:-2] + ("00" if doc["info"][-2:] != "00" else "01")
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(doc))
    rc, verdict = verify(m, "--bundle", str(bundle), "--evidence", str(tampered), "--nonce", "0102")
    assert rc == 1 and "deep.merkle" in failed_ids(verdict)


def test_concurrent_deep_quotes_share_hardware_quotes(tmp_path: Path, platform: Any) -> None:
    m, (v1, _p1), (v2, _p2), bundle = platform
    results: list[Any] = []
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            u = (v1, v2)[i % 2]["uuid"]
            results.append(
                (i, admin_call(m.data_dir, "quote.deep", uuid=u, nonce=struct.pack(">I", i).hex()))
            )
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 24
    attests = {r["host"]["attest"] for _i, r in results}
    assert len(attests) < 24  # requests were batched into fewer hardware quotes
    assert max(r["batch_size"] for _i, r in results) > 1
    for i, r in results[:6]:
        path = tmp_path / f"ev{i}.json"
        path.write_text(json.dumps(r))
        rc, verdict = verify(
            m, "--bundle", str(bundle), "--evidence", str(path), "--nonce",
            struct.pack(">I", i).hex(),
        )  # fmt: skip
        assert rc == 0, verdict


def test_deep_quote_command_needs_a_manager(tmp_path: Path) -> None:
    with instance(tmp_path / "lone", tmp_path / "lone.key", mssim=False) as inst:
        assert inst.port is not None
        with socket.create_connection(("127.0.0.1", inst.port)) as s:
            raw_call(s, bytes.fromhex("80010000000c000001440000"))
            resp = raw_call(s, vendor.command(b"\x01\x02", [], [0]))
        assert struct.unpack_from(">I", resp, 6)[0] == 0x143  # TPM_RC_COMMAND_CODE
