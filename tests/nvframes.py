"""TPM 2.0 NV commands as raw frames (TCG TPM 2.0 Part 3, 31.3 / 31.5 / 31.13), owner auth with
the empty password: for tests that write and read back NV data without tpm2-tools."""

from __future__ import annotations

import struct

from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_ALG, TPM_CC, TPM_ST

TPM_RH_OWNER = 0x40000001
TPMA_NV_OWNERWRITE = 0x00000002
TPMA_NV_OWNERREAD = 0x00020000


def _owner_password_session() -> bytes:
    auth = struct.pack(">IHBH", frames.TPM_RS_PW, 0, 0x01, 0)
    return struct.pack(">I", len(auth)) + auth


def nv_define_space(index: int, size: int) -> bytes:
    public = struct.pack(
        ">IHIHH", index, TPM_ALG.SHA256, TPMA_NV_OWNERWRITE | TPMA_NV_OWNERREAD, 0, size
    )
    body = struct.pack(">I", TPM_RH_OWNER) + _owner_password_session()
    body += struct.pack(">H", 0) + struct.pack(">H", len(public)) + public
    return frames.command(TPM_CC.NV_DefineSpace, body, TPM_ST.SESSIONS)


def nv_write(index: int, data: bytes) -> bytes:
    body = struct.pack(">II", TPM_RH_OWNER, index) + _owner_password_session()
    body += struct.pack(">H", len(data)) + data + struct.pack(">H", 0)
    return frames.command(TPM_CC.NV_Write, body, TPM_ST.SESSIONS)


def nv_read(index: int, size: int) -> bytes:
    body = struct.pack(">II", TPM_RH_OWNER, index) + _owner_password_session()
    body += struct.pack(">HH", size, 0)
    return frames.command(TPM_CC.NV_Read, body, TPM_ST.SESSIONS)


def parse_nv_read(response: bytes) -> bytes:
    (size,) = struct.unpack_from(">H", response, 14)
    return response[16 : 16 + size]
