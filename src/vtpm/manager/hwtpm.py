"""The host's hardware TPM (or its simulator), through tpm2-pytss ESAPI.

The Manager is the only user of the hardware TPM, and this module is its only door to it: the
connection, the storage primary, the retry loop and PCR reads. The operations built on that
door live beside it: sealing and unsealing in `vtpm.manager.sealing`, keys, quotes and the EK in
`vtpm.manager.attestation`.

Rules:
- Objects live under a storage primary (ECC P-256, AES-128-CFB) created at open. It is
  deterministic, so it is recreated rather than persisted; it stays loaded while open.
- Sessions that carry secrets are salted to the storage primary and encrypt parameters
  (AES-128-CFB): `salted_session`.
- Every operation flushes what it loaded. Without a resource manager (swtpm, mssim) a Manager
  killed with -9 leaves objects and sessions behind, and swtpm holds only three objects, so
  open() flushes every transient object and session it finds first.
- Failures are sorted once, in `_classify`: TPM warnings that ask for a retry are retried with
  backoff; a transport failure, a rebooted TPM or a handle that is no longer loaded closes the
  context and reconnects; any other TPM refusal raises the caller's `refused` error (an opaque
  SealError for an unseal), or HwTpmError. After `retries` attempts the TPM is declared
  unreachable (HwTpmError).
  Callers' data is never modified, so a failed call can simply be repeated.
- A TPM declared unreachable is *down* (`health`) until it answers a command again. Meanwhile
  each use first lets `revive` act (the Manager's simulator: it adopts a simulator someone else
  started, and restarts its own once a restart is due, `vtpm.manager.outage`: 5 s into the
  outage, then backing off to 60 s), then makes one quick connection attempt, not the retry
  loop. So a TPM that comes back is used at the next call, nothing spins or sleeps while it is
  away, and recovery needs no thread that polls.
- The storage primary's name is pinned at the first connection. A reconnection that finds
  another TPM (e.g. a process that took the freed TCP port of a killed simulator) is refused
  and the TPM stays down: whatever answers there is not the TPM the group keys are sealed to,
  and its PCR values must not unlock anything.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_SU,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPMA_SESSION,
    TPML_PCR_SELECTION,
    TPMT_PUBLIC,
    TPMT_SYM_DEF,
    TSS2_Exception,
)

from vtpm.errors import ConfigError, HwTpmError
from vtpm.manager import outage
from vtpm.tpm import policy
from vtpm.tpm.constants import TPM_ALG, TPM_RC

log = logging.getLogger(__name__)

T = TypeVar("T")

PCRS_PER_READ = 8  # TPML_DIGEST holds at most eight digests
LEFTOVER_ROUNDS = 16  # batches of 64 handles to flush at open, at most
BACKOFF_START = 0.05
BACKOFF_MAX = 1.0

# TSS2_RC layout: bits 16..23 name the layer that produced the code (tss2_common.h)
_LAYER_SHIFT = 16
_LAYER_TPM = 0
_LAYER_ESYS = 7
_LAYER_TCTI = 10
_BASE_MASK = 0xFFFF
# ESYS base codes that mean the conversation with the TPM broke
_ESYS_TRANSPORT = frozenset({7, 8, 9, 10, 17, 19})  # BAD_SEQUENCE NO_CONNECTION TRY_AGAIN
#                                                   IO_ERROR MALFORMED_ / INSUFFICIENT_RESPONSE
_RC_WARN_RETRY = frozenset({TPM_RC.YIELDED, TPM_RC.TESTING, TPM_RC.RETRY})
_RC_WARN_REFERENCE = frozenset(range(0x910, 0x91F))  # REFERENCE_H0..H6, S0..S6: not loaded

_PT_MANUFACTURER = 0x105
_PT_FIRMWARE_VERSION_1 = 0x10B
_PT_FIRMWARE_VERSION_2 = 0x10C
_HANDLE_RANGES = (0x80000000, 0x02000000, 0x03000000)  # transient, loaded and saved sessions

_STORAGE_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
)


class _Kind(enum.Enum):
    RETRY = "retry"  # the TPM asks to repeat the command
    RECONNECT = "reconnect"  # transport broke, TPM rebooted, or our handles are gone
    REFUSED = "refused"  # the TPM answered and said no
    LOCAL = "local"  # the TSS refused before or after the TPM (e.g. response HMAC bad)


def _classify(e: TSS2_Exception) -> _Kind:
    rc = int(e.rc)
    layer = (rc >> _LAYER_SHIFT) & 0xFF
    base = rc & _BASE_MASK
    if layer == _LAYER_TCTI:
        return _Kind.RECONNECT
    if layer == _LAYER_ESYS:
        return _Kind.RECONNECT if base in _ESYS_TRANSPORT else _Kind.LOCAL
    if layer != _LAYER_TPM:
        return _Kind.LOCAL
    if base in _RC_WARN_RETRY:
        return _Kind.RETRY
    if base in _RC_WARN_REFERENCE or base in (TPM_RC.INITIALIZE, TPM_RC.REBOOT):
        return _Kind.RECONNECT
    return _Kind.REFUSED


def _resource_managed(tcti: str) -> bool:
    """True when a resource manager flushes other clients' objects for us."""
    name, _, conf = tcti.partition(":")
    return (name == "device" and "tpmrm" in conf) or name == "tabrmd"


