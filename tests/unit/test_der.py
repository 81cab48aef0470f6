"""`vtpm.tpm.der`: encodings checked against `cryptography`'s and OpenSSL's parsers (not against
our own reader alone), and the reader refusing malformed DER with VerifyError only."""

from __future__ import annotations

import datetime
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from vtpm.errors import VerifyError
from vtpm.tpm import der


def _self_signed(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("n", [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000])
def test_length_is_minimal(n: int) -> None:
    enc = der.length(n)
    if n < 0x80:
        assert enc == bytes([n])
    else:
        assert enc[0] & 0x80 and enc[1] != 0 and int.from_bytes(enc[1:], "big") == n
    assert der.split(der.octet_string(bytes(n)), "t").content == bytes(n)


@pytest.mark.parametrize(
    ("value", "encoding"),
    [(0, "020100"), (127, "02017f"), (128, "02020080"), (-1, "0201ff"), (-129, "0202ff7f")],
)
def test_integer_matches_x690(value: int, encoding: str) -> None:
    assert der.integer(value).hex() == encoding
    assert der.read_integer(der.split(der.integer(value), "t"), "t") == value


def test_oid_matches_cryptography() -> None:
    for dotted in (
        "2.23.133.8.1",
        "1.2.840.10045.4.3.2",
        "2.25.292244736769242437814819020044331002690",
    ):
        ext = x509.UnrecognizedExtension(x509.ObjectIdentifier(dotted), b"\x05\x00")
        # cryptography encodes the OID itself inside the extension; ours must be the same bytes
        assert der.oid(dotted)[2:] in _extension_der(ext)
    with pytest.raises(ValueError):
        der.oid("3.1")


def _extension_der(ext: x509.UnrecognizedExtension) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "t")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(ext, critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_ecdsa_signature_is_what_cryptography_reads() -> None:
    r, s = (1 << 255) + 5, 0x7F
    assert decode_dss_signature(der.ecdsa_signature(r, s)) == (r, s)


def test_certificate_round_trip_through_openssl(tmp_path: object) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _self_signed(key)
    tbs, alg, sig = der.certificate_parts(cert)
    assert der.certificate(tbs, alg, sig) == cert
    # re-signed with the same key by hand: a valid certificate for openssl too
    r, s = decode_dss_signature(key.sign(tbs, ec.ECDSA(hashes.SHA256())))
    again = der.certificate(tbs, alg, der.ecdsa_signature(r, s))
    parsed = x509.load_der_x509_certificate(again)
    parsed.verify_directly_issued_by(parsed)
    out = subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-noout", "-subject"],
        input=again,
        capture_output=True,
        check=True,
    )
    assert b"CN = t" in out.stdout or b"CN=t" in out.stdout


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"\x30",
        b"\x30\x05\x02\x01",  # runs past the end
        b"\x30\x80\x00\x00",  # indefinite length
        b"\x30\x81\x05\x02\x01\x00\x02\x00",  # long form for a short length
        b"\x30\x00\x00",  # trailing byte
        b"\x1f\x01\x00",  # multi-byte tag
    ],
)
def test_malformed_der_is_a_verify_error(bad: bytes) -> None:
    with pytest.raises(VerifyError):
        der.split(bad, "t")


def test_non_minimal_integer_refused() -> None:
    with pytest.raises(VerifyError):
        der.read_integer(der.split(b"\x02\x02\x00\x01", "t"), "t")
    with pytest.raises(VerifyError):
        der.read_integer(der.split(b"\x02\x02\xff\x80", "t"), "t")


def test_certificate_parts_refuses_non_certificates() -> None:
    with pytest.raises(VerifyError):
        der.certificate_parts(der.sequence(der.integer(1)))
    with pytest.raises(VerifyError):
        der.certificate_parts(der.sequence(der.sequence(), der.sequence(), der.tlv(3, b"\x01a")))
