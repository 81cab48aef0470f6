"""TPM2B_PUBLIC / TPMT_PUBLIC of RSA and ECC keys, and the names computed over them.

TCG TPM 2.0 Library, Part 2 (Structures): 12.2 TPMT_PUBLIC with TPMS_RSA_PARMS /
TPMS_ECC_PARMS, 11.1 TPMT_SYM_DEF_OBJECT, 8.3 TPMA_OBJECT. Part 1, 16: an object's name is
nameAlg || H_nameAlg(marshalled TPMT_PUBLIC), its qualified name nameAlg || H(parent QN || name).

Rules:
- Parsing only: no I/O, no judgement (whether a key may serve as an AK is the verifier's
  question). Bytes that do not form the structure raise one error, `VerifyError`, naming the
  field and the offset; trailing bytes are refused.
- Keys: RSA (1024..4096 bits) and ECC on NIST P-256/P-384/P-521, the ones attestation keys and
  endorsement keys use. Other object types are refused with a clear message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vtpm.tpm.constants import TPM_ALG, TPM_ECC_CURVE, TPMA_OBJECT
from vtpm.tpm.hashes import HASHES, MAX_DIGEST, hash_name
from vtpm.tpm.reader import Reader

_CURVES: dict[int, tuple[ec.EllipticCurve, int]] = {
    TPM_ECC_CURVE.NIST_P256: (ec.SECP256R1(), 32),
    TPM_ECC_CURVE.NIST_P384: (ec.SECP384R1(), 48),
    TPM_ECC_CURVE.NIST_P521: (ec.SECP521R1(), 66),
}
RSA_KEY_BITS = frozenset({1024, 2048, 3072, 4096})
MAX_RSA_BYTES = 512  # a 4096-bit modulus (or signature)
MAX_ECC_BYTES = 66  # a P-521 coordinate
MAX_PUBLIC = 4096  # a TPMT_PUBLIC we read (the largest real one is a few hundred bytes)


@dataclass(frozen=True, slots=True)
class SymDef:
    alg: int
    key_bits: int = 0
    mode: int = TPM_ALG.NULL


@dataclass(frozen=True, slots=True)
class Scheme:
    alg: int
    hash_alg: int = TPM_ALG.NULL


PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


@dataclass(frozen=True, slots=True)
class TpmPublic:
    """A parsed TPMT_PUBLIC of an RSA or ECC key, with its cryptography public key."""

    type: int
    name_alg: int
    attributes: TPMA_OBJECT
    auth_policy: bytes
    symmetric: SymDef
    scheme: Scheme
    key: PublicKey
    key_bits: int  # RSA modulus bits, or the curve's field size
    curve: int  # TPM_ECC_CURVE, 0 for RSA
    tpmt: bytes  # the marshalled TPMT_PUBLIC the name is computed over

    @property
    def name(self) -> bytes:
        """nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        return struct.pack(">H", self.name_alg) + HASHES[self.name_alg].digest(self.tpmt)

    def qualified_name(self, parent_qualified_name: bytes) -> bytes:
        """QN = nameAlg || H_nameAlg(parent QN || name); a primary's parent QN is the hierarchy
        handle (4 bytes, e.g. 0x4000000B for the endorsement hierarchy)."""
        return struct.pack(">H", self.name_alg) + HASHES[self.name_alg].digest(
            parent_qualified_name, self.name
        )

    @property
    def description(self) -> str:
        if self.type == TPM_ALG.RSA:
            return f"RSA-{self.key_bits}"
        return f"ECC {TPM_ECC_CURVE(self.curve).name}"


def _sym_def(r: Reader) -> SymDef:
    alg = r.u16("symmetric.algorithm")
    if alg == TPM_ALG.NULL:
        return SymDef(alg)
    if alg == TPM_ALG.XOR:
        return SymDef(alg, 0, r.u16("symmetric.hash"))
    return SymDef(alg, r.u16("symmetric.keyBits"), r.u16("symmetric.mode"))


def _scheme(r: Reader) -> Scheme:
    alg = r.u16("scheme.scheme")
    if alg in (TPM_ALG.NULL, TPM_ALG.RSAES):  # RSAES has no details
        return Scheme(alg)
    hash_alg = r.u16("scheme.hashAlg")
    if alg == TPM_ALG.ECDAA:
        r.u16("scheme.count")
    return Scheme(alg, hash_alg)


def _rsa_key(r: Reader) -> tuple[PublicKey, int]:
    key_bits = r.u16("keyBits")
    exponent = r.u32("exponent") or 65537
    modulus = r.tpm2b("unique.rsa", MAX_RSA_BYTES)
    if key_bits not in RSA_KEY_BITS:
        raise r.fail(f"RSA key size {key_bits} is not supported")
    if len(modulus) * 8 != key_bits or not modulus[0] & 0x80:
        raise r.fail(f"the RSA modulus is not {key_bits} bits")
    if exponent < 3 or not exponent & 1:
        raise r.fail(f"the RSA exponent {exponent} is not valid")
    try:
        key = rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
    except ValueError as e:
        raise r.fail(f"the RSA public key is not valid: {e}") from None
    return key, key_bits


def _ecc_key(r: Reader) -> tuple[PublicKey, int, int]:
    curve_id = r.u16("curveID")
    kdf = r.u16("kdf.scheme")
    if kdf != TPM_ALG.NULL:
        r.u16("kdf.hashAlg")
    x = r.tpm2b("unique.ecc.x", MAX_ECC_BYTES)
    y = r.tpm2b("unique.ecc.y", MAX_ECC_BYTES)
    found = _CURVES.get(curve_id)
    if found is None:
        raise r.fail(f"ECC curve {curve_id:#06x} is not supported")
    curve, size = found
    if len(x) > size or len(y) > size:
        raise r.fail(f"an ECC point coordinate on this curve is at most {size} bytes")
    try:
        numbers = ec.EllipticCurvePublicNumbers(
            int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve
        )
        key = numbers.public_key()
    except ValueError:
        raise r.fail("the ECC point is not on the curve") from None
    return key, curve.key_size, curve_id


def parse_tpmt_public(data: bytes) -> TpmPublic:
    """A marshalled TPMT_PUBLIC of an RSA or ECC key, nothing after it."""
    r = Reader(data, "TPMT_PUBLIC")
    kind = r.u16("type")
    name_alg = r.u16("nameAlg")
    attributes = TPMA_OBJECT(r.u32("objectAttributes"))
    auth_policy = r.tpm2b("authPolicy", MAX_DIGEST)
    if kind not in (TPM_ALG.RSA, TPM_ALG.ECC):
        raise r.fail(f"object type {hash_name(kind)} is not an RSA or ECC key")
    if name_alg not in HASHES:
        raise r.fail(f"nameAlg {hash_name(name_alg)} is not supported")
    symmetric = _sym_def(r)
    scheme = _scheme(r)
    curve = 0
    if kind == TPM_ALG.RSA:
        key, bits = _rsa_key(r)
    else:
        key, bits, curve = _ecc_key(r)
    r.end()
    return TpmPublic(
        kind, name_alg, attributes, auth_policy, symmetric, scheme, key, bits, curve, bytes(data)
    )


def parse_public(data: bytes) -> TpmPublic:
    """A marshalled TPM2B_PUBLIC (`tpm2_createak -u`, ESAPI `TPM2B_PUBLIC.marshal()`)."""
    r = Reader(data, "TPM2B_PUBLIC")
    inner = r.tpm2b("publicArea", MAX_PUBLIC)
    r.end()
    return parse_tpmt_public(inner)