# the Manager's hook for bringing its TPM back (its simulator), called while the TPM is down;
# the argument says whether it may start a new one now; returns the TCTI to use
Revive = Callable[[bool], str]


@dataclass(frozen=True, slots=True)
class SealedObject:
    """A sealed data object as the TPM returned it; useless off this TPM."""

    public: bytes  # marshalled TPM2B_PUBLIC
    private: bytes  # marshalled TPM2B_PRIVATE


class HardwareTpm:
    """The host TPM. Thread-safe: one lock around the ESAPI context."""

    def __init__(
        self,
        tcti: str,
        *,
        retries: int = 5,
        revive: Revive | None = None,
        recover_first: float = outage.FIRST,
    ) -> None:
        if not tcti or retries < 0 or not 0 <= recover_first <= outage.MAX:
            raise ConfigError(
                "a hardware TPM needs a TCTI string, retries >= 0 and a recovery delay "
                f"in 0..{outage.MAX:.0f} s"
            )
        self.tcti = tcti
        self.retries = retries
        self._revive = revive
        self._outage = outage.Outage(recover_first)
        self._lock = threading.RLock()
        self._ectx: Any = None
        self._primary: Any = None
        self._epoch: tuple[int, int] = (0, 0)
        self._description = tcti
        self._primary_name = b""

    # lifecycle -------------------------------------------------------------------------------

    def open(self) -> None:
        """Connect (retrying with backoff); raises HwTpmError when the TPM cannot be reached."""
        self.run("connecting", lambda _e: None)

    def close(self) -> None:
        with self._lock:
            ectx, primary = self._ectx, self._primary
            self._ectx = self._primary = None
            if ectx is None:
                return
            if primary is not None:
                with contextlib.suppress(TSS2_Exception):
                    ectx.flush_context(primary)
            ectx.close()

    def __enter__(self) -> HardwareTpm:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def description(self) -> str:
        return self._description

    @property
    def health(self) -> outage.Health:
        """The TPM as its last use found it (no TPM command is sent)."""
        with self._lock:
            h = self._outage.health()
            if h.state == "ok" or self._revive is None:
                return h
            return replace(h, error=f"{h.error}; the simulator is restarted in {h.retry_in:.0f} s")

    @property
    def primary_name(self) -> bytes:
        """TPM name of the storage primary (empty before open). It is the same on every open of
        the same TPM, so a caller can pin it to notice a substituted TPM or an interposer."""
        return self._primary_name

    def _connect(self) -> Any:
        """The open ESAPI context, connecting first if needed. Holds the lock."""
        ectx = self._ectx
        if ectx is not None:
            info = ectx.read_clock().clockInfo
            if (int(info.resetCount), int(info.restartCount)) == self._epoch:
                return ectx
            log.info("the hardware TPM restarted; recreating the storage primary")
            self._drop()
        ectx = ESAPI(self.tcti)
        try:
            try:
                info = ectx.read_clock().clockInfo
            except TSS2_Exception as e:
                if int(e.rc) != TPM_RC.INITIALIZE:
                    raise
                log.info("the hardware TPM needs TPM2_Startup; sending Startup(CLEAR)")
                ectx.startup(TPM2_SU.CLEAR)
                info = ectx.read_clock().clockInfo
            if not _resource_managed(self.tcti):
                self._flush_leftovers(ectx)
            self._primary = self._create_primary(ectx)
            name = bytes(ectx.tr_get_name(self._primary))
            if self._primary_name and name != self._primary_name:
                raise _OtherTpmError(
                    f"another TPM answers at {self.tcti}: its storage primary is not the one "
                    "this Manager opened first"
                )
            self._primary_name = name
            self._epoch = (int(info.resetCount), int(info.restartCount))
            self._description = f"{self.tcti} ({self._identify(ectx)})"
        except BaseException:
            self._primary = None
            ectx.close()
            raise
        self._ectx = ectx
        return ectx

    def _drop(self) -> None:
        """Forget a context whose TPM went away or rebooted (its handles mean nothing now)."""
        ectx, self._ectx, self._primary = self._ectx, None, None
        if ectx is not None:
            ectx.close()

    @staticmethod
    def _flush_leftovers(ectx: Any) -> None:
        # a session's handle may name the other session type (a saved policy session is listed
        # as 0x03.., a loaded one as 0x02.. or 0x03..), so ask again from the start of the range
        # after each batch: flushed handles are gone from the answer
        for first in _HANDLE_RANGES:
            for _ in range(LEFTOVER_ROUNDS):
                more, data = ectx.get_capability(TPM2_CAP.HANDLES, first, 64)
                for handle in data.data.handles:
                    log.info("flushing leftover TPM handle 0x%08x", int(handle))
                    ectx.flush_context(ectx.tr_from_tpmpublic(handle))
                if not more:
                    break

    @staticmethod
    def _create_primary(ectx: Any) -> Any:
        template = TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=_STORAGE_ATTRIBUTES,
        )
        detail = template.parameters.eccDetail
        detail.symmetric = TPMT_SYM_DEF.parse("aes128cfb")
        detail.scheme.scheme = TPM2_ALG.NULL
        detail.curveID = TPM2_ECC.NIST_P256
        detail.kdf.scheme = TPM2_ALG.NULL
        handle, *_ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(template))
        return handle

    @staticmethod
    def _identify(ectx: Any) -> str:
        _more, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, _PT_MANUFACTURER, 8)
        props = {int(p.property): int(p.value) for p in data.data.tpmProperties}
        maker = props.get(_PT_MANUFACTURER, 0).to_bytes(4, "big").strip(b"\0 ")
        fw1 = props.get(_PT_FIRMWARE_VERSION_1, 0)
        fw2 = props.get(_PT_FIRMWARE_VERSION_2, 0)
        firmware = f"{fw1 >> 16}.{fw1 & 0xFFFF}.{fw2 >> 16}.{fw2 & 0xFFFF}"
        return f"manufacturer {maker.decode('ascii', 'replace') or '?'}, fw {firmware}"

    # the retry loop: the door for the modules that add operations (sealing, attestation)

    @property
    def primary(self) -> Any:
        """ESYS handle of the storage primary; valid only inside an `op` given to `run`."""
        return self._primary

    def run(
        self, what: str, op: Callable[[Any], T], refused: Callable[[], Exception] | None = None
    ) -> T:
        """Run `op` on a connected context; retry and reconnect as `_classify` says.

        `refused` builds the error for a TPM that answered "no" (default: HwTpmError). While the
        TPM is down (see the module's rules) this raises HwTpmError at once."""
        with self._lock:
            attempts = self.retries + 1
            if self._outage.why:
                self._recover()
                attempts = 1  # the outage is known already: no retry loop
            try:
                result = self._attempts(what, op, refused, attempts)
            except _OtherTpmError as e:
                self._drop()
                self._outage.began(str(e))
                raise HwTpmError(str(e)) from None
            if self._outage.ended():
                log.warning("the hardware TPM at %s answers again", self.tcti)
            return result

    def _recover(self) -> None:
        """While down: let `revive` adopt or (when due) restart the simulator, perhaps at a new
        TCTI. Holds the lock."""
        if self._revive is None:
            return
        restart = self._outage.wait() <= 0
        if restart:
            self._outage.attempt()
        try:
            tcti = self._revive(restart)
        except HwTpmError as e:
            self._outage.began(f"the hardware TPM at {self.tcti} is unreachable: {e}")
            raise HwTpmError(self._outage.why) from None
        if tcti != self.tcti:
            log.info("the hardware TPM moved to %s", tcti)
            self._drop()
            self.tcti = tcti

    def _attempts(
        self,
        what: str,
        op: Callable[[Any], T],
        refused: Callable[[], Exception] | None,
        attempts: int,
    ) -> T:
        delay = BACKOFF_START
        last: TSS2_Exception | None = None
        for attempt in range(attempts):
            connected = False
            try:
                ectx = self._connect()
                connected = True
                return op(ectx)
            except TSS2_Exception as e:
                kind = _classify(e)
                log.debug("%s: attempt %d: %s (%s)", what, attempt + 1, e, kind.value)
                if kind is _Kind.REFUSED and connected and refused is not None:
                    raise refused() from None
                if kind in (_Kind.REFUSED, _Kind.LOCAL):
                    raise self._failed(what, e) from None
                if kind is _Kind.RECONNECT:
                    self._drop()
                last = e
            if attempt < attempts - 1:
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
        state = "busy" if last is not None and _classify(last) is _Kind.RETRY else "unreachable"
        why = (
            f"the hardware TPM at {self.tcti} is {state} "
            f"({attempts} attempt{'s' if attempts > 1 else ''}; last error: {last})"
        )
        if state == "unreachable":
            self._outage.began(why)
        raise HwTpmError(f"{why} while {what}")

    def _failed(self, what: str, e: TSS2_Exception) -> HwTpmError:
        return HwTpmError(f"the hardware TPM failed while {what}: {e}")

    @contextlib.contextmanager
    def flushing(self, ectx: Any) -> Iterator[list[Any]]:
        """Collect handles to flush when the block ends, however it ends."""
        handles: list[Any] = []
        try:
            yield handles
        finally:
            for h in reversed(handles):
                try:
                    ectx.flush_context(h)
                except TSS2_Exception as e:  # the TPM is gone or rebooted: nothing to flush
                    log.debug("flushing a handle failed: %s", e)

    def salted_session(self, ectx: Any, kind: Any, attributes: Any) -> Any:
        """A session salted to the storage primary, with AES-128-CFB parameter encryption."""
        session = ectx.start_auth_session(
            self._primary, ESYS_TR.NONE, kind, TPMT_SYM_DEF.parse("aes128cfb"), TPM2_ALG.SHA256
        )
        ectx.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION | attributes)
        return session

    # operations ------------------------------------------------------------------------------

    def read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        """Current SHA-256 values of `pcrs`."""
        wanted = policy.check_pcrs(pcrs)

        def op(ectx: Any) -> dict[int, bytes]:
            out: dict[int, bytes] = {}
            for i in range(0, len(wanted), PCRS_PER_READ):
                chunk = list(wanted[i : i + PCRS_PER_READ])
                while chunk:
                    sel, _ = TPML_PCR_SELECTION.unmarshal(policy.pcr_selection(chunk))
                    _counter, sel_out, digests = ectx.pcr_read(sel)
                    got = _selected_sha256(sel_out)
                    if not got or len(got) != len(digests) or not set(got) <= set(chunk):
                        raise HwTpmError(f"the hardware TPM did not return PCRs {chunk}")
                    for index, digest in zip(got, digests, strict=True):
                        out[index] = bytes(digest)
                    chunk = [c for c in chunk if c not in out]
            return out

        return self.run("reading PCRs", op)


class _OtherTpmError(HwTpmError):
    """Raised inside `_connect` when the pinned storage primary does not come back."""


def _selected_sha256(sel: Any) -> list[int]:
    """PCR indices a TPML_PCR_SELECTION selects in the SHA-256 bank, in ascending order."""
    out: list[int] = []
    for k in range(int(sel.count)):
        s = sel.pcrSelections[k]
        if int(s.hash) != TPM_ALG.SHA256:
            continue
        bitmap = bytes(s.pcrSelect)[: int(s.sizeofSelect)]
        out.extend(8 * i + b for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1)
    return out
