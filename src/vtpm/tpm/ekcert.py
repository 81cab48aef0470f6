"""What a vTPM's EK and platform certificates say beyond plain X.509: the TCG attributes and the
vTPM identity extension, as OIDs and DER values (pure; the Manager writes them, a verifier
reads them).

TCG EK Credential Profile for TPM Family 2.0 (3.2): the subject may be empty, then the
subjectAltName is critical and holds a directoryName with tcg-at-tpmManufacturer (2.23.133.2.1),
tcg-at-tpmModel (2.23.133.2.2) and tcg-at-tpmVersion (2.23.133.2.3); subjectDirectoryAttributes
(2.5.29.9) carries tcg-at-tpmSpecification (2.23.133.2.16); extKeyUsage tcg-kp-EKCertificate
(2.23.133.8.1). A platform certificate (TCG Platform Attribute Credential Profile) names
tcg-at-platformManufacturerStr / Model / Version (2.23.133.5.1.1 / .4 / .5) and has extKeyUsage
tcg-kp-PlatformCertificate (2.23.133.8.2).

The vTPM identity extension (non-critical), under the UUID arc 2.25 (ITU-T X.667: an OID
anyone may take without registration, made from a random UUID, here
dbdc49f9-8074-4a2d-82af-753e775e2b42):

    id-vtpm-identity OBJECT IDENTIFIER ::= { 2 25 292244736769242437814819020044331002690 }
    VtpmIdentity ::= SEQUENCE {
        version    INTEGER (1),
        vtpmUuid   OCTET STRING (SIZE (16)),   -- RFC 4122 byte order
        groupUuid  OCTET STRING (SIZE (16)),
        label      UTF8String,                 -- user:role:type
        kind       UTF8String }                -- "ek-rsa2048", "ek-ecc256", "ek-ecc384", "platform"
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from cryptography import x509

from vtpm.errors import VerifyError
from vtpm.tpm import der, ektemplates

# TCG EK Credential Profile / TCG OID registry
OID_TPM_MANUFACTURER = "2.23.133.2.1"
OID_TPM_MODEL = "2.23.133.2.2"
OID_TPM_VERSION = "2.23.133.2.3"
OID_TPM_SPECIFICATION = "2.23.133.2.16"
OID_PLATFORM_MANUFACTURER = "2.23.133.5.1.1"
OID_PLATFORM_MODEL = "2.23.133.5.1.4"
OID_PLATFORM_VERSION = "2.23.133.5.1.5"
OID_KP_EK_CERTIFICATE = "2.23.133.8.1"
OID_KP_PLATFORM_CERTIFICATE = "2.23.133.8.2"
OID_SUBJECT_DIRECTORY_ATTRIBUTES = "2.5.29.9"
OID_VTPM_IDENTITY = "2.25.292244736769242437814819020044331002690"

IDENTITY_VERSION = 1
MAX_LABEL = 256  # bytes of a label in the identity extension
MAX_KIND = 32
CERT_KINDS = ektemplates.CERT_KINDS  # the kinds of certificate a group CA issues

# The TPM the certificates describe: libtpms, as every vTPM runs it. Manufacturer and version
# are "id:" + the 8 hex digits of TPM_PT_MANUFACTURER and TPM_PT_FIRMWARE_VERSION_1, the model
# TPM_PT_VENDOR_STRING_1..2, as `tpm2_getcap properties-fixed` reports them in a vTPM (libtpms
# 0.9: 0x49424D00 "IBM", "SW   TPM", 0x20191023; TPM_PT_REVISION 0xA4 = 1.64).
TPM_MANUFACTURER = "id:49424D00"
TPM_MODEL = "SW   TPM"
TPM_VERSION = "id:20191023"
TPM_FAMILY = "2.0"
TPM_LEVEL = 0
TPM_REVISION = 164
PLATFORM_MANUFACTURER = "vtpm"
PLATFORM_MODEL = "vtpm Manager vTPM"
PLATFORM_VERSION = "1"


@dataclass(frozen=True, slots=True)
class VtpmIdentity:
    """Which vTPM of which group a certificate was issued to."""

    vtpm_uuid: uuid.UUID
    group_uuid: uuid.UUID
    label: str
    kind: str

    def encode(self) -> bytes:
        """The extension's value (VtpmIdentity, DER)."""
        return der.sequence(
            der.integer(IDENTITY_VERSION),
            der.octet_string(self.vtpm_uuid.bytes),
            der.octet_string(self.group_uuid.bytes),
            der.utf8_string(self.label),
            der.utf8_string(self.kind),
        )

    @classmethod
    def decode(cls, value: bytes) -> VtpmIdentity:
        """Parse the extension's value; VerifyError if it is not a VtpmIdentity of version 1."""
        what = "vTPM identity extension"
        parts = der.elements(der.expect(der.split(value, what), der.SEQUENCE, what), what)
        if len(parts) != 5:
            raise VerifyError(f"{what}: {len(parts)} fields, expected 5")
        version = der.read_integer(parts[0], f"{what} version")
        if version != IDENTITY_VERSION:
            raise VerifyError(f"{what}: version {version}, this verifier reads 1")
        uuids = []
        for p, name in ((parts[1], "vtpmUuid"), (parts[2], "groupUuid")):
            raw = der.expect(p, der.OCTET_STRING, f"{what} {name}")
            if len(raw) != 16:
                raise VerifyError(f"{what}: {name} is {len(raw)} bytes, not 16")
            uuids.append(uuid.UUID(bytes=raw))
        label = der.read_utf8(parts[3], f"{what} label")
        kind = der.read_utf8(parts[4], f"{what} kind")
        if not 1 <= len(label.encode()) <= MAX_LABEL:
            raise VerifyError(f"{what}: a label is 1..{MAX_LABEL} bytes")
        if len(kind.encode()) > MAX_KIND:
            raise VerifyError(f"{what}: a kind is at most {MAX_KIND} bytes")
        return cls(uuids[0], uuids[1], label, kind)


def tpm_specification() -> bytes:
    """subjectDirectoryAttributes' value with tcg-at-tpmSpecification:
    SEQUENCE OF Attribute { type, SET OF TPMSpecification { family, level, revision } }."""
    spec = der.sequence(
        der.utf8_string(TPM_FAMILY), der.integer(TPM_LEVEL), der.integer(TPM_REVISION)
    )
    return der.sequence(der.sequence(der.oid(OID_TPM_SPECIFICATION), der.set_of(spec)))


def identity_of(cert: x509.Certificate) -> VtpmIdentity:
    """The vTPM identity extension of `cert`; VerifyError if it has none or it is malformed."""
    found = find_identity(cert)
    if found is None:
        raise VerifyError("the certificate has no vTPM identity extension")
    return found


def find_identity(cert: x509.Certificate) -> VtpmIdentity | None:
    """The vTPM identity extension of `cert`, None when it has none; VerifyError when it is
    malformed (or the certificate's extensions do not parse)."""
    try:
        ext = cert.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID_VTPM_IDENTITY))
    except x509.ExtensionNotFound:
        return None
    except ValueError as e:  # duplicate or malformed extensions
        raise VerifyError(f"the certificate's extensions do not parse: {e}") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise VerifyError("the vTPM identity extension does not parse")
    return VtpmIdentity.decode(value.value)
