"""The verifier against real quotes: attestation keys and quotes made by a real swtpm through
tpm2-pytss (and tpm2-tools for the CLI), deep-quote evidence built from real DeepQuoteInfo
records, a Merkle tree and a real hardware quote. A good quote passes every check; each tampered
case fails with exactly the check meant to catch it."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from vtpm.errors import ConfigError, VerifyError
from vtpm.manager.simulator import Simulator
from vtpm.tpm.attest import parse_attest
from vtpm.tpm.public import parse_public
from vtpm.verify.bundle import make_credential, verify_bundle
from vtpm.verify.deepquote import verify_deep_quote
from vtpm.verify.expected import Expected
from vtpm.verify.quote import clock_problem, verify_quote
from vtpm.verify.verdict import Verdict
from vtpm.wire.deepquote import PathStep
from vtpm.wire.evidence import Bundle, Evidence

pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is a dev dependency of the project")
from tpm2_pytss import ESYS_TR, TSS2_Exception

from tests.tpm_ca import TpmTestCa, ecc_ek_template, identity
from tests.tpm_quotes import (
    TOOLS,
    Key,
    QuoteTpm,
    certificate_for,
    make_bundle,
    make_evidence,
    make_group,
    tpm2_tools_quotes,
    vtpm_info,
)

pytestmark = pytest.mark.integration

os.environ.setdefault("TSS2_LOG", "all+NONE")

HOST_PCRS = (0, 16)
NONCE = bytes.fromhex("a1b2c3d4e5f60718")
QUOTE_IDS = {
    "quote.signature", "quote.ak", "quote.magic", "quote.type", "quote.signer", "quote.nonce",
    "quote.pcr_selection", "quote.pcr_digest",
}  # fmt: skip
GUEST1 = "guest1_u:vm_r:vtpm_t"
GUEST2 = "guest2_u:vm_r:vtpm_t"
VTPM_PCRS_1 = {4: b"\x41" * 32, 5: b"\x51" * 32, 10: b"\x61" * 32}
VTPM_PCRS_2 = {4: b"\x42" * 32, 5: b"\x52" * 32}
VTPM = [sys.executable, "-m", "vtpm.cli.main", "verify"]


@dataclasses.dataclass
class Rig:
    tpm: QuoteTpm
    ecc: Key
    rsa: Key
    ek_public: bytes

    @contextlib.contextmanager
    def temp(self, make: Callable[[], Key]) -> Iterator[Key]:
        """A key in the one transient slot swtpm has left, flushed afterwards."""
        key = make()
        try:
            yield key
        finally:
            self.tpm.flush(key)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    sim = Simulator(tmp_path_factory.mktemp("hwtpm"))
    tcti = sim.start()
    tpm = QuoteTpm(tcti)
    try:
        tpm.extend(16, b"host boot measurement")
        ek = tpm.ek()
        ek_public = ek.public
        tpm.flush(ek)
        yield Rig(tpm, tpm.ecc_ak(), tpm.rsa_ak(), ek_public)
    finally:
        tpm.close()
        sim.stop()


def ak_of(rig: Rig, alg: str) -> Key:
    return rig.ecc if alg == "ecc" else rig.rsa


def check(
    attest: bytes,
    sig: bytes,
    ak: Key,
    pcrs: dict[int, bytes],
    nonce: bytes = NONCE,
    qualified_name: bytes | None = None,
    previous: bytes | None = None,
) -> Verdict:
    return verify_quote(
        attest, sig, parse_public(ak.public), pcrs, nonce=nonce,
        qualified_name=ak.qualified_name if qualified_name is None else qualified_name,
        previous=previous,
    )  # fmt: skip


# plain quotes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ecc", "rsa"])
def test_good_quote_passes_every_check(rig: Rig, alg: str) -> None:
    ak = ak_of(rig, alg)
    first, _ = rig.tpm.quote(ak, HOST_PCRS, b"earlier")
    attest, sig = rig.tpm.quote(ak, HOST_PCRS, NONCE)
    v = check(attest, sig, ak, rig.tpm.pcrs(HOST_PCRS), previous=first)
    assert v.ok, v.failed()
    assert {c.id for c in v.checks} == QUOTE_IDS | {"quote.clock"}
    # without the qualified name, a primary key's is still recognised
    v = verify_quote(attest, sig, parse_public(ak.public), rig.tpm.pcrs(HOST_PCRS))
    assert v.ok, v.failed()


def test_wrong_nonce(rig: Rig) -> None:
    attest, sig = rig.tpm.quote(rig.ecc, HOST_PCRS, b"an old nonce")
    v = check(attest, sig, rig.ecc, rig.tpm.pcrs(HOST_PCRS))
    assert v.failed_ids() == {"quote.nonce"}
    assert "616e206f6c64206e6f6e6365" in v.failed()[0].reason


def test_spliced_signature_of_another_ak(rig: Rig) -> None:
    attest, _ = rig.tpm.quote(rig.ecc, HOST_PCRS, NONCE)
    with rig.temp(lambda: rig.tpm.ecc_ak(unique=b"another ak")) as other:
        _, other_sig = rig.tpm.quote(other, HOST_PCRS, NONCE)
    v = check(attest, other_sig, rig.ecc, rig.tpm.pcrs(HOST_PCRS))
    assert v.failed_ids() == {"quote.signature"}
    _, rsa_sig = rig.tpm.quote(rig.rsa, HOST_PCRS, NONCE)
    assert check(attest, rsa_sig, rig.ecc, rig.tpm.pcrs(HOST_PCRS)).failed_ids() == {
        "quote.signature"
    }


def test_quote_of_pcr23_presented_as_pcr10(rig: Rig) -> None:
    rig.tpm.extend(23, b"something else")
    attest, sig = rig.tpm.quote(rig.ecc, [23], NONCE)
    value = rig.tpm.pcrs([23])[23]
    v = check(attest, sig, rig.ecc, {10: value})
    assert v.failed_ids() == {"quote.pcr_selection"}  # the digest alone would have passed
    assert "sha256:23" in v.failed()[0].reason and "sha256:10" in v.failed()[0].reason
    # a supplied PCR the quote did not sign, or a signed one left out, fails the same way
    attest, sig = rig.tpm.quote(rig.ecc, HOST_PCRS, NONCE)
    pcrs = rig.tpm.pcrs(HOST_PCRS)
    assert check(attest, sig, rig.ecc, {0: pcrs[0]}).failed_ids() >= {"quote.pcr_selection"}


def test_one_pcr_value_changed(rig: Rig) -> None:
    attest, sig = rig.tpm.quote(rig.rsa, HOST_PCRS, NONCE)
    pcrs = rig.tpm.pcrs(HOST_PCRS)
    pcrs[16] = bytes(32)
    v = check(attest, sig, rig.rsa, pcrs)
    assert v.failed_ids() == {"quote.pcr_digest"}


def test_wrong_magic_signed_by_the_restricted_ak(rig: Rig) -> None:
    """A restricted key signs outside data only through TPM2_Hash's ticket, which the TPM gives
    for data that does not start with TPM_GENERATED_VALUE: such a blob verifies, and only the
    magic check stops it being taken for a quote."""
    attest, _ = rig.tpm.quote(rig.ecc, HOST_PCRS, NONCE)
    forged = b"\xff\x54\x43\x00" + attest[4:]
    sig = rig.tpm.sign_message(rig.ecc, forged)
    v = check(forged, sig, rig.ecc, rig.tpm.pcrs(HOST_PCRS))
    assert v.failed_ids() == {"quote.magic"}
    # with the right magic the TPM refuses the ticket, so a restricted AK cannot forge a type
    wrong_type = attest[:4] + b"\x80\x17" + attest[6:]
    with pytest.raises(TSS2_Exception):
        rig.tpm.sign_message(rig.ecc, wrong_type)


def test_wrong_type_a_certify_presented_as_quote(rig: Rig) -> None:
    attest, sig = rig.tpm.certify(rig.rsa, rig.ecc, NONCE)
    v = check(attest, sig, rig.ecc, rig.tpm.pcrs(HOST_PCRS))
    # a real attestation of another type has no PCR selection or digest to compare either
    assert v.failed_ids() == {"quote.type", "quote.pcr_selection", "quote.pcr_digest"}
    assert "TPM_ST_ATTEST_CERTIFY" in next(c.reason for c in v.failed() if c.id == "quote.type")


def test_wrong_type_signed_by_an_unrestricted_key(rig: Rig) -> None:
    with rig.temp(rig.tpm.unrestricted_ecc) as key:
        attest, sig = rig.tpm.quote(key, HOST_PCRS, NONCE)
        assert check(attest, sig, key, rig.tpm.pcrs(HOST_PCRS)).failed_ids() == {"quote.ak"}
        forged = attest[:4] + b"\x80\x19" + attest[6:]
        forged_sig = rig.tpm.sign_message(key, forged)
    v = check(forged, forged_sig, key, rig.tpm.pcrs(HOST_PCRS))
    assert v.failed_ids() == {"quote.type", "quote.ak"}


def test_wrong_signer(rig: Rig) -> None:
    attest, sig = rig.tpm.quote(rig.ecc, HOST_PCRS, NONCE)
    v = check(attest, sig, rig.ecc, rig.tpm.pcrs(HOST_PCRS), qualified_name=rig.rsa.qualified_name)
    assert v.failed_ids() == {"quote.signer"}


def test_replay_of_an_older_quote(rig: Rig) -> None:
    old, old_sig = rig.tpm.quote(rig.ecc, HOST_PCRS, NONCE)
    new, _ = rig.tpm.quote(rig.ecc, HOST_PCRS, b"later")
    while parse_attest(new).clock_info.clock == parse_attest(old).clock_info.clock:
        time.sleep(0.001)  # the same millisecond is no order: wait for the clock to move
        new, _ = rig.tpm.quote(rig.ecc, HOST_PCRS, b"later")
    v = check(old, old_sig, rig.ecc, rig.tpm.pcrs(HOST_PCRS), previous=new)
    assert v.failed_ids() == {"quote.clock"}
    assert "replay" in v.failed()[0].reason
    # the same quote twice: the clock did not move
    assert check(old, old_sig, rig.ecc, rig.tpm.pcrs(HOST_PCRS), previous=old).failed_ids() == {
        "quote.clock"
    }
    # clocks of two different AKs are not compared
    rsa_quote, _ = rig.tpm.quote(rig.rsa, HOST_PCRS, b"rsa")
    v = check(old, old_sig, rig.ecc, rig.tpm.pcrs(HOST_PCRS), previous=rsa_quote)
    assert v.failed_ids() == {"quote.clock"}
    assert "another signer" in v.failed()[0].reason


def test_two_quotes_in_one_millisecond_are_not_a_replay(rig: Rig) -> None:
    """The TPM clock counts milliseconds: two quotes taken within one have the same clock, and
    the later one is not a replay of the earlier (its nonce differs). Whether two real quotes
    land in one millisecond depends on the machine, so the later quote's clock is set to the
    earlier one's (the clock rule reads only the parsed fields, not the signature)."""
    first, _ = rig.tpm.quote(rig.ecc, HOST_PCRS, b"first")
    attest, _ = rig.tpm.quote(rig.ecc, HOST_PCRS, NONCE)
    earlier = parse_attest(first)
    same_ms = dataclasses.replace(parse_attest(attest), clock_info=earlier.clock_info)
    assert clock_problem(same_ms, earlier) == ""
    assert "earlier quote itself" in clock_problem(earlier, earlier)
    back = dataclasses.replace(earlier.clock_info, clock=earlier.clock_info.clock - 1)
    older = dataclasses.replace(same_ms, clock_info=back)
    assert "before the earlier quote" in clock_problem(older, earlier)


