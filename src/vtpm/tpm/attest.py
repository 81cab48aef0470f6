"""The TPM 2.0 structures a verifier reads: TPMS_ATTEST, TPMT_SIGNATURE and TPM2B_PUBLIC.

TCG TPM 2.0 Library, Part 2 (Structures): 10.9.7 TPMS_PCR_SELECTION and 10.9.8 TPML_PCR_SELECTION,
10.12 TPMS_CLOCK_INFO, TPMS_QUOTE_INFO, TPMS_ATTEST; 11.3 TPMT_SIGNATURE; 12.2 TPMT_PUBLIC with
TPMS_RSA_PARMS / TPMS_ECC_PARMS; 8.3 TPMA_OBJECT. Part 1, 16: an object's name is
nameAlg || H_nameAlg(marshalled TPMT_PUBLIC).

Rules:
- Parsing only: no I/O, no judgement. A wrong magic or attestation type parses (the verifier
  reports it as a failed check); bytes that do not form the structure raise one error,
  `VerifyError`, naming the structure, the field and the offset. Nothing else escapes.
- Every length read from the input is bounded by the spec's maximum before it is used, and
  trailing bytes after a structure are refused.
- Keys: RSA (1024..4096 bits) and ECC on NIST P-256/P-384/P-521, the ones attestation keys and
  endorsement keys use. Other object types are refused with a clear message.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vtpm.errors import VerifyError
from vtpm.tpm.constants import TPM_ALG

TPM_GENERATED_VALUE = 0xFF544347


class TPM_ST_ATTEST(enum.IntEnum):  # noqa: N801
    NV = 0x8014
    COMMAND_AUDIT = 0x8015
    SESSION_AUDIT = 0x8016
    CERTIFY = 0x8017
    QUOTE = 0x8018
    TIME = 0x8019
    CREATION = 0x801A
    NV_DIGEST = 0x801C


class TPM_ECC_CURVE(enum.IntEnum):  # noqa: N801
    NIST_P256 = 0x0003
    NIST_P384 = 0x0004
    NIST_P521 = 0x0005


class TPMA_OBJECT(enum.IntFlag):  # noqa: N801
    FIXEDTPM = 1 << 1
    STCLEAR = 1 << 2
    FIXEDPARENT = 1 << 4
    SENSITIVEDATAORIGIN = 1 << 5
    USERWITHAUTH = 1 << 6
    ADMINWITHPOLICY = 1 << 7
    NODA = 1 << 10
    ENCRYPTEDDUPLICATION = 1 << 11
    RESTRICTED = 1 << 16
    DECRYPT = 1 << 17
    SIGN_ENCRYPT = 1 << 18
    X509SIGN = 1 << 19


@dataclass(frozen=True, slots=True)
class HashInfo:
    alg: int
    name: str
    size: int

    def new(self) -> hashes.HashAlgorithm:
        return _HASH_CLASSES[self.name]()

    def digest(self, *parts: bytes) -> bytes:
        h = hashlib.new(self.name)
        for p in parts:
            h.update(p)
        return h.digest()


_HASH_CLASSES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
HASHES: dict[int, HashInfo] = {
    TPM_ALG.SHA1: HashInfo(TPM_ALG.SHA1, "sha1", 20),
    TPM_ALG.SHA256: HashInfo(TPM_ALG.SHA256, "sha256", 32),
    TPM_ALG.SHA384: HashInfo(TPM_ALG.SHA384, "sha384", 48),
    TPM_ALG.SHA512: HashInfo(TPM_ALG.SHA512, "sha512", 64),
}
HASH_BY_NAME: dict[str, HashInfo] = {h.name: h for h in HASHES.values()}

_CURVES: dict[int, tuple[ec.EllipticCurve, int]] = {
    TPM_ECC_CURVE.NIST_P256: (ec.SECP256R1(), 32),
    TPM_ECC_CURVE.NIST_P384: (ec.SECP384R1(), 48),
    TPM_ECC_CURVE.NIST_P521: (ec.SECP521R1(), 66),
}
RSA_KEY_BITS = frozenset({1024, 2048, 3072, 4096})

# Spec maxima (Part 2, with the largest digest being SHA-512)
MAX_DIGEST = 64
MAX_NAME = 2 + MAX_DIGEST  # TPMU_NAME: a TPMT_HA
MAX_DATA = 2 + MAX_DIGEST  # TPM2B_DATA holds a TPMT_HA
MAX_PCR_BANKS = 16  # HASH_COUNT bound of TPML_PCR_SELECTION
MAX_SIZEOF_SELECT = 32
MAX_RSA_BYTES = 512
MAX_ECC_BYTES = 66
MAX_ATTEST = 2048


def hash_name(alg: int) -> str:
    info = HASHES.get(alg)
    if info is not None:
        return info.name
    try:
        return TPM_ALG(alg).name.lower()
    except ValueError:
        return f"{alg:#06x}"


class _Reader:
    """Bounded big-endian reader; every defect is a VerifyError naming `what`."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise VerifyError(f"{what}: expected bytes, not {type(data).__name__}")
        self._data = bytes(data)
        self._pos = 0
        self._what = what

    @property
    def pos(self) -> int:
        return self._pos

    def fail(self, message: str) -> VerifyError:
        return VerifyError(f"{self._what}: {message}")

    def take(self, n: int, field: str) -> bytes:
        if n > len(self._data) - self._pos:
            raise self.fail(f"truncated at offset {self._pos} reading {field}")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "big")

    def u64(self, field: str) -> int:
        return int.from_bytes(self.take(8, field), "big")

    def tpm2b(self, field: str, maximum: int) -> bytes:
        size = self.u16(f"{field}.size")
        if size > maximum:
            raise self.fail(f"{field} is {size} bytes; at most {maximum} are allowed")
        return self.take(size, field)

    def end(self) -> None:
        extra = len(self._data) - self._pos
        if extra:
            raise self.fail(f"{extra} bytes after the end of the structure")


