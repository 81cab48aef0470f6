"""`vtpm.manager.certs`: the group CA and EK/platform certificates, signed through a `Signer`
(here a software P-256 key, `SoftwareSigner`), read back by `cryptography` and `openssl`."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from vtpm.errors import LocalProtocolError, RemoteProtocolError, RequestError, VerifyError
from vtpm.manager import certs
from vtpm.tpm import der, ekcert
from vtpm.tpm.ekcert import VtpmIdentity
from vtpm.tpm.public import PublicKey
from vtpm.wire.evidence import Bundle, SignedQuote

GROUP = uuid.UUID("11111111-2222-3333-4444-555555555555")
VTPM = uuid.UUID("66666666-7777-8888-9999-000000000000")


class SoftwareSigner:
    """A CA key in software, standing in for the hardware TPM's TPM2_Sign."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.calls = 0

    def __call__(self, digest: bytes) -> tuple[int, int]:
        self.calls += 1
        assert len(digest) == 32
        r, s = decode_dss_signature(self.key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256()))))
        return r, s


def _ca(signer: SoftwareSigner, name: str = "tenant") -> bytes:
    return certs.ca_certificate(signer.key.public_key(), GROUP, name, signer)


def _ident(kind: str) -> VtpmIdentity:
    return VtpmIdentity(VTPM, GROUP, "guest1_u:vm_r:vtpm_t", kind)


def test_ca_certificate_is_a_self_signed_ca() -> None:
    signer = SoftwareSigner()
    ca = x509.load_der_x509_certificate(_ca(signer))
    assert signer.calls == 1
    ca.verify_directly_issued_by(ca)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign and not ku.digital_signature
    assert ca.public_key() == signer.key.public_key()
    assert str(GROUP) in ca.subject.rfc4514_string()