def test_a_reset_moves_reset_count_forward(tmp_path: Path) -> None:
    """Across a TPM reset: accepted forward, refused backward, also for an owner-hierarchy AK
    whose resetCount the TPM obfuscates."""
    sim = Simulator(tmp_path / "hw")
    quotes: list[tuple[bytes, bytes, dict[int, bytes]]] = []
    key: Key | None = None
    for _boot in range(2):
        tpm = QuoteTpm(sim.start())
        try:
            key = tpm.ecc_ak(ESYS_TR.OWNER)
            attest, sig = tpm.quote(key, HOST_PCRS, NONCE)
            quotes.append((attest, sig, tpm.pcrs(HOST_PCRS)))
        finally:
            tpm.close()
            sim.stop()
    assert key is not None
    (a0, s0, p0), (a1, s1, p1) = quotes
    assert check(a1, s1, key, p1, previous=a0).ok
    assert check(a0, s0, key, p0, previous=a1).failed_ids() == {"quote.clock"}


def test_malformed_quote_is_a_verify_error(rig: Rig) -> None:
    attest, sig = rig.tpm.quote(rig.ecc, HOST_PCRS, NONCE)
    with pytest.raises(VerifyError, match="TPMS_ATTEST"):
        check(attest[:-3], sig, rig.ecc, rig.tpm.pcrs(HOST_PCRS))
    with pytest.raises(VerifyError, match="TPMT_SIGNATURE"):
        check(attest, sig + b"\x00", rig.ecc, rig.tpm.pcrs(HOST_PCRS))


