"""A group CA for verifier tests, with its key in a (simulated) TPM: what the Manager's group CA
does, made here so the chain verifier is tested on its own.

`TpmTestCa` holds an unrestricted, fixedTPM ECC P-256 signing key created in the swtpm; its
certificates are built with `cryptography` around a throwaway key (so the TBS names
ecdsa-with-SHA256), then the TBS is hashed and signed by the TPM key (TPM2_Sign) and the DER
certificate is assembled by hand. The group's AK certifies the CA key with TPM2_Certify
(qualifyingData = SHA-256 of the CA certificate). EK certificates carry the vTPM identity
extension of `vtpm.verify.ekident`.
"""

from __future__ import annotations

import datetime
import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from tpm2_pytss import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_ECC,
    TPM2_RH,
    TPM2_ST,
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF_OBJECT,
    TPMT_TK_HASHCHECK,
)

from tests.tpm_quotes import UNRESTRICTED_ATTRIBUTES, Key, QuoteTpm, ecc_template
from vtpm.tpm.ekcert import OID_VTPM_IDENTITY, VtpmIdentity
from vtpm.tpm.public import parse_public
from vtpm.verify.chain import GroupCaEvidence, certify_qualifying_data

ECDSA_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")  # AlgorithmIdentifier, no parameters
EK_CERTIFICATE_EKU = x509.ObjectIdentifier("2.23.133.8.1")


def _tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        head = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        head = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + head + content


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


@dataclass
class TpmTestCa:
    tpm: QuoteTpm
    key: Key  # the CA key in the TPM
    subject: x509.Name
    certificate: bytes = b""

    @classmethod
    def create(cls, tpm: QuoteTpm, group_name: str) -> TpmTestCa:
        template = ecc_template(
            UNRESTRICTED_ATTRIBUTES, unique=hashlib.sha256(group_name.encode()).digest()
        )
        key = tpm.primary(template, ESYS_TR.OWNER, "ecc")
        ca = cls(tpm, key, _name(f"vtpm group CA {group_name}"))
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        b = ca._builder(ca.subject, ca.public_key)
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        ca.certificate = ca.sign(b.add_extension(usage, critical=True))
        return ca

    @property
    def public_key(self) -> Any:
        return parse_public(self.key.public).key

    def _builder(self, subject: x509.Name, key: Any) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.subject)
            .public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=3650))
        )

    def sign(self, builder: x509.CertificateBuilder) -> bytes:
        """The DER certificate of `builder`, signed by the TPM key."""
        tbs = builder.sign(
            ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()
        ).tbs_certificate_bytes
        digest = hashlib.sha256(tbs).digest()
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        sig = self.tpm.ectx.sign(self.key.handle, TPM2B_DIGEST(digest), scheme, ticket)
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        value = b"\x00" + encode_dss_signature(r, s)
        return _tlv(0x30, tbs + ECDSA_SHA256 + _tlv(0x03, value))

    def ek_certificate(self, ek_key: Any, ident: VtpmIdentity | None) -> bytes:
        b = self._builder(x509.Name([]), ek_key)
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        b = b.add_extension(x509.ExtendedKeyUsage([EK_CERTIFICATE_EKU]), critical=False)
        tcg = x509.Name([
            x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"), "id:00001014"),
            x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.2"), "vtpm"),
            x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.3"), "id:20191023"),
        ])  # fmt: skip
        b = b.add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tcg)]), critical=True)
        ski = x509.SubjectKeyIdentifier.from_public_key(self.public_key)
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        if ident is not None:
            ext = x509.UnrecognizedExtension(
                x509.ObjectIdentifier(OID_VTPM_IDENTITY), ident.encode()
            )
            b = b.add_extension(ext, critical=False)
        return self.sign(b)

    def certified_by(self, ak: Key, certified: Key | None = None) -> GroupCaEvidence:
        """The bundle's "ca" block: this CA, certified by `ak` (or, for a negative vector,
        another key `certified` in this CA's place)."""
        attest, sig = self.tpm.certify(
            certified or self.key, ak, certify_qualifying_data(self.certificate)
        )
        return GroupCaEvidence(self.key.public, self.certificate, attest, sig)


def pem(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def identity(vtpm_uuid: uuid.UUID, group: dict[str, Any], label: str) -> VtpmIdentity:
    return VtpmIdentity(vtpm_uuid, uuid.UUID(group["uuid"]), label, "ek-rsa2048")


def ecc_ek_template(p384: bool) -> TPM2B_PUBLIC:
    """TCG EK templates L-2 (P-256) and H-3 (P-384), written from the EK Credential Profile."""
    policy = (
        "b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4cb1c0ad9bde419cacb47ba09699646150f9fc000f3f80e12"
        if p384
        else "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
    )  # fmt: skip
    attrs = (
        TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.ADMINWITHPOLICY | TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT
    )  # fmt: skip
    if p384:
        attrs |= TPMA_OBJECT.USERWITHAUTH
    t = TPMT_PUBLIC(
        type=TPM2_ALG.ECC,
        nameAlg=TPM2_ALG.SHA384 if p384 else TPM2_ALG.SHA256,
        objectAttributes=attrs,
        authPolicy=TPM2B_DIGEST(bytes.fromhex(policy)),
    )
    d = t.parameters.eccDetail
    d.symmetric = TPMT_SYM_DEF_OBJECT.parse("aes256cfb" if p384 else "aes128cfb")
    d.scheme.scheme = TPM2_ALG.NULL
    d.curveID = TPM2_ECC.NIST_P384 if p384 else TPM2_ECC.NIST_P256
    d.kdf.scheme = TPM2_ALG.NULL
    t.unique.ecc.x = bytes(48 if p384 else 32)
    t.unique.ecc.y = bytes(48 if p384 else 32)
    return TPM2B_PUBLIC(t)
