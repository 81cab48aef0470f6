"""The TPM 2.0 structures of a quote: TPMS_ATTEST and TPMT_SIGNATURE.

TCG TPM 2.0 Library, Part 2 (Structures): 10.9.7 TPMS_PCR_SELECTION and 10.9.8 TPML_PCR_SELECTION,
10.12 TPMS_CLOCK_INFO, TPMS_QUOTE_INFO, TPMS_ATTEST; 11.3 TPMT_SIGNATURE. The signing key's
TPM2B_PUBLIC is `vtpm.tpm.public`.

Rules:
- Parsing only: no I/O, no judgement. A wrong magic or attestation type parses (the verifier
  reports it as a failed check); bytes that do not form the structure raise one error,
  `VerifyError`, naming the structure, the field and the offset. Nothing else escapes.
- Every length read from the input is bounded by the spec's maximum before it is used, and
  trailing bytes after a structure are refused.
"""

from __future__ import annotations

import contextlib
import enum
from dataclasses import dataclass

from vtpm.errors import VerifyError
from vtpm.tpm import hashes
from vtpm.tpm.constants import TPM_ALG
from vtpm.tpm.hashes import MAX_DIGEST
from vtpm.tpm.public import MAX_ECC_BYTES, MAX_RSA_BYTES
from vtpm.tpm.reader import Reader

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


# Spec maxima (Part 2, with the largest digest being SHA-512)
MAX_NAME = 2 + MAX_DIGEST  # TPMU_NAME: a TPMT_HA
MAX_DATA = 2 + MAX_DIGEST  # TPM2B_DATA holds a TPMT_HA
MAX_PCR_BANKS = 16  # HASH_COUNT bound of TPML_PCR_SELECTION
MAX_SIZEOF_SELECT = 32
MAX_ATTEST = 2048


# TPMS_ATTEST ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PcrSelection:
    """One TPMS_PCR_SELECTION: a bank and the PCR indices its bitmap selects, ascending."""

    hash_alg: int
    indices: tuple[int, ...]

    @property
    def bank(self) -> str:
        return hashes.hash_name(self.hash_alg)

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


def _pcr_selection(r: Reader) -> tuple[PcrSelection, ...]:
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
    r = Reader(data, "TPML_PCR_SELECTION")
    out = _pcr_selection(r)
    r.end()
    return out


def _quote_info(r: Reader) -> tuple[tuple[PcrSelection, ...], bytes]:
    select = _pcr_selection(r)
    digest = r.tpm2b("pcrDigest", MAX_DIGEST)
    r.end()
    return select, digest


def parse_attest(data: bytes) -> Attest:
    """A marshalled TPMS_ATTEST (the buffer of a TPM2B_ATTEST, as `tpm2_quote -m` writes it)."""
    if isinstance(data, bytes | bytearray) and len(data) > MAX_ATTEST:
        raise VerifyError(f"TPMS_ATTEST: {len(data)} bytes is too long for an attestation")
    r = Reader(data, "TPMS_ATTEST")
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
            select, digest = _quote_info(Reader(attested, "TPMS_QUOTE_INFO"))
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
        alg = hashes.hash_name(self.hash_alg)
        try:
            return f"{TPM_ALG(self.sig_alg).name.lower()}-{alg}"
        except ValueError:
            return f"{self.sig_alg:#06x}-{alg}"


def parse_signature(data: bytes) -> Signature:
    """A marshalled TPMT_SIGNATURE (as `tpm2_quote -s` writes it in its default `tss` format)."""
    r = Reader(data, "TPMT_SIGNATURE")
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