# deep quotes -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Deep:
    bundle: Bundle
    evidence: list[Evidence]
    host_values: dict[int, bytes]
    guest_uuids: list[uuid.UUID]


def build_deep(rig: Rig, ak: Key, labels: tuple[str, ...] = ("*:vm_r:vtpm_t",)) -> Deep:
    host_values = rig.tpm.pcrs(HOST_PCRS)
    group = make_group("tenants", labels, host_values)
    bundle = make_bundle(rig.tpm, ak, rig.ek_public, group, HOST_PCRS)
    uuids = [uuid.uuid4() for _ in range(3)]
    infos = [
        vtpm_info(NONCE, uuids[0], group, GUEST1, VTPM_PCRS_1),
        vtpm_info(b"nonce of guest 2", uuids[1], group, GUEST2, VTPM_PCRS_2),
        vtpm_info(b"nonce of guest 3", uuids[2], group, GUEST2, {0: bytes(32)}),
    ]
    return Deep(bundle, make_evidence(rig.tpm, ak, infos, HOST_PCRS), host_values, uuids)


@pytest.fixture(scope="module")
def deep(rig: Rig) -> Deep:
    return build_deep(rig, rig.ecc)


def expected_guest1(deep: Deep, **changes: Any) -> Expected:
    fields: dict[str, Any] = {
        "vtpm_uuid": deep.guest_uuids[0],
        "group": "tenants",
        "label": GUEST1,
        "vtpm_pcrs": {"sha256": VTPM_PCRS_1},
        "host_pcrs": {"sha256": deep.host_values},
    }
    fields.update(changes)
    return Expected(**fields)


