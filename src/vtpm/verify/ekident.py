"""The TPM name of the key a vTPM EK certificate certifies.

A deep quote carries the vTPM EK's name (nameAlg || H(TPMT_PUBLIC)); a certificate carries only
the SubjectPublicKeyInfo. The name is rebuilt by putting the certificate's key into the TCG EK
Credential Profile template of its algorithm (the unique field of a TCG EK is its public key;
every other field is fixed by the template) and hashing that TPMT_PUBLIC. A name equal to the
signed one means the vTPM's EK is exactly this key with the standard EK attributes and policy.
The templates are `vtpm.tpm.ektemplates`' (L-1, L-2, H-3); the certificate's vTPM identity
extension is `vtpm.tpm.ekcert`'s.

Parsing only; malformed bytes raise VerifyError.
"""

from __future__ import annotations

import struct

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vtpm.errors import VerifyError
from vtpm.tpm import ektemplates
from vtpm.tpm.hashes import HASHES

# the TPM name of a certified EK key --------------------------------------------------------


def _b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def ek_template_public(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> tuple[str, bytes]:
    """(template name, marshalled TPMT_PUBLIC) of a TCG EK with public key `key`."""
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        if key.key_size != 2048 or numbers.e != 65537:
            raise VerifyError(f"an RSA-{key.key_size} EK has no TCG template here (RSA-2048)")
        spec = ektemplates.RSA2048
        return spec.profile_name, spec.public_area(_b(numbers.n.to_bytes(256, "big")))
    if isinstance(key, ec.EllipticCurvePublicKey):
        point = key.public_numbers()
        if isinstance(key.curve, ec.SECP256R1):
            spec, size = ektemplates.ECC256, 32
        elif isinstance(key.curve, ec.SECP384R1):
            spec, size = ektemplates.ECC384, 48
        else:
            raise VerifyError(f"an ECC {key.curve.name} EK has no TCG template here")
        unique = _b(point.x.to_bytes(size, "big")) + _b(point.y.to_bytes(size, "big"))
        return spec.profile_name, spec.public_area(unique)
    raise VerifyError(f"an EK certificate's key is {type(key).__name__}, not RSA or ECC")


def ek_name(cert: x509.Certificate) -> tuple[str, bytes]:
    """(template name, TPM name) of the EK the certificate certifies, as a TCG EK."""
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise VerifyError(f"an EK certificate's key is {type(key).__name__}, not RSA or ECC")
    template, tpmt = ek_template_public(key)
    name_alg = int.from_bytes(tpmt[2:4], "big")
    return template, struct.pack(">H", name_alg) + HASHES[name_alg].digest(tpmt)
