"""Verify a vTPM's EK certificate back to the group's AK in the hardware TPM, offline.

The chain, from the vTPM outwards (what each link proves):

    vTPM EK certificate   signed by the group CA key             chain.ek_cert
    group CA certificate  self-signed by that key; the key is    chain.ca_cert
                          the bundle's `ca_public`
    TPM2_Certify          the group's AK attests that a fixedTPM chain.certify
                          signing key of name(ca_public) lives
                          in its TPM (so the CA key never leaves
                          the hardware TPM)
    the group's AK        the bundle's AK and its config quote   chain.ak
                          (bundle.ak, bundle.config_quote);
                          credential activation against the
                          hardware EK is the operator's step, as
                          for deep quotes
    vTPM identity         the certificate's identity extension   chain.ek_extension
                          (`vtpm.verify.ekident`) names the
                          bundle's group and a permitted label,
                          and the policy's vTPM uuid / label

Checks:
    chain.ca_cert       the bundle carries a group CA; its certificate parses, is self-issued
                        and self-signed, CA:TRUE with keyCertSign, and its key is `ca_public`
    chain.certify       the TPMS_ATTEST has TPM_GENERATED_VALUE, type TPM_ST_ATTEST_CERTIFY,
                        certifies name(ca_public), its qualifiedSigner is the AK's, its
                        extraData is `certify_qualifying_data(ca certificate)`, it is signed by
                        the bundle's AK; and `ca_public` is a fixedTPM, sensitiveDataOrigin
                        signing key that cannot decrypt
    chain.ak            the bundle's AK is an attestation key named as the bundle says, and its
                        configuration quote verifies
    chain.ek_cert       the EK certificate is issued by the CA certificate's subject and
                        signed by the CA key, inside its validity period, not a CA, and (when it
                        has an extendedKeyUsage) an EK certificate (2.23.133.8.1)
    chain.ek_extension  the vTPM identity extension is present, of an EK kind ("ek-..."), its
                        group is the bundle's, the
                        group permits its label; with a policy, its uuid/label/group are the
                        expected ones

The bundle's group CA, JSON (`"ca"` of a vtpm-group-bundle/1, null for a group without CA):
    {"public": TPM2B_PUBLIC, "certificate": DER, "certify_attest": TPMS_ATTEST,
     "certify_signature": TPMT_SIGNATURE}   all lowercase hex
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from vtpm.errors import VerifyError
from vtpm.tpm.attest import (
    MAX_NAME,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST,
    parse_attest,
    parse_signature,
)
from vtpm.tpm.constants import TPMA_OBJECT
from vtpm.tpm.ekcert import VtpmIdentity, find_identity
from vtpm.tpm.public import TpmPublic, parse_public
from vtpm.tpm.reader import Reader
from vtpm.verify import quote
from vtpm.verify.bundle import GroupInfo, check_bundle_ak, check_config_quote
from vtpm.verify.expected import Expected
from vtpm.verify.verdict import Check, Verdict
from vtpm.wire.evidence import Bundle

EK_CERTIFICATE_EKU = x509.ObjectIdentifier("2.23.133.8.1")
CA_KEY_REQUIRED = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.SIGN_ENCRYPT
CA_KEY_FORBIDDEN = TPMA_OBJECT.DECRYPT
MAX_CERTIFICATE = 16384


def certify_qualifying_data(ca_certificate: bytes) -> bytes:
    """What the Manager passes as TPM2_Certify's qualifyingData: SHA-256 of the CA
    certificate's DER, so the AK's attestation names this very certificate."""
    return hashlib.sha256(ca_certificate).digest()


@dataclass(frozen=True, slots=True)
class GroupCaEvidence:
    """The bundle's group CA: its TPM public, certificate and the AK's TPM2_Certify of it."""

    public: bytes  # TPM2B_PUBLIC
    certificate: bytes  # DER
    certify_attest: bytes  # TPMS_ATTEST
    certify_signature: bytes  # TPMT_SIGNATURE

    @classmethod
    def from_bundle(cls, bundle: Bundle) -> GroupCaEvidence | None:
        """The bundle's group CA (`vtpm.wire.evidence.Bundle` parses the document's `"ca"`
        object, all four fields or none); None for a group without one."""
        if (
            bundle.ca_public is None
            or bundle.ca_certificate is None
            or bundle.ca_certify_attest is None
            or bundle.ca_certify_signature is None
        ):
            return None
        return cls(
            bundle.ca_public,
            bundle.ca_certificate,
            bundle.ca_certify_attest,
            bundle.ca_certify_signature,
        )


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    """An X.509 certificate, DER or PEM; VerifyError otherwise."""
    if len(data) > MAX_CERTIFICATE:
        raise VerifyError(f"{what}: {len(data)} bytes is too long for a certificate")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise VerifyError(f"{what} is not an X.509 certificate (DER or PEM): {e}") from None


def _spki(key: object) -> bytes:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:
        return b""
    der = serialization.Encoding.DER
    return bytes(public_bytes(der, serialization.PublicFormat.SubjectPublicKeyInfo))


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> str:
    """Why `cert` is not issued and signed by `issuer`; "" when it is."""
    try:
        cert.verify_directly_issued_by(issuer)
    except ValueError as e:
        return f"not issued by {issuer.subject.rfc4514_string() or '(empty name)'}: {e}"
    except InvalidSignature:
        return "its signature does not verify with the group CA key"
    except TypeError as e:
        return f"its signature cannot be checked: {e}"
    return ""


def _extension(cert: x509.Certificate, cls: type[x509.ExtensionType]) -> x509.ExtensionType | None:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None
    except ValueError:
        return None


# the links -----------------------------------------------------------------------------------


def check_ca_cert(
    ca: GroupCaEvidence | None,
) -> tuple[Check, x509.Certificate | None, TpmPublic | None]:
    if ca is None:
        why = "the bundle carries no group CA (ca is null): the group has no CA yet"
        return Check("chain.ca_cert", False, why), None, None
    try:
        public = parse_public(ca.public)
    except VerifyError as e:
        return Check("chain.ca_cert", False, f"ca.public does not parse: {e}"), None, None
    try:
        cert = load_certificate(ca.certificate, "ca.certificate")
    except VerifyError as e:
        return Check("chain.ca_cert", False, str(e)), None, public
    problems = []
    if cert.issuer != cert.subject:
        problems.append("it is not self-issued (issuer is not its subject)")
    else:
        why = _signed_by(cert, cert)
        if why:
            problems.append(f"it is not self-signed: {why}")
    constraints = _extension(cert, x509.BasicConstraints)
    if not isinstance(constraints, x509.BasicConstraints) or not constraints.ca:
        problems.append("it is not a CA certificate (basicConstraints CA:TRUE missing)")
    usage = _extension(cert, x509.KeyUsage)
    if isinstance(usage, x509.KeyUsage) and not usage.key_cert_sign:
        problems.append("its keyUsage lacks keyCertSign")
    if not hmac.compare_digest(_spki(cert.public_key()), _spki(public.key)):
        problems.append("its key is not the bundle's ca.public")
    if problems:
        return (
            Check("chain.ca_cert", False, "the group CA certificate: " + "; ".join(problems)),
            cert,
            public,
        )
    subject = cert.subject.rfc4514_string() or "(empty name)"
    why = f"self-signed CA certificate {subject} for the {public.description} key ca.public"
    return Check("chain.ca_cert", True, why), cert, public


def _certified_name(attested: bytes) -> bytes:
    """TPMS_CERTIFY_INFO.name (the qualifiedName after it is not needed)."""
    r = Reader(attested, "TPMS_CERTIFY_INFO")
    name = r.tpm2b("name", MAX_NAME)
    r.tpm2b("qualifiedName", MAX_NAME)
    r.end()
    return name


def check_certify(ca: GroupCaEvidence | None, public: TpmPublic | None, bundle: Bundle) -> Check:
    if ca is None or public is None:
        return Check("chain.certify", False, "no group CA key to check a TPM2_Certify of")
    try:
        ak = parse_public(bundle.ak_public)
        att = parse_attest(ca.certify_attest)
        sig = parse_signature(ca.certify_signature)
        name = _certified_name(att.attested) if att.type == TPM_ST_ATTEST.CERTIFY else b""
    except VerifyError as e:
        return Check("chain.certify", False, str(e))
    problems = []
    if att.magic != TPM_GENERATED_VALUE:
        problems.append(f"magic is {att.magic:#010x}, not TPM_GENERATED_VALUE (not made by a TPM)")
    if att.type != TPM_ST_ATTEST.CERTIFY:
        problems.append(f"type is {att.type:#06x}, not TPM_ST_ATTEST_CERTIFY (0x8017)")
    elif not hmac.compare_digest(name, public.name):
        problems.append(
            f"it certifies the key named {name.hex()[:24]}..., not ca.public "
            f"({public.name.hex()[:24]}...): a CA key not certified by this AK"
        )
    signer = quote.check_signer(att, ak, bundle.ak_qualified_name)
    if not signer.ok:
        problems.append(signer.reason)
    if not hmac.compare_digest(att.extra_data, certify_qualifying_data(ca.certificate)):
        problems.append("its extraData is not SHA-256 of the group CA certificate")
    bad_sig = quote.signature_problem(ak.key, sig, ca.certify_attest)
    if bad_sig:
        problems.append(f"{bad_sig} (signed by another AK?)")
    lacking = CA_KEY_REQUIRED & ~public.attributes
    extra = CA_KEY_FORBIDDEN & public.attributes
    if lacking or extra:
        missing = ", ".join((f.name or "").lower() for f in TPMA_OBJECT if f & lacking)
        present = ", ".join((f.name or "").lower() for f in TPMA_OBJECT if f & extra)
        problems.append(
            "ca.public is not a signing key fixed to its TPM"
            + (f" (lacks {missing})" if missing else "")
            + (f" (has {present})" if present else "")
        )
    if problems:
        return Check(
            "chain.certify", False, "the AK's TPM2_Certify of the CA key: " + "; ".join(problems)
        )
    return Check(
        "chain.certify",
        True,
        f"the group's AK certified the fixedTPM {public.description} CA key in its TPM "
        f"({sig.scheme})",
    )


def check_ak(bundle: Bundle) -> Check:
    ak_check, ak = check_bundle_ak(bundle)
    if not ak_check.ok:
        return Check("chain.ak", False, ak_check.reason)
    config = check_config_quote(bundle, ak)
    if not config.ok:
        return Check("chain.ak", False, f"the AK's configuration quote: {config.reason}")
    return Check("chain.ak", True, "the bundle's AK signed this group's configuration")


def check_ek_cert(
    ek: x509.Certificate, ca_cert: x509.Certificate | None, now: datetime.datetime | None = None
) -> Check:
    if ca_cert is None:
        return Check("chain.ek_cert", False, "no usable group CA certificate to check against")
    problems = []
    why = _signed_by(ek, ca_cert)
    if why:
        problems.append(why)
    now = now or datetime.datetime.now(datetime.UTC)
    if not ek.not_valid_before_utc <= now <= ek.not_valid_after_utc:
        problems.append(
            f"it is valid {ek.not_valid_before_utc:%Y-%m-%d} to {ek.not_valid_after_utc:%Y-%m-%d}"
        )
    constraints = _extension(ek, x509.BasicConstraints)
    if isinstance(constraints, x509.BasicConstraints) and constraints.ca:
        problems.append("it is a CA certificate, not an EK certificate")
    eku = _extension(ek, x509.ExtendedKeyUsage)
    if isinstance(eku, x509.ExtendedKeyUsage) and EK_CERTIFICATE_EKU not in list(eku):
        kinds = ", ".join(o.dotted_string for o in eku)
        problems.append(f"its extendedKeyUsage ({kinds}) is not an EK certificate's (2.23.133.8.1)")
    if problems:
        return Check("chain.ek_cert", False, "the EK certificate: " + "; ".join(problems))
    return Check("chain.ek_cert", True, "the EK certificate is signed by the group CA key")


def check_ek_extension(
    ek: x509.Certificate, group: GroupInfo, expected: Expected | None
) -> tuple[Check, VtpmIdentity | None]:
    try:
        ident = find_identity(ek)
    except VerifyError as e:
        return Check("chain.ek_extension", False, str(e)), None
    if ident is None:
        return Check(
            "chain.ek_extension", False, "the EK certificate has no vTPM identity extension"
        ), None
    problems = []
    if not ident.kind.startswith("ek-"):
        problems.append(f"it was issued as {ident.kind!r}, not as an EK certificate")
    if ident.group_uuid != group.uuid:
        problems.append(f"its group is {ident.group_uuid}, the bundle's is {group.uuid}")
    elif not group.permits(ident.label):
        problems.append(f"group {group.name or group.uuid} does not permit label {ident.label!r}")
    if expected is not None:
        if expected.vtpm_uuid is not None and ident.vtpm_uuid != expected.vtpm_uuid:
            problems.append(f"it is for vTPM {ident.vtpm_uuid}, expected {expected.vtpm_uuid}")
        if expected.label is not None and ident.label != expected.label:
            problems.append(f"its label is {ident.label!r}, expected {expected.label!r}")
        if expected.group is not None and expected.group not in (group.name, str(group.uuid)):
            problems.append(f"the bundle's group is {group.name}, expected {expected.group}")
    if problems:
        return Check(
            "chain.ek_extension", False, "the vTPM identity: " + "; ".join(problems)
        ), ident
    why = f"vTPM {ident.vtpm_uuid}, label {ident.label!r}, in group {group.name or group.uuid}"
    return Check("chain.ek_extension", True, why), ident


def verify_chain(
    bundle: Bundle,
    ca: GroupCaEvidence | None,
    ek_certificate: bytes,
    expected: Expected | None = None,
    now: datetime.datetime | None = None,
) -> Verdict:
    """Every chain.* check of one EK certificate against a bundle. Raises VerifyError when the
    bundle's group object or the EK certificate does not parse."""
    group = GroupInfo.from_json(bundle.group)
    ek = load_certificate(ek_certificate, "the EK certificate")
    ca_check, ca_cert, public = check_ca_cert(ca)
    checks = [
        check_ak(bundle),
        ca_check,
        check_certify(ca, public, bundle),
        check_ek_cert(ek, ca_cert, now),
        check_ek_extension(ek, group, expected)[0],
    ]
    return Verdict(tuple(checks))