DEEP_IDS = {
    "deep.merkle", "deep.nonce", "deep.group", "deep.label", "deep.host_state", "deep.uuid",
    "deep.group_expected", "deep.label_expected", "deep.vtpm_pcrs", "deep.host_pcrs",
}  # fmt: skip


def test_deep_quote_good(deep: Deep) -> None:
    ev = deep.evidence[0]
    v = verify_deep_quote(ev, deep.bundle, nonce=NONCE, expected=expected_guest1(deep))
    assert v.ok, v.failed()
    assert {c.id for c in v.checks} == (QUOTE_IDS - {"quote.nonce"}) | DEEP_IDS
    # every record of the batch verifies against the one hardware quote
    nonces = [NONCE, b"nonce of guest 2", b"nonce of guest 3"]
    for ev, nonce in zip(deep.evidence, nonces, strict=True):
        assert verify_deep_quote(ev, deep.bundle, nonce=nonce).ok
    # and through the JSON documents
    again = Evidence.from_json(json.loads(json.dumps(deep.evidence[1].to_json())))
    bundle = Bundle.from_json(json.loads(json.dumps(deep.bundle.to_json())))
    assert verify_deep_quote(again, bundle, nonce=nonces[1]).ok


def test_deep_quote_rsa_ak(rig: Rig) -> None:
    d = build_deep(rig, rig.rsa)
    v = verify_deep_quote(d.evidence[2], d.bundle, nonce=b"nonce of guest 3")
    assert v.ok, v.failed()
    assert verify_bundle(d.bundle).ok


def test_deep_merkle_path_node_changed(deep: Deep) -> None:
    ev = deep.evidence[0]
    step = ev.path[0]
    bad = PathStep(step.side, bytes([step.sibling[0] ^ 1]) + step.sibling[1:])
    tampered = dataclasses.replace(ev, path=(bad, *ev.path[1:]))
    v = verify_deep_quote(tampered, deep.bundle, nonce=NONCE, expected=expected_guest1(deep))
    assert v.failed_ids() == {"deep.merkle"}
    swapped = dataclasses.replace(ev, path=(PathStep("L", step.sibling), *ev.path[1:]))
    assert verify_deep_quote(swapped, deep.bundle, nonce=NONCE).failed_ids() == {"deep.merkle"}


def test_deep_guest1_presented_as_guest2(deep: Deep) -> None:
    expected = expected_guest1(deep, vtpm_uuid=deep.guest_uuids[1], label=GUEST2)
    v = verify_deep_quote(deep.evidence[0], deep.bundle, nonce=NONCE, expected=expected)
    assert v.failed_ids() == {"deep.uuid", "deep.label_expected"}


