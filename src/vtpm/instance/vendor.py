"""The vendor-specific TPM command a guest sends to its own vTPM to get a deep quote.

TPM2_CC_VTPM_DeepQuote = 0x20000101 (vendor bit 29 set, so no TCG command collides with it).

Command (tag TPM_ST_NO_SESSIONS, no handles, no sessions):
    header (tag 0x8001, u32 size, u32 code) | u16 nonce size (1..64) | nonce |
    u32 host PCR mask (bit i = host PCR i; 0 = the group's default) |
    u32 vTPM PCR mask (bit i = this vTPM's SHA-256 PCR i, read at the moment of the request)
Response:
    header (tag 0x8001, u32 size, u32 response code) | on success: u32 length | evidence
    (the compact binary form of `vtpm.wire.evidence`; `vtpm guest-quote` turns it into the
    JSON document `vtpm verify` reads).
Response codes: TPM_RC_SUCCESS; TPM_RC_COMMAND_CODE when the vTPM has no Manager (a lone
instance); TPM_RC_SIZE for a malformed command; TPM_RC_FAILURE when the Manager did not quote
(the reason goes to the instance's log only).

The instance answers it itself: the vTPM's PCRs are read through the engine, the Manager adds
the vTPM's identity (uuid, group, label — which the guest cannot choose) and the hardware quote.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Sequence

from vtpm.errors import TpmResponseError, VtpmError
from vtpm.tpm import frames
from vtpm.tpm.constants import HEADER_SIZE, TPM_ALG, TPM_RC, TPM_ST

log = logging.getLogger(__name__)

TPM_CC_VTPM_DEEP_QUOTE = 0x20000101
CODE_BYTES = struct.pack(">I", TPM_CC_VTPM_DEEP_QUOTE)
TPM_RC_SIZE = 0x095
MAX_NONCE = 64
SHA256 = int(TPM_ALG.SHA256)  # a plain int: the IPC events refuse IntEnum members as banks
PCR_READ_BATCH = 8  # TPM2_PCR_Read returns at most eight digests per call

Execute = Callable[[bytes], bytes]
Quote = Callable[[bytes, tuple[int, ...], int, tuple[tuple[int, bytes], ...]], bytes]


def is_deep_quote(command: bytes) -> bool:
    return command[6:10] == CODE_BYTES


def mask_to_pcrs(mask: int) -> tuple[int, ...]:
    return tuple(i for i in range(24) if mask >> i & 1)


def command(nonce: bytes, host_pcrs: Sequence[int], vtpm_pcrs: Sequence[int]) -> bytes:
    """The command bytes (for clients such as `vtpm guest-quote`)."""
    body = struct.pack(">H", len(nonce)) + nonce
    body += struct.pack(">II", sum(1 << i for i in host_pcrs), sum(1 << i for i in vtpm_pcrs))
    return frames.command(TPM_CC_VTPM_DEEP_QUOTE, body)


def parse_response(response: bytes) -> bytes:
    """The evidence bytes of a response; TpmResponseError with the response code otherwise."""
    if len(response) < HEADER_SIZE:
        raise TpmResponseError("the deep-quote response is shorter than a TPM header")
    rc = frames.response_code(response)
    if rc != TPM_RC.SUCCESS:
        raise TpmResponseError(f"the vTPM answered the deep-quote command with TPM_RC {rc:#x}")
    if len(response) < HEADER_SIZE + 4:
        raise TpmResponseError("the deep-quote response is truncated")
    (n,) = struct.unpack_from(">I", response, HEADER_SIZE)
    evidence = response[HEADER_SIZE + 4 : HEADER_SIZE + 4 + n]
    if len(evidence) != n:
        raise TpmResponseError("the deep-quote response is truncated")
    return evidence


def _answer(rc: int, body: bytes = b"") -> bytes:
    return struct.pack(">HII", TPM_ST.NO_SESSIONS, HEADER_SIZE + len(body), rc) + body


def read_pcrs(execute: Execute, pcrs: Sequence[int]) -> tuple[tuple[int, bytes], ...]:
    """SHA-256 values of `pcrs` read through the engine, eight at a time. TpmResponseError when
    the TPM refuses (e.g. the guest has not started it yet) or does not hold them all."""
    out: list[tuple[int, bytes]] = []
    wanted = sorted(set(pcrs))
    for i in range(0, len(wanted), PCR_READ_BATCH):
        chunk = wanted[i : i + PCR_READ_BATCH]
        response = execute(frames.pcr_read(SHA256, chunk))
        try:
            values = frames.parse_pcr_read(response)
        except (ValueError, struct.error) as e:  # until tpm.frames raises TpmResponseError
            raise TpmResponseError(f"TPM2_PCR_Read: {e}") from None
        if len(values) != len(chunk):
            raise TpmResponseError("the vTPM's SHA-256 bank does not hold every PCR asked for")
        out += zip(chunk, values, strict=True)
    return tuple(out)


def handle(command_bytes: bytes, execute: Execute, quote: Quote | None) -> bytes:
    """Answer a deep-quote vendor command."""
    if quote is None:
        return _answer(TPM_RC.COMMAND_CODE)
    body = command_bytes[HEADER_SIZE:]
    if len(command_bytes) < HEADER_SIZE + 2:
        return _answer(TPM_RC_SIZE)
    (n,) = struct.unpack_from(">H", body)
    if not 1 <= n <= MAX_NONCE or len(body) != 2 + n + 8:
        return _answer(TPM_RC_SIZE)
    nonce = body[2 : 2 + n]
    host_mask, vtpm_mask = struct.unpack_from(">II", body, 2 + n)
    if host_mask >> 24 or vtpm_mask >> 24:
        return _answer(TPM_RC_SIZE)
    try:
        values = read_pcrs(execute, mask_to_pcrs(vtpm_mask))
        evidence = quote(nonce, mask_to_pcrs(host_mask), SHA256, values)
    except VtpmError as e:  # the PCRs could not be read, or the Manager did not quote
        log.warning("deep quote for the guest failed: %s", e)
        return _answer(TPM_RC.FAILURE)
    return _answer(TPM_RC.SUCCESS, struct.pack(">I", len(evidence)) + evidence)
