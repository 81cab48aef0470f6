"""X.509 certificates of a group CA whose key lives in the hardware TPM: the CA's own (self-signed)
and the EK and platform certificates it issues to the group's vTPMs.

`cryptography` builds every certificate, but cannot sign with a TPM key. So each is built and
signed with a throwaway key of the CA key's algorithm (ECC P-256, so the TBS already names
ecdsa-with-SHA256), taken apart, and its TBSCertificate signed again by the CA key through a
`Signer` (TPM2_Sign in `vtpm.manager.ca`; a software key in unit tests); `vtpm.tpm.der` puts
the certificate back together. The throwaway key's signature is discarded with the key.

What the certificates say (the fields are `vtpm.tpm.ekcert`'s, documented in the README):
- CA: subject = issuer = CN "vtpm group <name> CA", OU <group uuid>, O "vtpm"; basicConstraints
  CA:TRUE pathlen 0 and keyUsage keyCertSign|cRLSign (both critical); subjectKeyIdentifier.
- EK (TCG EK Credential Profile): empty subject; a critical subjectAltName directoryName with
  the TPM's manufacturer, model and version; subjectDirectoryAttributes with the TPM
  specification; basicConstraints CA:FALSE; keyUsage keyEncipherment (RSA) or keyAgreement
  (ECC); extKeyUsage tcg-kp-EKCertificate; authorityKeyIdentifier of the CA; the vTPM identity
  extension (uuid, group, label, kind).
- Platform: the same shape for the RSA EK, with the platform's manufacturer, model and version
  in the subjectAltName and extKeyUsage tcg-kp-PlatformCertificate.
Validity: from 5 minutes before issue (clock skew) to 9999-12-31 23:59:59, RFC 5280's "no
well-defined expiration date", as EK certificates of hardware TPMs do.
"""

from __future__ import annotations

import datetime
import hashlib
import uuid
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from vtpm.errors import RequestError
from vtpm.tpm import der, ekcert
from vtpm.tpm.ekcert import VtpmIdentity
from vtpm.tpm.public import PublicKey

# Signs the SHA-256 digest of a TBSCertificate with the CA key: ECDSA (r, s).
Signer = Callable[[bytes], tuple[int, int]]

NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)
SKEW = datetime.timedelta(minutes=5)

# what key each kind of certificate is about: (key class, RSA bits or ECC curve name)
_KEYS: dict[str, tuple[type, int | str]] = {
    "ek-rsa2048": (rsa.RSAPublicKey, 2048),
    "ek-ecc256": (ec.EllipticCurvePublicKey, "secp256r1"),
    "ek-ecc384": (ec.EllipticCurvePublicKey, "secp384r1"),
    "platform": (rsa.RSAPublicKey, 2048),  # the platform certificate is about the RSA EK
}


def sign_with(builder: x509.CertificateBuilder, sign: Signer) -> bytes:
    """The DER certificate `builder` describes, its signature made by `sign`."""
    throwaway = ec.generate_private_key(ec.SECP256R1())
    draft = builder.sign(throwaway, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    tbs, algorithm, _discarded = der.certificate_parts(draft, "draft certificate")
    r, s = sign(hashlib.sha256(tbs).digest())
    return der.certificate(tbs, algorithm, der.ecdsa_signature(r, s))


def ca_name(group_uuid: uuid.UUID, group_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vtpm"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, str(group_uuid)),
            x509.NameAttribute(NameOID.COMMON_NAME, f"vtpm group {group_name} CA"),
        ]
    )


def _validity(builder: x509.CertificateBuilder, now: datetime.datetime | None) -> Any:
    start = (now or datetime.datetime.now(datetime.UTC)) - SKEW
    return (
        builder.not_valid_before(start)
        .not_valid_after(NOT_AFTER)
        .serial_number(x509.random_serial_number())
    )


def ca_certificate(
    ca_key: ec.EllipticCurvePublicKey,
    group_uuid: uuid.UUID,
    group_name: str,
    sign: Signer,
    now: datetime.datetime | None = None,
) -> bytes:
    """The group CA's self-signed certificate (DER) for its key `ca_key`."""
    name = ca_name(group_uuid, group_name)
    b = _validity(x509.CertificateBuilder(), now).subject_name(name).issuer_name(name)
    b = (
        b.public_key(ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key), critical=False)
    )
    return sign_with(b, sign)


def check_key(kind: str, key: PublicKey) -> None:
    """RequestError unless `key` is the kind of key a `kind` certificate is about."""
    want = _KEYS.get(kind)
    if want is None:
        raise RequestError(f"certificate kind {kind!r}: use one of {', '.join(ekcert.CERT_KINDS)}")
    cls, size = want
    if isinstance(key, rsa.RSAPublicKey) and cls is rsa.RSAPublicKey and key.key_size == size:
        return
    is_ec = isinstance(key, ec.EllipticCurvePublicKey) and cls is ec.EllipticCurvePublicKey
    if is_ec and isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == size:
        return
    raise RequestError(f"a {kind} certificate is not about this key (another algorithm or size)")


def ek_certificate(
    key: PublicKey,
    identity: VtpmIdentity,
    ca_cert: bytes,
    sign: Signer,
    now: datetime.datetime | None = None,
) -> bytes:
    """The EK (or, for kind "platform", platform) certificate of `identity`'s vTPM for `key`,
    issued by the CA of `ca_cert` (DER) through `sign`."""
    check_key(identity.kind, key)
    ca = x509.load_der_x509_certificate(ca_cert)
    ca_key = ca.public_key()
    if not isinstance(ca_key, ec.EllipticCurvePublicKey):
        raise RequestError("the group CA key is not an ECC key")
    platform = identity.kind == "platform"
    if platform:
        attrs = [
            (ekcert.OID_PLATFORM_MANUFACTURER, ekcert.PLATFORM_MANUFACTURER),
            (ekcert.OID_PLATFORM_MODEL, ekcert.PLATFORM_MODEL),
            (ekcert.OID_PLATFORM_VERSION, ekcert.PLATFORM_VERSION),
        ]
        purpose = ekcert.OID_KP_PLATFORM_CERTIFICATE
    else:
        attrs = [
            (ekcert.OID_TPM_MANUFACTURER, ekcert.TPM_MANUFACTURER),
            (ekcert.OID_TPM_MODEL, ekcert.TPM_MODEL),
            (ekcert.OID_TPM_VERSION, ekcert.TPM_VERSION),
        ]
        purpose = ekcert.OID_KP_EK_CERTIFICATE
    directory = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(x509.ObjectIdentifier(o), v) for o, v in attrs]
            )
        ]
    )
    b = _validity(x509.CertificateBuilder(), now).subject_name(x509.Name([]))
    b = (
        b.issuer_name(ca.subject)
        .public_key(key)
        .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(directory)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(rsa_key=isinstance(key, rsa.RSAPublicKey)), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ObjectIdentifier(purpose)]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key), critical=False)
        .add_extension(_private(ekcert.OID_VTPM_IDENTITY, identity.encode()), critical=False)
    )
    if not platform:
        spec = _private(ekcert.OID_SUBJECT_DIRECTORY_ATTRIBUTES, ekcert.tpm_specification())
        b = b.add_extension(spec, critical=False)
    return sign_with(b, sign)


def _private(dotted: str, value: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(x509.ObjectIdentifier(dotted), value)


def _key_usage(*, cert_sign: bool = False, rsa_key: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=not cert_sign and rsa_key,
        data_encipherment=False,
        key_agreement=not cert_sign and not rsa_key,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
