"""Commands that provision a TPM 2.0: primary keys, persistent handles, NV indices.

TCG TPM 2.0 Library, Part 3: 24.1 CreatePrimary, 28.5 EvictControl, 31.3 NV_DefineSpace,
31.4 NV_UndefineSpace, 31.6 NV_ReadPublic, 31.7 NV_Write, 31.9 NV_WriteLock, 30.7 ReadPublic,
28.4 FlushContext, 22.5 PCR_Allocate (Part 2, 10.9.7 TPML_PCR_SELECTION). Every authorisation
is the empty password of a hierarchy (a vTPM just taken through TPM2_Startup(CLEAR) has empty
platform and owner auth and all hierarchies enabled).

Builders return a command frame; parsers take the response and raise `TpmResponseError` for an
error code or a response that does not parse (the code is kept in `.rc`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vtpm.errors import TpmResponseError
from vtpm.tpm.constants import HEADER_SIZE, TPM_CC, TPM_RC, TPM_ST
from vtpm.tpm.frames import _password_session, command, response_code

TPM_RH_OWNER = 0x40000001
TPM_RH_ENDORSEMENT = 0x4000000B
TPM_RH_PLATFORM = 0x4000000C
TPM_CC_NV_WRITELOCK = 0x00000138
TPM_RC_HANDLE = 0x08B  # with the handle/parameter bits masked off (RC_FMT1)
TPM_RC_NV_LOCKED = 0x148

# TPMA_NV bits of the certificate indices (as swtpm_setup defines them)
TPMA_NV_PPWRITE = 0x00000001
TPMA_NV_WRITEDEFINE = 0x00002000
TPMA_NV_PPREAD = 0x00010000
TPMA_NV_OWNERREAD = 0x00020000
TPMA_NV_AUTHREAD = 0x00040000
TPMA_NV_NO_DA = 0x02000000
TPMA_NV_WRITELOCKED = 0x00000800
TPMA_NV_PLATFORMCREATE = 0x40000000
CERT_INDEX_ATTRIBUTES = (
    TPMA_NV_PLATFORMCREATE
    | TPMA_NV_AUTHREAD
    | TPMA_NV_OWNERREAD
    | TPMA_NV_PPREAD
    | TPMA_NV_PPWRITE
    | TPMA_NV_NO_DA
    | TPMA_NV_WRITEDEFINE
)
NV_WRITE_CHUNK = 768  # below every libtpms' TPM_PT_NV_BUFFER_MAX (1024)


class ProvisionError(TpmResponseError):
    """A provisioning command failed; `rc` is the TPM's response code."""

    def __init__(self, what: str, rc: int) -> None:
        super().__init__(f"{what} failed with TPM_RC {rc:#x}")
        self.rc = rc


def base_rc(rc: int) -> int:
    """A format-one response code without its handle/parameter/session number."""
    return rc & 0xBF if rc & 0x80 else rc


def _sessions(handles: bytes, params: bytes, code: int) -> bytes:
    return command(code, handles + _password_session() + params, TPM_ST.SESSIONS)


def _check(response: bytes, what: str) -> None:
    rc = response_code(response)
    if rc != TPM_RC.SUCCESS:
        raise ProvisionError(what, rc)


def _u16_at(response: bytes, off: int, what: str) -> int:
    if off + 2 > len(response):
        raise TpmResponseError(f"{what} response is truncated")
    return int(struct.unpack_from(">H", response, off)[0])


# CreatePrimary / ReadPublic / FlushContext / EvictControl ------------------------------------


def create_primary(hierarchy: int, template: bytes) -> bytes:
    """TPM2_CreatePrimary with empty sensitive data, no outside info, no PCRs."""
    sensitive = struct.pack(">HHH", 4, 0, 0)  # TPM2B_SENSITIVE_CREATE: empty auth and data
    params = sensitive + struct.pack(">H", len(template)) + template
    params += struct.pack(">HI", 0, 0)  # outsideInfo, creationPCR (count 0)
    return _sessions(struct.pack(">I", hierarchy), params, TPM_CC.CreatePrimary)


@dataclass(frozen=True, slots=True)
class Primary:
    handle: int
    public: bytes  # marshalled TPM2B_PUBLIC (size included)


def parse_create_primary(response: bytes) -> Primary:
    _check(response, "TPM2_CreatePrimary")
    if len(response) < HEADER_SIZE + 8:
        raise TpmResponseError("TPM2_CreatePrimary response is truncated")
    (handle,) = struct.unpack_from(">I", response, HEADER_SIZE)
    off = HEADER_SIZE + 8  # handle, parameterSize
    size = _u16_at(response, off, "TPM2_CreatePrimary")
    public = response[off : off + 2 + size]
    if len(public) != 2 + size:
        raise TpmResponseError("TPM2_CreatePrimary response is truncated")
    return Primary(handle, public)


def read_public(handle: int) -> bytes:
    return command(TPM_CC.ReadPublic, struct.pack(">I", handle))