def test_deep_vtpm_pcr_changed_in_the_info(deep: Deep) -> None:
    ev = deep.evidence[0]
    changed = dict(VTPM_PCRS_1)
    changed[10] = b"\x00" * 32
    info = dataclasses.replace(ev.info, pcrs=tuple(sorted(changed.items())))
    tampered = dataclasses.replace(ev, info=info)
    v = verify_deep_quote(tampered, deep.bundle, nonce=NONCE)
    assert v.failed_ids() == {"deep.merkle"}
    # a policy that expects the real values also names the PCR
    v = verify_deep_quote(tampered, deep.bundle, nonce=NONCE, expected=expected_guest1(deep))
    assert v.failed_ids() == {"deep.merkle", "deep.vtpm_pcrs"}
    assert "PCR 10" in next(c.reason for c in v.failed() if c.id == "deep.vtpm_pcrs")


def test_deep_wrong_verifier_nonce(deep: Deep) -> None:
    v = verify_deep_quote(deep.evidence[0], deep.bundle, nonce=b"another nonce")
    assert v.failed_ids() == {"deep.nonce"}


def test_deep_another_group_and_label_rules(rig: Rig, deep: Deep) -> None:
    other = make_group("others", ["*:vm_r:vtpm_t"], deep.host_values)
    other_bundle = make_bundle(rig.tpm, rig.ecc, rig.ek_public, other, HOST_PCRS)
    assert verify_bundle(other_bundle).ok
    v = verify_deep_quote(deep.evidence[0], other_bundle, nonce=NONCE)
    assert v.failed_ids() == {"deep.group"}
    # the same group permitting other labels: deep.label; such an edited bundle is caught by
    # its configuration quote
    group = {**deep.bundle.group, "labels": ["*:other_r:vtpm_t", GUEST2]}
    edited = dataclasses.replace(deep.bundle, group=group)
    v = verify_deep_quote(deep.evidence[0], edited, nonce=NONCE)
    assert v.failed_ids() == {"deep.label"}
    assert verify_bundle(edited).failed_ids() == {"bundle.config_quote"}
    # exact labels are permitted without the wildcard
    exact = dataclasses.replace(deep.bundle, group={**deep.bundle.group, "labels": [GUEST1]})
    assert verify_deep_quote(deep.evidence[0], exact, nonce=NONCE).ok
    assert verify_deep_quote(deep.evidence[1], exact, nonce=b"nonce of guest 2").failed_ids() == {
        "deep.label"
    }


def test_deep_host_state_moved(rig: Rig) -> None:
    d = build_deep(rig, rig.ecc)
    rig.tpm.extend(16, b"an unexpected kernel")
    host_values = rig.tpm.pcrs(HOST_PCRS)
    infos = [vtpm_info(NONCE, d.guest_uuids[0], d.bundle.group, GUEST1, VTPM_PCRS_1)]
    (ev,) = make_evidence(rig.tpm, rig.ecc, infos, HOST_PCRS)
    v = verify_deep_quote(ev, d.bundle, nonce=NONCE)
    assert v.failed_ids() == {"deep.host_state"}
    assert "PCR 16" in v.failed()[0].reason
    expected = Expected(host_pcrs={"sha256": d.host_values})
    v = verify_deep_quote(ev, d.bundle, nonce=NONCE, expected=expected)
    assert v.failed_ids() == {"deep.host_state", "deep.host_pcrs"}
    # a group that permits the new state too
    states = [*d.bundle.group["pcr_states"], {"pcrs": list(HOST_PCRS), "values": [
        host_values[i].hex() for i in HOST_PCRS]}]  # fmt: skip
    both = dataclasses.replace(d.bundle, group={**d.bundle.group, "pcr_states": states})
    assert verify_deep_quote(ev, both, nonce=NONCE).ok


def test_deep_replay_against_a_newer_previous(rig: Rig, deep: Deep) -> None:
    time.sleep(0.002)  # the TPM clock counts milliseconds: make "newer" a later one
    newer = build_deep(rig, rig.ecc)
    fresh = newer.evidence[0]
    v = verify_deep_quote(fresh, newer.bundle, nonce=NONCE, previous=deep.evidence[0])
    assert v.ok, v.failed()
    v = verify_deep_quote(deep.evidence[0], deep.bundle, nonce=NONCE, previous=fresh)
    assert v.failed_ids() == {"quote.clock"}


def test_deep_quote_by_another_ak(rig: Rig, deep: Deep) -> None:
    rsa_bundle = build_deep(rig, rig.rsa).bundle
    v = verify_deep_quote(deep.evidence[0], rsa_bundle, nonce=NONCE)
    assert {"quote.signature", "quote.signer"} <= v.failed_ids()