@pytest.mark.parametrize(
    ("kind", "key"),
    [
        ("ek-rsa2048", rsa.generate_private_key(65537, 2048).public_key()),
        ("ek-ecc256", ec.generate_private_key(ec.SECP256R1()).public_key()),
        ("ek-ecc384", ec.generate_private_key(ec.SECP384R1()).public_key()),
        ("platform", rsa.generate_private_key(65537, 2048).public_key()),
    ],
)
def test_ek_certificate_fields(kind: str, key: PublicKey, tmp_path: Path) -> None:
    signer = SoftwareSigner()
    ca_der = _ca(signer)
    cert_der = certs.ek_certificate(key, _ident(kind), ca_der, signer)
    cert = x509.load_der_x509_certificate(cert_der)
    ca = x509.load_der_x509_certificate(ca_der)
    cert.verify_directly_issued_by(ca)
    assert cert.public_key() == key
    assert cert.subject == x509.Name([])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    (directory,) = san.value.get_values_for_type(x509.DirectoryName)
    values = {a.oid.dotted_string: a.value for a in directory}
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    if kind == "platform":
        assert values[ekcert.OID_PLATFORM_MANUFACTURER] == ekcert.PLATFORM_MANUFACTURER
        assert [o.dotted_string for o in eku] == [ekcert.OID_KP_PLATFORM_CERTIFICATE]
    else:
        assert values == {
            ekcert.OID_TPM_MANUFACTURER: "id:49424D00",
            ekcert.OID_TPM_MODEL: "SW   TPM",
            ekcert.OID_TPM_VERSION: "id:20191023",
        }
        assert [o.dotted_string for o in eku] == [ekcert.OID_KP_EK_CERTIFICATE]
        sda = cert.extensions.get_extension_for_oid(
            x509.ObjectIdentifier(ekcert.OID_SUBJECT_DIRECTORY_ATTRIBUTES)
        )
        assert sda.value.value == ekcert.tpm_specification()  # type: ignore[attr-defined]
    assert ku.key_encipherment == isinstance(key, rsa.RSAPublicKey)
    assert ku.key_agreement == isinstance(key, ec.EllipticCurvePublicKey)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert ekcert.identity_of(cert) == _ident(kind)
    # openssl agrees: the chain verifies and the certificate parses
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "ek.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    ok = subprocess.run(
        ["openssl", "verify", "-CAfile", tmp_path / "ca.pem", tmp_path / "ek.pem"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_another_ca_does_not_verify(tmp_path: Path) -> None:
    mine, other = SoftwareSigner(), SoftwareSigner()
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    cert = certs.ek_certificate(key, _ident("ek-ecc256"), _ca(mine), mine)
    (tmp_path / "other.der").write_bytes(_ca(other))  # same subject, other key
    subprocess.run(
        [
            "openssl",
            "x509",
            "-inform",
            "DER",
            "-in",
            tmp_path / "other.der",
            "-out",
            tmp_path / "other.pem",
        ],
        check=True,
    )
    (tmp_path / "ek.der").write_bytes(cert)
    res = subprocess.run(
        ["openssl", "verify", "-CAfile", tmp_path / "other.pem", tmp_path / "ek.der"],
        capture_output=True,
        check=False,
    )
    assert res.returncode != 0


def test_key_of_the_wrong_kind_refused() -> None:
    signer = SoftwareSigner()
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(RequestError):
        certs.ek_certificate(p256, _ident("ek-rsa2048"), _ca(signer), signer)
    with pytest.raises(RequestError):
        certs.ek_certificate(p256, _ident("ek-ecc384"), _ca(signer), signer)
    with pytest.raises(RequestError):
        certs.check_key("ek-dsa", p256)


def test_identity_extension_round_trip_and_defects() -> None:
    ident = VtpmIdentity(VTPM, GROUP, "a_u:b_r:c_t", "ek-ecc384")
    assert VtpmIdentity.decode(ident.encode()) == ident
    wrong_version = der.sequence(der.integer(2), *[der.split(ident.encode(), "t").content[3:]])
    for bad in (
        b"",
        ident.encode()[:-1],
        ident.encode() + b"\x00",
        wrong_version,
        der.sequence(
            der.integer(1),
            der.octet_string(b"short"),
            der.octet_string(bytes(16)),
            der.utf8_string("x"),
            der.utf8_string("y"),
        ),
        der.sequence(der.integer(1)),
    ):
        with pytest.raises(VerifyError):
            VtpmIdentity.decode(bad)


def test_a_certificate_without_the_extension() -> None:
    signer = SoftwareSigner()
    with pytest.raises(VerifyError):
        ekcert.identity_of(x509.load_der_x509_certificate(_ca(signer)))


# the bundle's "ca" fields (vtpm.wire.evidence.Bundle) ---------------------------------------


def _bundle(**ca: bytes | None) -> Bundle:
    return Bundle(
        group={"uuid": str(GROUP)},
        ak_alg="ecc",
        ak_public=b"\x01",
        ak_name=b"\x02",
        ak_qualified_name=b"\x03",
        ek_public=b"\x04",
        ek_certificate=None,
        config_quote=SignedQuote(b"a", b"s", {16: bytes(32)}),
        manager_uuid="m",
        **ca,
    )


def test_bundle_ca_fields_round_trip() -> None:
    with_ca = _bundle(
        ca_public=b"pub",
        ca_certificate=b"cert",
        ca_certify_attest=b"att",
        ca_certify_signature=b"sig",
    )
    doc = json.loads(json.dumps(with_ca.to_json()))
    assert doc["ca"] == {
        "public": b"pub".hex(),
        "certificate": b"cert".hex(),
        "certify_attest": b"att".hex(),
        "certify_signature": b"sig".hex(),
    }
    assert Bundle.from_json(doc) == with_ca
    without = _bundle()
    doc = without.to_json()
    assert doc["ca"] is None and Bundle.from_json(doc) == without
    del doc["ca"]  # a bundle from before CAs
    assert Bundle.from_json(doc) == without


def test_bundle_ca_fields_all_or_none() -> None:
    with pytest.raises(LocalProtocolError):
        _bundle(ca_public=b"pub")
    doc = _bundle(
        ca_public=b"p", ca_certificate=b"c", ca_certify_attest=b"a", ca_certify_signature=b"s"
    ).to_json()
    del doc["ca"]["certify_signature"]
    with pytest.raises(RemoteProtocolError):
        Bundle.from_json(doc)
    doc["ca"] = "nope"
    with pytest.raises(RemoteProtocolError):
        Bundle.from_json(doc)
