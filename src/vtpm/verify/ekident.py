"""The TPM name of the key a vTPM EK certificate certifies.

A deep quote carries the vTPM EK's name (nameAlg || H(TPMT_PUBLIC)); a certificate carries only
the SubjectPublicKeyInfo. The name is rebuilt by putting the certificate's key into the TCG EK
Credential Profile template of its algorithm (the unique field of a TCG EK is its public key;
every other field is fixed by the template) and hashing that TPMT_PUBLIC. A name equal to the
signed one means the vTPM's EK is exactly this key with the standard EK attributes and policy.
Templates: L-1 (RSA 2048) and L-2 (ECC P-256), SHA-256, attributes 0x000300B2, PolicyA; H-3
(ECC P-384), SHA-384, 0x000300F2 (adds userWithAuth), PolicyB, AES-256-CFB. (The certificate's
vTPM identity extension is `vtpm.tpm.ekcert`'s.)

Parsing only; malformed bytes raise VerifyError.
"""

from __future__ import annotations

import struct

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vtpm.errors import VerifyError
from vtpm.tpm.constants import TPM_ALG, TPM_ECC_CURVE
from vtpm.tpm.hashes import HASHES

# the TPM name of a certified EK key --------------------------------------------------------

POLICY_A_SHA256 = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
POLICY_B_SHA384 = bytes.fromhex(
    "b26e7d28d11a50bc53d882bcf5fd3a1a074148bb35d3b4e4cb1c0ad9bde419ca"
    "cb47ba09699646150f9fc000f3f80e12"
)
ATTRS_A = 0x000300B2  # fixedTPM fixedParent sensitiveDataOrigin adminWithPolicy restricted decrypt
ATTRS_B = ATTRS_A | 0x00000040  # + userWithAuth (high-range templates)


def _b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def ek_template_public(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> tuple[str, bytes]:
    """(template name, marshalled TPMT_PUBLIC) of a TCG EK with public key `key`."""
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        if key.key_size != 2048 or numbers.e != 65537:
            raise VerifyError(f"an RSA-{key.key_size} EK has no TCG template here (RSA-2048)")
        head = struct.pack(">HHI", TPM_ALG.RSA, TPM_ALG.SHA256, ATTRS_A) + _b(POLICY_A_SHA256)
        params = struct.pack(">HHH", TPM_ALG.AES, 128, TPM_ALG.CFB)
        params += struct.pack(">HHI", TPM_ALG.NULL, 2048, 0)
        return "L-1 (RSA 2048)", head + params + _b(numbers.n.to_bytes(256, "big"))
    if isinstance(key, ec.EllipticCurvePublicKey):
        point = key.public_numbers()
        if isinstance(key.curve, ec.SECP256R1):
            name, name_alg, attrs, policy = (
                "L-2 (ECC P-256)",
                TPM_ALG.SHA256,
                ATTRS_A,
                POLICY_A_SHA256,
            )
            bits, curve, size = 128, TPM_ECC_CURVE.NIST_P256, 32
        elif isinstance(key.curve, ec.SECP384R1):
            name, name_alg, attrs, policy = (
                "H-3 (ECC P-384)",
                TPM_ALG.SHA384,
                ATTRS_B,
                POLICY_B_SHA384,
            )
            bits, curve, size = 256, TPM_ECC_CURVE.NIST_P384, 48
        else:
            raise VerifyError(f"an ECC {key.curve.name} EK has no TCG template here")
        head = struct.pack(">HHI", TPM_ALG.ECC, name_alg, attrs) + _b(policy)
        params = struct.pack(">HHH", TPM_ALG.AES, bits, TPM_ALG.CFB)
        params += struct.pack(">HHH", TPM_ALG.NULL, curve, TPM_ALG.NULL)
        unique = _b(point.x.to_bytes(size, "big")) + _b(point.y.to_bytes(size, "big"))
        return name, head + params + unique
    raise VerifyError(f"an EK certificate's key is {type(key).__name__}, not RSA or ECC")


def ek_name(cert: x509.Certificate) -> tuple[str, bytes]:
    """(template name, TPM name) of the EK the certificate certifies, as a TCG EK."""
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise VerifyError(f"an EK certificate's key is {type(key).__name__}, not RSA or ECC")
    template, tpmt = ek_template_public(key)
    name_alg = int.from_bytes(tpmt[2:4], "big")
    return template, struct.pack(">H", name_alg) + HASHES[name_alg].digest(tpmt)
