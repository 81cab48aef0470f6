"""The group CA on the simulated hardware TPM: made, certified by the group's AK, issuing EK and
platform certificates that `openssl verify -CAfile` accepts against this group's CA certificate
and refuses against another group's; nothing issued while the group is locked."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import ESYS_TR, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMA_OBJECT, TPMT_PUBLIC

from tests.helpers import VTPM
from tests.mgr import GUEST1, manager, new_group, new_vtpm, owner_key
from vtpm.errors import ManagerError, RequestError, SealError
from vtpm.manager import ownerreq
from vtpm.manager.ca import CaTpm, GroupCa
from vtpm.manager.config import ManagerConfig
from vtpm.manager.groups import GroupKeys
from vtpm.manager.hwtpm import HardwareTpm, SealedObject
from vtpm.manager.service import Manager
from vtpm.manager.simulator import Simulator
from vtpm.manager.store import GroupRecord, Store, VtpmRecord
from vtpm.tpm import ekcert
from vtpm.tpm.attest import TPM_GENERATED_VALUE, TPM_ST_ATTEST, parse_attest, parse_signature
from vtpm.tpm.public import parse_public
from vtpm.wire.evidence import Bundle

pytestmark = pytest.mark.integration

LABEL = "guest1_u:vm_r:vtpm_t"
_EK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.ADMINWITHPOLICY
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[tuple[GroupKeys, Store, HardwareTpm, GroupCa]]:
    sim = Simulator(tmp_path / "hwtpm")
    sim.start()
    store = Store(tmp_path / "manager.db")
    store.open()
    hw = HardwareTpm(sim.tcti, retries=2)
    hw.open()
    try:
        gk = GroupKeys(store, hw)
        (tmp_path / "vtpms").mkdir()
        yield gk, store, hw, GroupCa(store, gk, vtpms_dir=tmp_path / "vtpms")
    finally:
        hw.close()
        store.close()
        sim.stop()


def _group(gk: GroupKeys, name: str) -> GroupRecord:
    pem = ownerreq.public_pem(ec.generate_private_key(ec.SECP256R1()))
    return gk.create(name, pem, [16], [])


def _vtpm(store: Store, g: GroupRecord, label: str = LABEL) -> VtpmRecord:
    rec = VtpmRecord(uuid.uuid4(), g.uuid, label, "2.0", None, None, ())
    store.add_vtpm(rec)
    return rec


def _ek(hw: HardwareTpm, alg: str) -> bytes:
    """An EK-shaped primary of `alg` ("rsa2048", "ecc256", "ecc384") in the endorsement
    hierarchy of the simulated TPM, as its TPM2B_PUBLIC (what a vTPM would send)."""
    template = TPMT_PUBLIC.parse(f"{alg}:aes128cfb", objectAttributes=_EK_ATTRS)

    def op(ectx: Any) -> bytes:
        with hw.flushing(ectx) as handles:
            handle, public, *_ = ectx.create_primary(
                TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(template), primary_handle=ESYS_TR.ENDORSEMENT
            )
            handles.append(handle)
        return bytes(public.marshal())

    return hw.run("making a test EK", op)


def _pem(path: Path, der: bytes) -> Path:
    path.write_bytes(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM))
    return path


def _openssl_verify(ca: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca), str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_ca_key_is_in_the_tpm_and_certified_by_the_group_ak(
    env: tuple[GroupKeys, Store, HardwareTpm, GroupCa],
) -> None:
    gk, store, _hw, ca = env
    g = ca.ensure(_group(gk, "tenant"))
    assert g.ca is not None and ca.ensure(g) is g  # made once
    stored = store.group("tenant")
    assert stored is not None and stored.ca == g.ca
    cert = x509.load_der_x509_certificate(g.ca.certificate)
    cert.verify_directly_issued_by(cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca_pub = parse_public(g.ca.public)
    assert cert.public_key() == ca_pub.key
    attrs = int(ca_pub.attributes)
    assert attrs & TPMA_OBJECT.FIXEDTPM and attrs & TPMA_OBJECT.SIGN_ENCRYPT
    assert not attrs & TPMA_OBJECT.RESTRICTED

    attest = parse_attest(g.ca.certify_attest)
    assert attest.magic == TPM_GENERATED_VALUE and attest.type == TPM_ST_ATTEST.CERTIFY
    assert attest.extra_data == hashlib.sha256(g.ca.certificate).digest()
    (size,) = struct.unpack(">H", attest.attested[:2])
    assert attest.attested[2 : 2 + size] == ca_pub.name  # TPMS_CERTIFY_INFO.name
    sig = parse_signature(g.ca.certify_signature)
    ak = parse_public(g.ak_public).key
    assert isinstance(ak, ec.EllipticCurvePublicKey)
    ak.verify(encode_dss_signature(sig.r, sig.s), g.ca.certify_attest, ec.ECDSA(hashes.SHA256()))

    # without the authValue only the group key gives, the TPM will not sign with it
    key = SealedObject(g.ca.public, g.ca.private)
    with pytest.raises(SealError):
        CaTpm(gk.attestation.hw).sign(key, bytes(32), bytes(32))


def test_issued_certificates_verify_against_their_group_ca_only(
    env: tuple[GroupKeys, Store, HardwareTpm, GroupCa], tmp_path: Path
) -> None:
    gk, store, hw, ca = env
    g = _group(gk, "tenant")
    other = ca.ensure(_group(gk, "other"))
    v = _vtpm(store, g)
    eks = {
        "ek-rsa2048": _ek(hw, "rsa2048"),
        "ek-ecc256": _ek(hw, "ecc256"),
        "ek-ecc384": _ek(hw, "ecc384"),
        "platform": _ek(hw, "rsa2048"),
    }
    issued = {kind: ca.issue(v, kind, pub) for kind, pub in eks.items()}
    g = store.group("tenant") or g
    assert g.ca is not None and other.ca is not None
    group_ca = _pem(tmp_path / "group-ca.pem", ca.ca_certificate(g))
    other_ca = _pem(tmp_path / "other-ca.pem", other.ca.certificate)
    for kind, der in issued.items():
        cert = x509.load_der_x509_certificate(der)
        assert cert.public_key() == parse_public(eks[kind]).key
        assert ekcert.identity_of(cert) == ekcert.VtpmIdentity(v.uuid, g.uuid, LABEL, kind)
        pem = _pem(tmp_path / f"{kind}.pem", der)
        ok = _openssl_verify(group_ca, pem)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert _openssl_verify(other_ca, pem).returncode != 0
    records = {c.kind: c for c in store.certs(v.uuid)}
    assert set(records) == set(ekcert.CERT_KINDS)
    for kind, pub in eks.items():
        assert records[kind].ek_name == parse_public(pub).name
        assert records[kind].certificate == issued[kind]
    d = ca.certs_dir(v.uuid)
    names = sorted(p.name for p in d.iterdir())
    assert names == sorted([*(f"{k}.der" for k in ekcert.CERT_KINDS), "group-ca.der"])
    for p in d.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
    assert (d / "group-ca.der").read_bytes() == g.ca.certificate


def test_nothing_is_issued_while_the_group_is_locked(
    env: tuple[GroupKeys, Store, HardwareTpm, GroupCa],
) -> None:
    gk, store, hw, ca = env
    g = ca.ensure(_group(gk, "tenant"))
    v = _vtpm(store, g)
    ek = _ek(hw, "ecc256")
    gk.forget(g.uuid)  # its key dropped from memory, as when the host leaves its states
    with pytest.raises(ManagerError, match="locked"):
        ca.issue(v, "ek-ecc256", ek)
    assert store.certs(v.uuid) == []
    locked = _group(gk, "fresh")
    gk.forget(locked.uuid)
    with pytest.raises(ManagerError, match="locked"):
        ca.ensure(locked)  # nor is a CA made


def test_keys_that_are_not_the_kind_asked_are_refused(
    env: tuple[GroupKeys, Store, HardwareTpm, GroupCa],
) -> None:
    gk, store, hw, ca = env
    g = _group(gk, "tenant")
    v = _vtpm(store, g)
    ecc = _ek(hw, "ecc256")
    with pytest.raises(RequestError):
        ca.issue(v, "ek-rsa2048", ecc)  # another algorithm
    with pytest.raises(RequestError):
        ca.issue(v, "ek-dsa", ecc)
    with pytest.raises(RequestError):
        ca.issue(v, "ek-ecc256", b"\x00\x04junk")
    g = gk.ensure_ak(g)
    with pytest.raises(RequestError, match="not an endorsement key"):
        ca.issue(v, "ek-ecc256", g.ak_public)  # a signing key is no EK
    assert store.certs(v.uuid) == []


def test_through_the_manager_bundle_files_and_vtpm_ek(tmp_path: Path) -> None:
    """A real Manager: its groups get CAs, the bundle carries them, issued certificates appear in
    `<data>/vtpms/<uuid>.certs/` and through `vtpm ek`, and `openssl verify -CAfile` accepts
    them against their group's CA and refuses them against another group's."""
    d = tmp_path / "data"
    with manager(d) as m:
        key = owner_key(tmp_path)
        new_group(m, "tenant", key)
        new_group(m, "other", key)
        view, _port = new_vtpm(m, "tenant", GUEST1, start=False)
        bundle = Bundle.from_json(m.json("group", "provision", "tenant"))
        other = Bundle.from_json(m.json("group", "provision", "other"))
        assert m.json("ek", view["uuid"]) == {
            "certificates": {},
            "ca_certificate": bundle_ca(bundle).hex(),
        }
    vtpm_uuid = uuid.UUID(view["uuid"])

    mgr = Manager(ManagerConfig.load(d))  # issues as key custody will for a CertRequest
    mgr.open()
    try:
        ek = mgr.services.groups.attestation.ek_public()
        issued = mgr.services.ca.issue_for(vtpm_uuid, "ek-rsa2048", ek)
    finally:
        mgr.close()

    with manager(d) as m:
        out = tmp_path / "out"
        m.cli("ek", str(vtpm_uuid), "--out-dir", str(out))
        assert sorted(p.name for p in out.iterdir()) == ["ek-rsa2048.pem", "group-ca.pem"]
        ok = _openssl_verify(out / "group-ca.pem", out / "ek-rsa2048.pem")
        assert ok.returncode == 0, ok.stdout + ok.stderr
        wrong = _pem(tmp_path / "other-ca.pem", bundle_ca(other))
        assert _openssl_verify(wrong, out / "ek-rsa2048.pem").returncode != 0
        der = subprocess.run(
            [*VTPM, "ek", str(vtpm_uuid), "--format", "der", "--kind", "ek-rsa2048"],
            env={**os.environ, "VTPM_DATA_DIR": str(d)},
            capture_output=True,
            check=True,
        ).stdout
        assert der == issued
        shown = m.json("ek", "show", str(vtpm_uuid))
        assert shown["certificates"] == {"ek-rsa2048": issued.hex()}
        bad = m.cli("ek", str(vtpm_uuid), "--kind", "platform", check=False)
        assert bad.returncode == 1 and "no platform certificate" in bad.stderr
    files = d / "vtpms" / f"{vtpm_uuid}.certs"
    assert (files / "ek-rsa2048.der").read_bytes() == issued
    assert (files / "group-ca.der").read_bytes() == bundle_ca(bundle)
    assert stat.S_IMODE((files / "ek-rsa2048.der").stat().st_mode) == 0o644
    cert = x509.load_der_x509_certificate(issued)
    assert cert.public_key() == parse_public(ek).key
    assert bundle.ca_public is not None
    assert (
        parse_public(bundle.ca_public).key
        == x509.load_der_x509_certificate(bundle_ca(bundle)).public_key()
    )


def bundle_ca(b: Bundle) -> bytes:
    assert b.ca_certificate is not None, "the bundle carries no CA"
    return b.ca_certificate