# bundles and credential activation --------------------------------------------------------------


def test_bundle_checks(rig: Rig, deep: Deep) -> None:
    v = verify_bundle(deep.bundle)
    assert v.ok, v.failed()
    assert [c.id for c in v.checks] == ["bundle.ak", "bundle.config_quote"]
    wrong_name = dataclasses.replace(deep.bundle, ak_name=rig.rsa.name)
    assert verify_bundle(wrong_name).failed_ids() == {"bundle.ak"}
    wrong_qn = dataclasses.replace(deep.bundle, ak_qualified_name=rig.rsa.qualified_name)
    v = verify_bundle(wrong_qn)
    assert v.failed_ids() == {"bundle.config_quote"}
    assert "quote.signer" in v.failed()[0].reason
    with rig.temp(rig.tpm.unrestricted_ecc) as key:
        weak = make_bundle(rig.tpm, key, rig.ek_public, deep.bundle.group, HOST_PCRS)
    assert verify_bundle(weak).failed_ids() == {"bundle.ak"}
    with pytest.raises(VerifyError, match="bundle group uuid"):
        verify_bundle(dataclasses.replace(deep.bundle, group={**deep.bundle.group, "uuid": "x"}))


def test_bundle_ekcertificate_for(rig: Rig, deep: Deep) -> None:
    ek_key = parse_public(rig.ek_public).key
    good = dataclasses.replace(deep.bundle, ek_certificate=certificate_for(ek_key))
    v = verify_bundle(good)
    assert v.ok and "bundle.ek" in {c.id for c in v.checks}
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    bad = dataclasses.replace(deep.bundle, ek_certificate=certificate_for(other))
    assert verify_bundle(bad).failed_ids() == {"bundle.ek"}
    junk = dataclasses.replace(deep.bundle, ek_certificate=b"not DER")
    assert verify_bundle(junk).failed_ids() == {"bundle.ek"}


@pytest.mark.parametrize("alg", ["ecc", "rsa"])
def test_make_credential_round_trip(rig: Rig, alg: str) -> None:
    ak = ak_of(rig, alg)
    secret = os.urandom(32)
    blob, encrypted = make_credential(rig.ek_public, ak.name, secret)
    other = rig.rsa if alg == "ecc" else rig.ecc
    with rig.temp(rig.tpm.ek) as ek:
        assert ek.public == rig.ek_public
        assert rig.tpm.activate(ak, ek, blob, encrypted) == secret
        # the credential names one AK: with another loaded key, the TPM refuses
        with pytest.raises(TSS2_Exception):
            rig.tpm.activate(other, ek, blob, encrypted)
    with pytest.raises(VerifyError, match="not an RSA key"):
        make_credential(rig.ecc.public, ak.name, secret)
    with pytest.raises(VerifyError, match="not AES-CFB"):
        make_credential(rig.rsa.public, ak.name, secret)
    with pytest.raises(ConfigError, match=r"1\.\.32 bytes"):
        make_credential(rig.ek_public, ak.name, bytes(33))


# the CLI ---------------------------------------------------------------------------------------


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VTPM, *map(str, args)], capture_output=True, text=True, timeout=60, check=False
    )


def write_json(path: Path, obj: object) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_cli_deep_quote(tmp_path: Path, deep: Deep) -> None:
    bundle = write_json(tmp_path / "bundle.json", deep.bundle.to_json())
    evidence = write_json(tmp_path / "evidence.json", deep.evidence[0].to_json())
    policy = write_json(
        tmp_path / "policy.json",
        {
            "format": "vtpm-verify-policy/1",
            "vtpm_uuid": str(deep.guest_uuids[0]),
            "label": GUEST1,
            "vtpm_pcrs": {"sha256": {str(k): v.hex() for k, v in VTPM_PCRS_1.items()}},
            "event_log": {"ignored": "by the verifier itself"},
        },
    )
    args: list[str | Path] = ["--bundle", bundle, "--evidence", evidence, "--policy", policy]
    r = run_cli(*args, "--nonce", NONCE.hex())
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[-1] == f"verdict: PASS ({len(lines) - 1} checks)"
    assert all(line.startswith("PASS ") for line in lines[:-1])
    assert any(line.startswith("PASS deep.merkle: ") for line in lines)
    assert any(line.startswith("PASS bundle.config_quote: ") for line in lines)

    r = run_cli(*args, "--nonce", "00" * 8, "--json")
    assert r.returncode == 1
    out = json.loads(r.stdout)
    assert out["ok"] is False
    assert [c["id"] for c in out["checks"] if not c["ok"]] == ["deep.nonce"]

    r = run_cli("--bundle", bundle)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "verdict: PASS (2 checks)"


