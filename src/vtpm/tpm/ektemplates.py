"""The TCG endorsement keys a vTPM carries: templates, persistent handles and NV indices.

TCG EK Credential Profile for TPM Family 2.0 (version 2.5), section 2.2.1 (templates) and
2.2.1.4 / 2.2.2 (handles and NV indices):
- L-1, RSA 2048 (low range): nameAlg SHA-256, attributes 0x000300B2 (fixedTPM, fixedParent,
  sensitiveDataOrigin, adminWithPolicy, restricted, decrypt), authPolicy PolicyA (SHA-256),
  AES-128-CFB, no scheme, 2048 bits, exponent 0 (65537), unique 256 zero bytes.
  Persistent 0x81010001, certificate in NV 0x01C00002.
- L-2, ECC NIST P-256 (low range): as L-1 but ECC, no KDF, unique x and y 32 zero bytes each.
  Persistent 0x8101000A, certificate in NV 0x01C0000A.
- H-3, ECC NIST P-384 (high range): nameAlg SHA-384, attributes 0x000300F2 (userWithAuth
  too), authPolicy PolicyB (SHA-384), AES-256-CFB, no scheme, no KDF, unique x and y empty.
  Persistent 0x81010016, certificate in NV 0x01C00016.
PolicyA = PolicySecret(TPM_RH_ENDORSEMENT); PolicyB = PolicyOR(PolicyA, PolicyC), PolicyC a
PolicyAuthorizeNV on the profile's index. The digests are the profile's published values
(`tpm2_createek -G rsa|ecc|ecc384` makes the very same keys, which the tests check).

The platform certificate (TCG Platform Attribute Credential Profile) lives in NV 0x01C08000.
Pure data and marshalling: no I/O. These are the one home of the EK templates; the Manager's
hardware-TPM code imports `RSA2048.template` from here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from vtpm.tpm.constants import TPM_ALG, TPM_ECC_CURVE, TPMA_OBJECT

POLICY_A_SHA256: Final = bytes.fromhex(
    "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
)
POLICY_B_SHA384: Final = bytes.fromhex(
    "b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4cb1c0ad9bde419ca"
    "cb47ba09699646150f9fc000f3f80e12"
)

LOW_RANGE_ATTRIBUTES: Final = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.ADMINWITHPOLICY
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)  # 0x000300B2
HIGH_RANGE_ATTRIBUTES: Final = LOW_RANGE_ATTRIBUTES | TPMA_OBJECT.USERWITHAUTH  # 0x000300F2

PLATFORM_CERT_INDEX: Final = 0x01C08000
PLATFORM: Final = "platform"


def _b(data: bytes) -> bytes:
    """A TPM2B: u16 size | bytes."""
    return struct.pack(">H", len(data)) + data


def _head(name_alg: int, attrs: int, policy: bytes, alg: int) -> bytes:
    return struct.pack(">HHI", alg, name_alg, attrs) + _b(policy)


def _rsa_template() -> bytes:
    head = _head(TPM_ALG.SHA256, LOW_RANGE_ATTRIBUTES, POLICY_A_SHA256, TPM_ALG.RSA)
    # TPMS_RSA_PARMS: symmetric AES 128 CFB, scheme NULL, keyBits, exponent; unique
    parms = struct.pack(">HHHHHI", TPM_ALG.AES, 128, TPM_ALG.CFB, TPM_ALG.NULL, 2048, 0)
    return head + parms + _b(bytes(256))


def _ecc_template(
    name_alg: int, attrs: int, policy: bytes, sym_bits: int, curve: int, unique: int
) -> bytes:
    head = _head(name_alg, attrs, policy, TPM_ALG.ECC)
    # TPMS_ECC_PARMS: symmetric, scheme NULL, curveID, kdf NULL; unique TPMS_ECC_POINT
    parms = struct.pack(">HHHHHH", TPM_ALG.AES, sym_bits, TPM_ALG.CFB, TPM_ALG.NULL, curve, 0x10)
    return head + parms + _b(bytes(unique)) + _b(bytes(unique))


@dataclass(frozen=True, slots=True)
class EkSpec:
    """One EK of the profile: its kind name (as certificates are asked for), marshalled
    TPMT_PUBLIC template, persistent handle and certificate NV index."""

    kind: str
    option: str  # as `--ek` spells it
    template: bytes
    persistent: int
    cert_index: int
    profile_name: str  # the template's name in the profile, e.g. "L-1 (RSA 2048)"
    unique_size: int  # bytes of the template's unique field (its placeholder), at the end

    def public_area(self, unique: bytes) -> bytes:
        """The TPMT_PUBLIC of the EK this template makes whose unique field (the public key:
        TPM2B modulus, or TPMS_ECC_POINT) is `unique`."""
        return self.template[: len(self.template) - self.unique_size] + unique


RSA2048: Final = EkSpec(
    "ek-rsa2048", "rsa2048", _rsa_template(), 0x81010001, 0x01C00002, "L-1 (RSA 2048)", 2 + 256
)
ECC256: Final = EkSpec(
    "ek-ecc256",
    "ecc256",
    _ecc_template(
        TPM_ALG.SHA256,
        LOW_RANGE_ATTRIBUTES,
        POLICY_A_SHA256,
        128,
        TPM_ECC_CURVE.NIST_P256,
        32,
    ),
    0x8101000A,
    0x01C0000A,
    "L-2 (ECC P-256)",
    2 * (2 + 32),
)
ECC384: Final = EkSpec(
    "ek-ecc384",
    "ecc384",
    _ecc_template(
        TPM_ALG.SHA384,
        HIGH_RANGE_ATTRIBUTES,
        POLICY_B_SHA384,
        256,
        TPM_ECC_CURVE.NIST_P384,
        0,
    ),
    0x81010016,
    0x01C00016,
    "H-3 (ECC P-384)",
    2 * 2,
)
EKS: Final = {e.option: e for e in (RSA2048, ECC256, ECC384)}
"""`--ek` option value -> EK."""
DEFAULT_EKS: Final = ("rsa2048", "ecc256")
"""A Manager's new TPM 2.0 vTPM gets these, and a platform certificate."""
DEFAULT_PROVISION: Final = (*DEFAULT_EKS, PLATFORM)
"""What `vtpm new` provisions unless told otherwise (`--ek` names)."""
CERT_KINDS: Final = (RSA2048.kind, ECC256.kind, ECC384.kind, PLATFORM)
"""The certificates a vTPM asks its group CA for (the IPC's CertRequest.kind)."""
