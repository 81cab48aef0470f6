"""The EK certificate chain (`vtpm.verify.chain`) and the deep quote's EK binding (`deep.ek`),
against a group CA whose key is in a real swtpm, certified by a real AK with TPM2_Certify, and
real EKs made in that swtpm from the TCG templates. Each link's negative vector fails by its id:
another group's CA, a CA key not certified by this AK, a tampered certificate, an AK of another
TPM, another vTPM's EK certificate."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from vtpm.manager.simulator import Simulator
from vtpm.tpm.ekcert import VtpmIdentity
from vtpm.tpm.public import parse_public
from vtpm.verify.chain import GroupCaEvidence, verify_chain
from vtpm.verify.deepquote import check_ek
from vtpm.verify.ekident import ek_name
from vtpm.verify.expected import Expected
from vtpm.wire.evidence import Bundle

pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is a dev dependency of the project")
from tpm2_pytss import ESYS_TR

from tests.tpm_ca import TpmTestCa, ecc_ek_template, identity, pem
from tests.tpm_quotes import Key, QuoteTpm, make_bundle, make_group, vtpm_info

LABEL = "guest1_u:vm_r:vtpm_t"
CHAIN_IDS = ["chain.ak", "chain.ca_cert", "chain.certify", "chain.ek_cert", "chain.ek_extension"]


@dataclasses.dataclass
class Tpm:
    tpm: QuoteTpm
    ak: Key
    bundle: Bundle
    group: dict[str, object]


def _tpm(path: Path, name: str) -> tuple[Simulator, Tpm]:
    sim = Simulator(path)
    tpm = QuoteTpm(sim.start())
    tpm.extend(16, b"host boot")
    ak = tpm.ecc_ak()
    group = make_group(name, [LABEL, "*:vm_r:vtpm_t"], tpm.pcrs([16]))
    return sim, Tpm(tpm, ak, make_bundle(tpm, ak, b"", group, [16]), group)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Tpm, Tpm]]:
    sim_a, a = _tpm(tmp_path_factory.mktemp("hw-a"), "tenants")
    sim_b, b = _tpm(tmp_path_factory.mktemp("hw-b"), "others")
    try:
        yield a, b
    finally:
        for sim, t in ((sim_a, a), (sim_b, b)):
            t.tpm.close()
            sim.stop()


def real_ek(t: Tpm, kind: str) -> tuple[bytes, object]:
    """(TPM name, public key) of an EK the swtpm makes from the TCG template of `kind`."""
    if kind == "rsa":
        key = t.tpm.ek()
    else:
        key = t.tpm.primary(ecc_ek_template(kind == "p384"), ESYS_TR.ENDORSEMENT, "ecc")
    t.tpm.flush(key)
    return key.name, parse_public(key.public).key


@dataclasses.dataclass
class Chain:
    a: Tpm
    b: Tpm
    ca_a: GroupCaEvidence
    ca_b: GroupCaEvidence  # group B's CA, certified by B's AK
    ek_name: bytes
    ek_cert: bytes  # for a vTPM of group A, by A's CA
    vtpm: uuid.UUID
    other_ek_cert: bytes  # another vTPM of group A, by A's CA
    foreign_ek_cert: bytes  # a vTPM of group B, by B's CA
    uncertified: GroupCaEvidence  # A's CA with a Certify of another key by A's AK


@pytest.fixture(scope="module")
def chain(two: tuple[Tpm, Tpm]) -> Chain:
    a, b = two
    ca_a = TpmTestCa.create(a.tpm, "tenants")
    ca_b = TpmTestCa.create(b.tpm, "others")
    vtpm, other = uuid.uuid4(), uuid.uuid4()
    name, key = real_ek(a, "rsa")
    _name2, key2 = real_ek(a, "p256")
    ek_cert = ca_a.ek_certificate(key, identity(vtpm, a.group, LABEL))
    other_cert = ca_a.ek_certificate(key2, identity(other, a.group, "x_u:vm_r:vtpm_t"))
    foreign = ca_b.ek_certificate(key, identity(vtpm, b.group, LABEL))
    stray = TpmTestCa.create(a.tpm, "stray")
    uncertified = ca_a.certified_by(a.ak, certified=stray.key)
    a.tpm.flush(stray.key)
    result = Chain(
        a, b, ca_a.certified_by(a.ak), ca_b.certified_by(b.ak), name, ek_cert, vtpm,
        other_cert, foreign, uncertified,
    )  # fmt: skip
    a.tpm.flush(ca_a.key)
    b.tpm.flush(ca_b.key)
    return result


def failed(c: Chain, ca: GroupCaEvidence | None, cert: bytes, **kw: object) -> set[str]:
    return verify_chain(c.a.bundle, ca, cert, **kw).failed_ids()  # type: ignore[arg-type]


def test_the_full_chain_passes(chain: Chain) -> None:
    verdict = verify_chain(chain.a.bundle, chain.ca_a, chain.ek_cert)
    assert verdict.ok, verdict.failed()
    assert [c.id for c in verdict.checks] == CHAIN_IDS
    assert verify_chain(chain.a.bundle, chain.ca_a, pem(chain.ek_cert)).ok  # PEM too


def test_with_a_policy(chain: Chain) -> None:
    good = Expected(vtpm_uuid=chain.vtpm, label=LABEL, group="tenants")
    assert verify_chain(chain.a.bundle, chain.ca_a, chain.ek_cert, good).ok
    wrong = Expected(vtpm_uuid=uuid.uuid4())
    assert failed(chain, chain.ca_a, chain.ek_cert, expected=wrong) == {"chain.ek_extension"}


def test_another_groups_ca(chain: Chain) -> None:
    # an EK certificate of group B's CA, presented with group A's bundle
    assert failed(chain, chain.ca_a, chain.foreign_ek_cert) == {
        "chain.ek_cert",
        "chain.ek_extension",
    }


def test_a_ca_key_not_certified_by_this_ak(chain: Chain) -> None:
    assert failed(chain, chain.uncertified, chain.ek_cert) == {"chain.certify"}


def test_an_ak_of_another_tpm(chain: Chain) -> None:
    # group B's CA block (certified by TPM B's AK) in group A's bundle: the certificate chain
    # to B's CA holds, but A's AK never certified that key
    assert failed(chain, chain.ca_b, chain.foreign_ek_cert) == {
        "chain.certify",
        "chain.ek_extension",
    }
    # the bundle's AK replaced by B's: the config quote no longer verifies either
    b_ak = dataclasses.replace(chain.a.bundle, ak_public=chain.b.ak.public, ak_name=chain.b.ak.name)
    ids = verify_chain(b_ak, chain.ca_a, chain.ek_cert).failed_ids()
    assert ids == {"chain.ak", "chain.certify"}


@pytest.mark.parametrize("offset", [-80, -20])  # inside the TBS, inside the signature
def test_a_tampered_ek_certificate(chain: Chain, offset: int) -> None:
    raw = bytearray(chain.ek_cert)
    tbs_end = len(raw) - 80 if offset == -80 else len(raw) + offset
    raw[tbs_end] ^= 0x01
    try:
        x509.load_der_x509_certificate(bytes(raw))
    except ValueError:
        pytest.skip("this flip breaks the DER itself")
    assert "chain.ek_cert" in failed(chain, chain.ca_a, bytes(raw))


def test_a_tampered_ca_certificate(chain: Chain) -> None:
    raw = bytearray(chain.ca_a.certificate)
    raw[-20] ^= 0x01  # the signature
    ca = dataclasses.replace(chain.ca_a, certificate=bytes(raw))
    assert {"chain.ca_cert", "chain.certify"} <= failed(chain, ca, chain.ek_cert)


def test_no_group_ca(chain: Chain) -> None:
    ids = failed(chain, None, chain.ek_cert)
    assert ids == {"chain.ca_cert", "chain.certify", "chain.ek_cert"}


def test_ca_block_parsed_from_the_bundle_document(chain: Chain) -> None:
    ca = chain.ca_a
    doc = {
        **chain.a.bundle.to_json(),
        "ca": {
            "public": ca.public.hex(),
            "certificate": ca.certificate.hex(),
            "certify_attest": ca.certify_attest.hex(),
            "certify_signature": ca.certify_signature.hex(),
        },
    }
    assert GroupCaEvidence.from_bundle(Bundle.from_json(doc)) == ca
    assert GroupCaEvidence.from_bundle(Bundle.from_json({**doc, "ca": None})) is None


@pytest.mark.parametrize("kind", ["rsa", "p256", "p384"])
def test_ek_name_from_certificate_equals_the_tpm_name(two: tuple[Tpm, Tpm], kind: str) -> None:
    """The TCG template the verifier rebuilds gives the name the TPM computes."""
    a, _ = two
    name, key = real_ek(a, kind)
    ca = TpmTestCa.create(a.tpm, "names")
    cert = x509.load_der_x509_certificate(ca.ek_certificate(key, None))
    a.tpm.flush(ca.key)
    assert ek_name(cert)[1] == name


def test_deep_ek_binds_the_certified_ek(chain: Chain) -> None:
    info = vtpm_info(b"n", chain.vtpm, chain.a.group, LABEL, {})
    bound = dataclasses.replace(info, ek_name=chain.ek_name)
    cert = x509.load_der_x509_certificate(chain.ek_cert)
    other = x509.load_der_x509_certificate(chain.other_ek_cert)
    assert check_ek(bound, cert).ok
    assert not check_ek(bound, other).ok and "another vTPM" in check_ek(bound, other).reason
    assert not check_ek(info, cert).ok  # the vTPM has no certified EK
    v1 = dataclasses.replace(info, version=1)
    assert "version 1" in check_ek(v1, cert).reason
    # the EK name matches but the certificate names another vTPM uuid
    elsewhere = dataclasses.replace(bound, vtpm_uuid=uuid.uuid4())
    assert not check_ek(elsewhere, cert).ok


def test_identity_extension_round_trip() -> None:
    ident = VtpmIdentity(uuid.uuid4(), uuid.uuid4(), "u_u:r_r:t_t", "ek-ecc256")
    assert VtpmIdentity.decode(ident.encode()) == ident
    # the exact bytes of the group CA's definition (version 1 first, kind last)
    raw = ident.encode()
    assert (
        raw[0] == 0x30
        and raw[2:5] == bytes.fromhex("020101")
        and raw.endswith(b"\x0c\x09ek-ecc256")
    )


def test_a_platform_certificate_is_no_ek_certificate(chain: Chain) -> None:
    ca = TpmTestCa.create(chain.a.tpm, "tenants")  # the same primary: group A's CA again
    _name, key = real_ek(chain.a, "rsa")
    ident = dataclasses.replace(identity(chain.vtpm, chain.a.group, LABEL), kind="platform")
    cert = ca.ek_certificate(key, ident)
    chain.a.tpm.flush(ca.key)
    assert failed(chain, chain.ca_a, cert) == {"chain.ek_extension"}


def test_keylime_style_store_trusting_only_the_group_ca(chain: Chain, tmp_path: Path) -> None:
    """A verifier that holds only the group CA certificate accepts the vTPM's EK certificate
    (a plain signature check, and openssl verify -CAfile), and refuses another group's."""
    ca = x509.load_der_x509_certificate(chain.ca_a.certificate)
    x509.load_der_x509_certificate(chain.ek_cert).verify_directly_issued_by(ca)
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    (tmp_path / "ca.pem").write_bytes(pem(chain.ca_a.certificate))
    (tmp_path / "ek.pem").write_bytes(pem(chain.ek_cert))
    (tmp_path / "foreign.pem").write_bytes(pem(chain.foreign_ek_cert))
    argv = [openssl, "verify", "-CAfile", str(tmp_path / "ca.pem")]
    ok = subprocess.run(
        [*argv, str(tmp_path / "ek.pem")], check=False, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = subprocess.run(
        [*argv, str(tmp_path / "foreign.pem")], check=False, capture_output=True, text=True
    )
    assert bad.returncode != 0