def test_cli_input_errors(tmp_path: Path, deep: Deep) -> None:
    bundle = write_json(tmp_path / "bundle.json", deep.bundle.to_json())
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"format": "vtpm-deep-quote/1", "info": "00"}')
    r = run_cli("--bundle", bundle, "--evidence", garbage, "--nonce", "00")
    assert r.returncode == 1
    assert r.stderr.startswith("vtpm: error: evidence ") and len(r.stderr.splitlines()) == 1
    r = run_cli("--bundle", bundle, "--evidence", tmp_path / "missing.json", "--nonce", "00")
    assert r.returncode == 1 and "cannot read evidence" in r.stderr
    r = run_cli("--evidence", garbage)
    assert r.returncode == 1 and "needs --bundle and --nonce" in r.stderr
    r = run_cli()
    assert r.returncode == 1 and "give --bundle" in r.stderr


def test_cli_event_log_hook(tmp_path: Path, deep: Deep) -> None:
    bundle = write_json(tmp_path / "bundle.json", deep.bundle.to_json())
    evidence = write_json(tmp_path / "evidence.json", deep.evidence[0].to_json())
    log = tmp_path / "log.bin"
    log.write_bytes(b"\x00" * 32)  # not an event log
    r = run_cli(
        "--bundle", bundle, "--evidence", evidence, "--nonce", NONCE.hex(), "--event-log", log
    )
    assert r.returncode == 1
    if importlib.util.find_spec("vtpm.verify.eventlog") is None:
        assert "event-log replay is not available" in r.stderr
    else:  # the replay ran after the deep-quote checks, and refused the log
        lines = r.stdout.splitlines()
        assert any(ln.startswith("FAIL eventlog.") for ln in lines), r.stdout + r.stderr
        assert all(ln.startswith("PASS") for ln in lines if " deep." in ln or " quote." in ln)


@pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS), reason="needs tpm2-tools")
def test_cli_plain_quote_from_tpm2_tools(tmp_path: Path) -> None:
    """Files as tpm2-tools 5.x writes them: createak -u/-q, quote -m/-s/-o (and -F values)."""
    sim = Simulator(tmp_path / "vtpm")
    try:
        tpm2_tools_quotes(tmp_path, sim.start())
    finally:
        sim.stop()

    base: list[str | Path] = ["--ak-public", tmp_path / "ak.pub"]
    base += ["--ak-qualified-name", tmp_path / "ak.qname"]
    r = run_cli(
        *base, "--quote", tmp_path / "q.msg", "--signature", tmp_path / "q.sig",
        "--pcrs", tmp_path / "q.pcrs", "--nonce", "c0ffee",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines()[-1] == "verdict: PASS (8 checks)"

    second: list[str | Path] = [
        "--quote", tmp_path / "q2.msg", "--signature", tmp_path / "q2.sig",
        "--pcrs", tmp_path / "q2.values", "--pcr-list", "sha256:0,1,16",
    ]  # fmt: skip
    r = run_cli(*base, *second, "--nonce", "c0ffee01", "--previous", tmp_path / "q.msg")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PASS quote.clock" in r.stdout

    r = run_cli(*base, *second, "--nonce", "c0ffee")
    assert r.returncode == 1
    assert [ln.split(":")[0] for ln in r.stdout.splitlines() if ln.startswith("FAIL")] == [
        "FAIL quote.nonce"
    ]
    # values presented for other PCRs
    r = run_cli(*base, *second[:-1], "sha256:0,1,23", "--nonce", "c0ffee01")
    assert r.returncode == 1 and "FAIL quote.pcr_selection" in r.stdout
    # a policy with expected PCR values; one that asks what a plain quote cannot show
    pcrs16 = (tmp_path / "q2.values").read_bytes()[64:96].hex()
    policy = write_json(
        tmp_path / "p.json",
        {"format": "vtpm-verify-policy/1", "vtpm_pcrs": {"sha256": {"16": pcrs16}}},
    )
    r = run_cli(*base, *second, "--nonce", "c0ffee01", "--policy", policy)
    assert r.returncode == 0 and "PASS quote.pcrs_expected" in r.stdout
    policy = write_json(tmp_path / "p2.json", {"format": "vtpm-verify-policy/1", "label": GUEST1})
    r = run_cli(*base, *second, "--nonce", "c0ffee01", "--policy", policy)
    assert r.returncode == 1 and "FAIL quote.policy" in r.stdout
    # a truncated signature file: one clear line
    (tmp_path / "bad.sig").write_bytes((tmp_path / "q.sig").read_bytes()[:10])
    r = run_cli(
        *base, "--quote", tmp_path / "q.msg", "--signature", tmp_path / "bad.sig",
        "--pcrs", tmp_path / "q.pcrs",
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith("vtpm: error: TPMT_SIGNATURE: truncated")


# the EK certificate chain through the CLI (--ek-cert) ---------------------------------------


def test_cli_ek_chain_and_deep_ek(tmp_path: Path) -> None:
    """`vtpm verify --ek-cert`: the chain EK cert -> group CA -> TPM2_Certify -> AK, alone and
    with a deep quote whose DeepQuoteInfo carries the vTPM EK's name; another vTPM's EK
    certificate fails by deep.ek."""
    sim = Simulator(tmp_path / "hw")
    tpm = QuoteTpm(sim.start())
    try:
        tpm.extend(16, b"host boot")
        ak = tpm.ecc_ak()
        group = make_group("tenants", [GUEST1, GUEST2], tpm.pcrs([16]))
        bundle = make_bundle(tpm, ak, b"", group, [16])
        ca = TpmTestCa.create(tpm, "tenants")
        eks: list[Key] = []
        for _ in range(2):
            ek = (
                tpm.ek()
                if not eks
                else tpm.primary(ecc_ek_template(False), ESYS_TR.ENDORSEMENT, "ecc")
            )
            tpm.flush(ek)
            eks.append(ek)
        vtpms = [uuid.uuid4(), uuid.uuid4()]
        certs = [
            ca.ek_certificate(parse_public(ek.public).key, identity(v, group, label))
            for ek, v, label in zip(eks, vtpms, (GUEST1, GUEST2), strict=True)
        ]
        ca_block = ca.certified_by(ak)
        tpm.flush(ca.key)
        info = dataclasses.replace(
            vtpm_info(NONCE, vtpms[0], group, GUEST1, VTPM_PCRS_1), ek_name=eks[0].name
        )
        (evidence,) = make_evidence(tpm, ak, [info], [16])
    finally:
        tpm.close()
        sim.stop()
    with_ca = dataclasses.replace(
        bundle,
        ca_public=ca_block.public,
        ca_certificate=ca_block.certificate,
        ca_certify_attest=ca_block.certify_attest,
        ca_certify_signature=ca_block.certify_signature,
    )
    doc = with_ca.to_json()
    bundle_path = write_json(tmp_path / "bundle.json", doc)
    ev_path = write_json(tmp_path / "evidence.json", evidence.to_json())
    for n, der in enumerate(certs):
        (tmp_path / f"ek{n}.der").write_bytes(der)

    r = run_cli("--bundle", bundle_path, "--ek-cert", tmp_path / "ek0.der")
    assert r.returncode == 0, r.stdout + r.stderr
    for check_id in ("chain.ak", "chain.ca_cert", "chain.certify", "chain.ek_cert"):
        assert any(line.startswith(f"PASS {check_id}: ") for line in r.stdout.splitlines())

    deep_args: list[str | Path] = [
        "--bundle",
        bundle_path,
        "--evidence",
        ev_path,
        "--nonce",
        NONCE.hex(),
    ]
    r = run_cli(*deep_args, "--ek-cert", tmp_path / "ek0.der", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    ids = [c["id"] for c in json.loads(r.stdout)["checks"]]
    assert "deep.ek" in ids and "chain.ek_extension" in ids

    r = run_cli(*deep_args, "--ek-cert", tmp_path / "ek1.der", "--json")
    assert r.returncode == 1
    assert [c["id"] for c in json.loads(r.stdout)["checks"] if not c["ok"]] == ["deep.ek"]

    bare = write_json(tmp_path / "bare.json", bundle.to_json())  # a bundle without a CA
    r = run_cli("--bundle", bare, "--ek-cert", tmp_path / "ek0.der", "--json")
    failed_ids = {c["id"] for c in json.loads(r.stdout)["checks"] if not c["ok"]}
    assert r.returncode == 1 and "chain.ca_cert" in failed_ids
