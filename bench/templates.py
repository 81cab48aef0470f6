"""TPM 2.0 command frames the benchmark sends (TPM2_CreatePrimary, Create, Quote), built from
the TCG Part 2/3 layouts. Password sessions only, so the same bytes work on any TPM."""

from __future__ import annotations

import struct

from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_ALG, TPM_CC, TPM_ST

TPM_RH_OWNER = 0x40000001
ALG_RSA, ALG_ECC, ALG_AES, ALG_CFB, ALG_NULL, ALG_ECDSA = 0x1, 0x23, 0x6, 0x43, 0x10, 0x18
SHA256 = TPM_ALG.SHA256
NIST_P256 = 0x3

FIXED_TPM, FIXED_PARENT, SENSITIVE_ORIGIN, USER_AUTH = 1 << 1, 1 << 4, 1 << 5, 1 << 6
NO_DA, RESTRICTED, DECRYPT, SIGN = 1 << 10, 1 << 16, 1 << 17, 1 << 18
BASE = FIXED_TPM | FIXED_PARENT | SENSITIVE_ORIGIN | USER_AUTH


def _b2(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _password() -> bytes:
    auth = struct.pack(">IHBH", frames.TPM_RS_PW, 0, 0x01, 0)
    return struct.pack(">I", len(auth)) + auth


def ecc_ak_public() -> bytes:
    """Restricted ECDSA-SHA256 signing key on NIST P-256."""
    return (
        struct.pack(">HHI", ALG_ECC, SHA256, BASE | RESTRICTED | SIGN)
        + _b2(b"")
        + struct.pack(">H", ALG_NULL)  # symmetric
        + struct.pack(">HH", ALG_ECDSA, SHA256)  # scheme
        + struct.pack(">HH", NIST_P256, ALG_NULL)  # curve, kdf
        + _b2(b"")
        + _b2(b"")  # unique x, y
    )


def ecc_storage_public() -> bytes:
    """Restricted decryption (storage) key on NIST P-256 with AES-128-CFB."""
    return (
        struct.pack(">HHI", ALG_ECC, SHA256, BASE | NO_DA | RESTRICTED | DECRYPT)
        + _b2(b"")
        + struct.pack(">HHH", ALG_AES, 128, ALG_CFB)
        + struct.pack(">H", ALG_NULL)
        + struct.pack(">HH", NIST_P256, ALG_NULL)
        + _b2(b"")
        + _b2(b"")
    )


def rsa2048_sign_public() -> bytes:
    return (
        struct.pack(">HHI", ALG_RSA, SHA256, BASE | SIGN)
        + _b2(b"")
        + struct.pack(">HH", ALG_NULL, ALG_NULL)  # symmetric, scheme
        + struct.pack(">HI", 2048, 0)  # keyBits, exponent (default)
        + _b2(b"")
    )


def _create_args(public: bytes) -> bytes:
    sensitive = _b2(_b2(b"") + _b2(b""))
    return sensitive + _b2(public) + _b2(b"") + struct.pack(">I", 0)


def create_primary(public: bytes) -> bytes:
    body = struct.pack(">I", TPM_RH_OWNER) + _password() + _create_args(public)
    return frames.command(TPM_CC.CreatePrimary, body, TPM_ST.SESSIONS)


def create(parent: int, public: bytes) -> bytes:
    body = struct.pack(">I", parent) + _password() + _create_args(public)
    return frames.command(TPM_CC.Create, body, TPM_ST.SESSIONS)


def quote(ak: int, nonce: bytes, pcrs: list[int]) -> bytes:
    body = (
        struct.pack(">I", ak)
        + _password()
        + _b2(nonce)
        + struct.pack(">H", ALG_NULL)
        + frames.pcr_select(SHA256, pcrs)
    )
    return frames.command(TPM_CC.Quote, body, TPM_ST.SESSIONS)


def handle_of(response: bytes) -> int:
    rc = frames.response_code(response)
    if rc != 0:
        raise RuntimeError(f"TPM command failed with response code {rc:#x}")
    (handle,) = struct.unpack_from(">I", response, 10)
    return int(handle)