# TPMS_ATTEST ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a bank and the PCR indices its bitmap selects, ascending."""

    hash_alg: int
    indices: tuple[int, ...]

    @property
    def bank(self) -> str:
        return hash_name(self.hash_alg)

    def __str__(self) -> str:
        return f"{self.bank}:{','.join(map(str, self.indices)) or '(none)'}"


@dataclass(frozen=True, slots=True)
class ClockInfo:
    clock: int  # milliseconds the TPM has been powered, persisted now and then
    reset_count: int
    restart_count: int
    safe: bool


@dataclass(frozen=True, slots=True)
class Attest:
    """A parsed TPMS_ATTEST. `pcr_select`/`pcr_digest` are set when the body is a
    TPMS_QUOTE_INFO: always for a quote, and for another type whose body reads as one."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    attested: bytes  # the TPMU_ATTEST body, raw
    pcr_select: tuple[PcrSelection, ...] | None
    pcr_digest: bytes | None

    @property
    def is_quote(self) -> bool:
        return self.type == TPM_ST_ATTEST.QUOTE


def _pcr_selection(r: _Reader) -> tuple[PcrSelection, ...]:
    count = r.u32("pcrSelect.count")
    if count > MAX_PCR_BANKS:
        raise r.fail(f"pcrSelect lists {count} banks; at most {MAX_PCR_BANKS} are allowed")
    out = []
    for n in range(count):
        alg = r.u16(f"pcrSelections[{n}].hash")
        size = r.u8(f"pcrSelections[{n}].sizeofSelect")
        if size > MAX_SIZEOF_SELECT:
            raise r.fail(f"pcrSelections[{n}].sizeofSelect is {size}")
        bitmap = r.take(size, f"pcrSelections[{n}].pcrSelect")
        indices = tuple(
            8 * i + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1
        )
        out.append(PcrSelection(alg, indices))
    return tuple(out)


def parse_pcr_selection(data: bytes) -> tuple[PcrSelection, ...]:
    """A marshalled TPML_PCR_SELECTION, nothing after it."""
    r = _Reader(data, "TPML_PCR_SELECTION")
    out = _pcr_selection(r)
    r.end()
    return out


def _quote_info(r: _Reader) -> tuple[tuple[PcrSelection, ...], bytes]:
    select = _pcr_selection(r)
    digest = r.tpm2b("pcrDigest", MAX_DIGEST)
    r.end()
    return select, digest


def parse_attest(data: bytes) -> Attest:
    """A marshalled TPMS_ATTEST (the buffer of a TPM2B_ATTEST, as `tpm2_quote -m` writes it)."""
    if isinstance(data, bytes | bytearray) and len(data) > MAX_ATTEST:
        raise VerifyError(f"TPMS_ATTEST: {len(data)} bytes is too long for an attestation")
    r = _Reader(data, "TPMS_ATTEST")
    magic = r.u32("magic")
    st = r.u16("type")
    signer = r.tpm2b("qualifiedSigner", MAX_NAME)
    extra = r.tpm2b("extraData", MAX_DATA)
    clock = ClockInfo(
        r.u64("clockInfo.clock"),
        r.u32("clockInfo.resetCount"),
        r.u32("clockInfo.restartCount"),
        bool(r.u8("clockInfo.safe")),
    )
    firmware = r.u64("firmwareVersion")
    body_start = r.pos
    select: tuple[PcrSelection, ...] | None = None
    digest: bytes | None = None
    if st == TPM_ST_ATTEST.QUOTE:
        select, digest = _quote_info(r)
        attested = bytes(data[body_start:])
    else:
        attested = r.take(len(data) - body_start, "attested")
        # read the body as a TPMS_QUOTE_INFO when it is one, so that a quote whose type field
        # alone was changed still has its selection and digest judged on their own
        with contextlib.suppress(VerifyError):
            select, digest = _quote_info(_Reader(attested, "TPMS_QUOTE_INFO"))
    return Attest(magic, st, signer, extra, clock, firmware, attested, select, digest)


# TPMT_SIGNATURE ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signature:
    """A parsed TPMT_SIGNATURE: ECDSA carries (r, s); RSASSA and RSAPSS carry `rsa`."""

    sig_alg: int
    hash_alg: int = TPM_ALG.NULL
    r: int = 0
    s: int = 0
    rsa: bytes = b""

    @property
    def scheme(self) -> str:
        alg = hash_name(self.hash_alg)
        try:
            return f"{TPM_ALG(self.sig_alg).name.lower()}-{alg}"
        except ValueError:
            return f"{self.sig_alg:#06x}-{alg}"


def parse_signature(data: bytes) -> Signature:
    """A marshalled TPMT_SIGNATURE (as `tpm2_quote -s` writes it in its default `tss` format)."""
    r = _Reader(data, "TPMT_SIGNATURE")
    alg = r.u16("sigAlg")
    if alg == TPM_ALG.NULL:
        sig = Signature(alg)
    elif alg in (TPM_ALG.ECDSA, TPM_ALG.ECSCHNORR, TPM_ALG.SM2):
        hash_alg = r.u16("hash")
        sr = r.tpm2b("signatureR", MAX_ECC_BYTES)
        ss = r.tpm2b("signatureS", MAX_ECC_BYTES)
        sig = Signature(alg, hash_alg, int.from_bytes(sr, "big"), int.from_bytes(ss, "big"))
    elif alg in (TPM_ALG.RSASSA, TPM_ALG.RSAPSS):
        hash_alg = r.u16("hash")
        sig = Signature(alg, hash_alg, rsa=r.tpm2b("sig", MAX_RSA_BYTES))
    else:
        raise r.fail(f"unsupported signature algorithm {alg:#06x}")
    r.end()
    return sig


# TPMT_PUBLIC ---------------------------------------------------------------------------------


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


def _sym_def(r: _Reader) -> SymDef:
    alg = r.u16("symmetric.algorithm")
    if alg == TPM_ALG.NULL:
        return SymDef(alg)
    if alg == TPM_ALG.XOR:
        return SymDef(alg, 0, r.u16("symmetric.hash"))
    return SymDef(alg, r.u16("symmetric.keyBits"), r.u16("symmetric.mode"))


def _scheme(r: _Reader) -> Scheme:
    alg = r.u16("scheme.scheme")
    if alg in (TPM_ALG.NULL, TPM_ALG.RSAES):  # RSAES has no details
        return Scheme(alg)
    hash_alg = r.u16("scheme.hashAlg")
    if alg == TPM_ALG.ECDAA:
        r.u16("scheme.count")
    return Scheme(alg, hash_alg)


def _rsa_key(r: _Reader) -> tuple[PublicKey, int]:
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


def _ecc_key(r: _Reader) -> tuple[PublicKey, int, int]:
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
    r = _Reader(data, "TPMT_PUBLIC")
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
    r = _Reader(data, "TPM2B_PUBLIC")
    inner = r.tpm2b("publicArea", 4096)
    r.end()
    return parse_tpmt_public(inner)
