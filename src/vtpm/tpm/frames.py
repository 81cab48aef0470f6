"""Build and read TPM command/response frames (header: tag u16, size u32, code u32).

Only the handful of commands the project sends itself are built here (Startup, Shutdown,
GetRandom, PCR_Extend, PCR_Read and their TPM 1.2 twins); everything else is the clients'.

A response that reports an error, or does not parse, raises `TpmResponseError`; a command we
cannot build from the arguments given raises `LocalProtocolError`.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from vtpm.errors import LocalProtocolError, TpmResponseError
from vtpm.tpm.constants import (
    HASH_NAMES,
    HEADER_SIZE,
    TPM_CC,
    TPM_ORD12,
    TPM_RC,
    TPM_ST,
    TPM_STARTUP12,
    TPM_SU,
    TPM_TAG12,
)

TPM_RS_PW = 0x40000009


@dataclass(frozen=True, slots=True)
class Header:
    tag: int
    size: int
    code: int


def parse_header(frame: bytes) -> Header:
    if len(frame) < HEADER_SIZE:
        raise TpmResponseError(f"TPM frame of {len(frame)} bytes is shorter than its header")
    tag, size, code = struct.unpack_from(">HII", frame)
    return Header(tag, size, code)


def _unpack(fmt: str, response: bytes, off: int, what: str) -> tuple[int, ...]:
    try:
        return struct.unpack_from(fmt, response, off)
    except struct.error:
        raise TpmResponseError(f"{what} response is truncated") from None


def _take(response: bytes, off: int, size: int, what: str) -> bytes:
    out = response[off : off + size]
    if len(out) != size:
        raise TpmResponseError(f"{what} response is truncated")
    return out


def response_code(response: bytes) -> int:
    """The response code of a TPM 2.0 or 1.2 response frame."""
    return parse_header(response).code


def command(code: int, body: bytes = b"", tag: int = TPM_ST.NO_SESSIONS) -> bytes:
    return struct.pack(">HII", tag, HEADER_SIZE + len(body), code) + body


def _password_session(password: bytes = b"") -> bytes:
    # TPMS_AUTH_COMMAND: handle, nonce (empty), attributes (continueSession), hmac = password
    auth = struct.pack(">IHBH", TPM_RS_PW, 0, 0x01, len(password)) + password
    return struct.pack(">I", len(auth)) + auth


def startup(su: TPM_SU = TPM_SU.CLEAR) -> bytes:
    return command(TPM_CC.Startup, struct.pack(">H", su))


def shutdown(su: TPM_SU = TPM_SU.STATE) -> bytes:
    return command(TPM_CC.Shutdown, struct.pack(">H", su))


def get_random(count: int) -> bytes:
    return command(TPM_CC.GetRandom, struct.pack(">H", count))


def pcr_extend(pcr: int, digests: dict[int, bytes]) -> bytes:
    """TPM2_PCR_Extend with one digest per bank (alg id -> digest), empty password auth."""
    values = b"".join(struct.pack(">H", alg) + d for alg, d in digests.items())
    body = struct.pack(">I", pcr) + _password_session() + struct.pack(">I", len(digests)) + values
    return command(TPM_CC.PCR_Extend, body, TPM_ST.SESSIONS)


def pcr_reset(pcr: int) -> bytes:
    """TPM2_PCR_Reset, empty password auth (allowed only at the PCR's reset localities)."""
    body = struct.pack(">I", pcr) + _password_session()
    return command(TPM_CC.PCR_Reset, body, TPM_ST.SESSIONS)


def pcr_select(alg: int, pcrs: list[int]) -> bytes:
    bitmap = bytearray(3)
    for p in pcrs:
        bitmap[p // 8] |= 1 << (p % 8)
    return struct.pack(">IHB", 1, alg, 3) + bytes(bitmap)


def pcr_read(alg: int, pcrs: list[int]) -> bytes:
    return command(TPM_CC.PCR_Read, pcr_select(alg, pcrs))


def parse_pcr_read(response: bytes) -> list[bytes]:
    """Digests of a TPM2_PCR_Read response, in selection order."""
    rc = response_code(response)
    if rc != TPM_RC.SUCCESS:
        raise TpmResponseError(f"PCR_Read failed with TPM_RC {rc:#x}")
    off = HEADER_SIZE + 4  # update counter
    (count,) = _unpack(">I", response, off, "PCR_Read")
    off += 4
    for _ in range(count):
        off += 2  # hash algorithm
        (n,) = _unpack(">B", response, off, "PCR_Read")
        off += 1 + n
    (ndig,) = _unpack(">I", response, off, "PCR_Read")
    off += 4
    out = []
    for _ in range(ndig):
        (size,) = _unpack(">H", response, off, "PCR_Read")
        out.append(_take(response, off + 2, size, "PCR_Read"))
        off += 2 + size
    return out


TPM_CAP_PCRS = 0x00000005


def get_capability_pcrs() -> bytes:
    """TPM2_GetCapability(TPM_CAP_PCRS): the PCR banks and which PCRs each has allocated."""
    return command(TPM_CC.GetCapability, struct.pack(">III", TPM_CAP_PCRS, 0, 1))


def parse_pcr_allocation(response: bytes) -> dict[int, frozenset[int]]:
    """{bank: allocated PCR indices} from a TPM2_GetCapability(TPM_CAP_PCRS) response."""
    rc = response_code(response)
    if rc != TPM_RC.SUCCESS:
        raise TpmResponseError(f"GetCapability(PCRS) failed with TPM_RC {rc:#x}")
    off = HEADER_SIZE + 1  # moreData
    cap, count = _unpack(">II", response, off, "GetCapability(PCRS)")
    if cap != TPM_CAP_PCRS:
        raise TpmResponseError(f"GetCapability(PCRS) answered capability {cap:#x}")
    off += 8
    banks: dict[int, frozenset[int]] = {}
    for _ in range(count):
        alg, size = _unpack(">HB", response, off, "GetCapability(PCRS)")
        bitmap = _take(response, off + 3, size, "GetCapability(PCRS)")
        banks[alg] = frozenset(i for i in range(size * 8) if bitmap[i // 8] >> (i % 8) & 1)
        off += 3 + size
    return banks


def parse_get_random(response: bytes) -> bytes:
    rc = response_code(response)
    if rc != TPM_RC.SUCCESS:
        raise TpmResponseError(f"GetRandom failed with TPM_RC {rc:#x}")
    (size,) = _unpack(">H", response, HEADER_SIZE, "GetRandom")
    return _take(response, HEADER_SIZE + 2, size, "GetRandom")


def extend_value(alg: int, old: bytes, data_digest: bytes) -> bytes:
    """The PCR value after extending `data_digest` into `old` in bank `alg`."""
    return hashlib.new(HASH_NAMES[alg], old + data_digest).digest()


# TPM 1.2 --------------------------------------------------------------------------------------


def command12(ordinal: int, body: bytes = b"") -> bytes:
    return command(ordinal, body, TPM_TAG12.RQU_COMMAND)


def startup12(kind: TPM_STARTUP12 = TPM_STARTUP12.CLEAR) -> bytes:
    return command12(TPM_ORD12.Startup, struct.pack(">H", kind))


def save_state12() -> bytes:
    return command12(TPM_ORD12.SaveState)


def get_random12(count: int) -> bytes:
    return command12(TPM_ORD12.GetRandom, struct.pack(">I", count))


def extend12(pcr: int, digest: bytes) -> bytes:
    if len(digest) != 20:
        raise LocalProtocolError("a TPM 1.2 extend takes a 20-byte SHA-1 digest")
    return command12(TPM_ORD12.Extend, struct.pack(">I", pcr) + digest)