def parse_read_public(response: bytes) -> bytes | None:
    """The object's TPM2B_PUBLIC, or None when the handle holds no object."""
    rc = response_code(response)
    if rc != TPM_RC.SUCCESS:
        if base_rc(rc) == TPM_RC_HANDLE:
            return None
        raise ProvisionError("TPM2_ReadPublic", rc)
    size = _u16_at(response, HEADER_SIZE, "TPM2_ReadPublic")
    public = response[HEADER_SIZE : HEADER_SIZE + 2 + size]
    if len(public) != 2 + size:
        raise TpmResponseError("TPM2_ReadPublic response is truncated")
    return public


def flush_context(handle: int) -> bytes:
    return command(TPM_CC.FlushContext, struct.pack(">I", handle))


def evict_control(auth: int, obj: int, persistent: int) -> bytes:
    """Persist transient `obj` at `persistent`, or (obj == persistent) remove it."""
    handles = struct.pack(">II", auth, obj)
    return _sessions(handles, struct.pack(">I", persistent), TPM_CC.EvictControl)


# NV -----------------------------------------------------------------------------------------


def nv_define_space(auth: int, index: int, size: int, attributes: int) -> bytes:
    """An index with empty auth, no policy, nameAlg SHA-256."""
    nv_public = struct.pack(">IHIHH", index, 0x000B, attributes, 0, size)
    params = struct.pack(">H", 0) + struct.pack(">H", len(nv_public)) + nv_public
    return _sessions(struct.pack(">I", auth), params, TPM_CC.NV_DefineSpace)


def nv_undefine_space(auth: int, index: int) -> bytes:
    return _sessions(struct.pack(">II", auth, index), b"", TPM_CC.NV_UndefineSpace)


def nv_write(auth: int, index: int, offset: int, data: bytes) -> bytes:
    params = struct.pack(">H", len(data)) + data + struct.pack(">H", offset)
    return _sessions(struct.pack(">II", auth, index), params, TPM_CC.NV_Write)


def nv_write_lock(auth: int, index: int) -> bytes:
    return _sessions(struct.pack(">II", auth, index), b"", TPM_CC_NV_WRITELOCK)


def nv_read_public(index: int) -> bytes:
    return command(0x00000169, struct.pack(">I", index))  # TPM_CC_NV_ReadPublic


@dataclass(frozen=True, slots=True)
class NvPublic:
    index: int
    attributes: int
    size: int


def parse_nv_read_public(response: bytes) -> NvPublic | None:
    """The index's public area, or None when it is not defined."""
    rc = response_code(response)
    if rc != TPM_RC.SUCCESS:
        if base_rc(rc) == TPM_RC_HANDLE:
            return None
        raise ProvisionError("TPM2_NV_ReadPublic", rc)
    off = HEADER_SIZE + 2  # TPM2B_NV_PUBLIC size
    if len(response) < off + 10:
        raise TpmResponseError("TPM2_NV_ReadPublic response is truncated")
    index, _alg, attributes = struct.unpack_from(">IHI", response, off)
    policy = _u16_at(response, off + 10, "TPM2_NV_ReadPublic")
    size = _u16_at(response, off + 12 + policy, "TPM2_NV_ReadPublic")
    return NvPublic(index, attributes, size)


def expect_success(response: bytes, what: str) -> None:
    """Raise ProvisionError unless `response` reports success."""
    _check(response, what)


# PCR_Allocate --------------------------------------------------------------------------------

PCR_SELECT_SIZE = 3  # sizeofSelect of PCRs 0..23


def pcr_allocate(banks: dict[int, bool]) -> bytes:
    """TPM2_PCR_Allocate (platform auth): each bank in `banks` with all 24 PCRs (True) or none
    (False). A bank the TPM has and `banks` leaves out keeps its allocation, so name them all."""
    selection = struct.pack(">I", len(banks))
    full = b"\xff" * PCR_SELECT_SIZE
    for alg, on in banks.items():
        bits = full if on else bytes(PCR_SELECT_SIZE)
        selection += struct.pack(">HB", alg, PCR_SELECT_SIZE) + bits
    return _sessions(struct.pack(">I", TPM_RH_PLATFORM), selection, TPM_CC.PCR_Allocate)


@dataclass(frozen=True, slots=True)
class PcrAllocation:
    """TPM2_PCR_Allocate's answer: whether the allocation was taken (it applies from the next
    TPM reset), the number of PCRs, and the PCR memory it needs and has."""

    success: bool
    max_pcr: int
    size_needed: int
    size_available: int


def parse_pcr_allocate(response: bytes) -> PcrAllocation:
    _check(response, "TPM2_PCR_Allocate")
    off = HEADER_SIZE + 4  # parameterSize
    if len(response) < off + 13:
        raise TpmResponseError("TPM2_PCR_Allocate response is truncated")
    success, max_pcr, needed, available = struct.unpack_from(">BIII", response, off)
    return PcrAllocation(bool(success), max_pcr, needed, available)
