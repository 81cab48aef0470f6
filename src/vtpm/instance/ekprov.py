"""Provisioning a vTPM's endorsement keys and their certificates, inside the instance.

What a provisioned TPM 2.0 vTPM carries (TCG EK Credential Profile; `vtpm.tpm.ektemplates`):
each EK asked for, made by TPM2_CreatePrimary from its TCG template in the endorsement
hierarchy and persisted at its TCG handle (RSA 2048 at 0x81010001, ECC P-256 at 0x8101000A,
ECC P-384 at 0x81010016), and its certificate, asked from the Manager (`certify`, whose CA
signs it), in its NV index (0x01C00002, 0x01C0000A, 0x01C00016); the platform certificate,
whose subject key is the RSA EK, in 0x01C08000. The indices are defined as swtpm_setup defines
them: by the platform (PLATFORMCREATE, so the owner cannot undefine them), readable with their
empty auth, owner or platform auth (AUTHREAD, OWNERREAD, PPREAD), written only with platform
auth (PPWRITE), NO_DA, and WRITEDEFINE, then write-locked (TPM2_NV_WriteLock): no one writes
them again, the platform included, unless the platform undefines them.

When: once. The Manager passes `--ek` to the instance process at the vTPM's first start and
when `vtpm ek provision` asks (never at its other starts), because provisioning needs a
TPM2_Startup(CLEAR) of its own and ends with TPM2_Shutdown(CLEAR): a guest's saved TPM
session (Startup(STATE)) does not survive it, as after a reboot.

Idempotent, so a crash midway is cured by running it again: an EK already persisted with the
same public area stays; another object at its handle is evicted; a certificate index that is
already write-locked is left as it is; one defined but not locked (a crash between define and
lock) is undefined and written afresh.

Without a certificate source (a standalone instance: no Manager) the keys are persisted and
no certificate is written; the caller warns. A certificate the Manager refuses (the group has
no CA) is logged as an error and left out, the key persisted: the vTPM still starts, and
`vtpm ek provision` writes the certificate later (the key is the same: EKs are deterministic).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vtpm.errors import ConfigError, ManagerError, TpmResponseError
from vtpm.tpm import ektemplates as ekt
from vtpm.tpm import provcmds as pc

log = logging.getLogger(__name__)

Execute = Callable[[bytes], bytes]
# kind ("ek-rsa2048", ..., "platform"), the EK's TPM2B_PUBLIC -> the certificate (DER)
Certify = Callable[[str, bytes], bytes]
MAX_CERT = 2048  # libtpms' largest NV index (MAX_NV_INDEX_SIZE)


@dataclass(frozen=True, slots=True)
class Request:
    """What to provision: EKs by `--ek` option name, and whether a platform certificate."""

    eks: tuple[str, ...] = ()
    platform: bool = False

    def __post_init__(self) -> None:
        for e in self.eks:
            if e not in ekt.EKS:
                raise ConfigError(f"--ek {e}: use any of {', '.join(ekt.EKS)}")

    @classmethod
    def parse(cls, text: str, platform: bool = False) -> Request:
        """`--ek rsa2048,ecc256,...` (with "platform" among them meaning a platform cert)."""
        names = [n.strip() for n in text.split(",") if n.strip()]
        platform = platform or ekt.PLATFORM in names
        eks = tuple(dict.fromkeys(n for n in names if n != ekt.PLATFORM))
        return cls(eks, platform)

    def spell(self) -> str:
        return ",".join([*self.eks, *([ekt.PLATFORM] if self.platform else [])])

    def __bool__(self) -> bool:
        return bool(self.eks) or self.platform


@dataclass(frozen=True, slots=True)
class Provisioned:
    kind: str
    public: bytes  # TPM2B_PUBLIC of the EK
    # "written", "present" (locked already, left), "none" (no certificate source), "refused"
    certificate: str


class Provisioner:
    """Runs `Request`s against a started TPM 2.0 through `execute`."""

    def __init__(self, execute: Execute, certify: Certify | None) -> None:
        self._execute = execute
        self._certify = certify

    def run(self, request: Request) -> list[Provisioned]:
        done: list[Provisioned] = []
        rsa_public: bytes | None = None
        for option in request.eks:
            spec = ekt.EKS[option]
            public = self._persist(spec)
            if spec is ekt.RSA2048:
                rsa_public = public
            done.append(
                Provisioned(spec.kind, public, self._cert(spec.kind, spec.cert_index, public))
            )
        if request.platform:
            if rsa_public is None:  # the platform certificate's subject key is the RSA EK
                rsa_public = self._transient_public(ekt.RSA2048)
            state = self._cert(ekt.PLATFORM, ekt.PLATFORM_CERT_INDEX, rsa_public)
            done.append(Provisioned(ekt.PLATFORM, rsa_public, state))
        return done

    # keys -----------------------------------------------------------------------------------

    def _create(self, spec: ekt.EkSpec) -> pc.Primary:
        return pc.parse_create_primary(
            self._execute(pc.create_primary(pc.TPM_RH_ENDORSEMENT, spec.template))
        )

    def _transient_public(self, spec: ekt.EkSpec) -> bytes:
        primary = self._create(spec)
        self._flush(primary.handle)
        return primary.public

    def _flush(self, handle: int) -> None:
        pc.expect_success(self._execute(pc.flush_context(handle)), "TPM2_FlushContext")

    def _persist(self, spec: ekt.EkSpec) -> bytes:
        """The EK at its persistent handle (made, or found there); its TPM2B_PUBLIC."""
        primary = self._create(spec)
        try:
            there = pc.parse_read_public(self._execute(pc.read_public(spec.persistent)))
            if there == primary.public:
                return primary.public
            if there is not None:  # another key holds the EK's handle
                log.warning("evicting the object at 0x%08x: it is not the EK", spec.persistent)
                self._evict(spec.persistent, spec.persistent)
            self._evict(primary.handle, spec.persistent)
            log.info("%s persisted at 0x%08x", spec.kind, spec.persistent)
            return primary.public
        finally:
            self._flush(primary.handle)

    def _evict(self, obj: int, persistent: int) -> None:
        response = self._execute(pc.evict_control(pc.TPM_RH_OWNER, obj, persistent))
        pc.expect_success(response, "TPM2_EvictControl")

    # certificates -----------------------------------------------------------------------------

    def _cert(self, kind: str, index: int, public: bytes) -> str:
        nv = pc.parse_nv_read_public(self._execute(pc.nv_read_public(index)))
        if nv is not None and nv.attributes & pc.TPMA_NV_WRITELOCKED:
            return "present"
        if self._certify is None:
            return "none"
        try:
            der = self._certify(kind, public)
        except ManagerError as e:  # e.g. the group has no CA: the key stays, uncertified
            log.error("%s: no certificate written: %s (provision again later)", kind, e)
            return "refused"
        if not 0 < len(der) <= MAX_CERT:
            raise TpmResponseError(
                f"the {kind} certificate of {len(der)} bytes does not fit NV (1..{MAX_CERT})"
            )
        auth = pc.TPM_RH_PLATFORM
        if nv is not None:  # defined, not locked: a provisioning that did not finish
            pc.expect_success(self._execute(pc.nv_undefine_space(auth, index)), "NV_UndefineSpace")
        define = pc.nv_define_space(auth, index, len(der), pc.CERT_INDEX_ATTRIBUTES)
        pc.expect_success(self._execute(define), "TPM2_NV_DefineSpace")
        for off in range(0, len(der), pc.NV_WRITE_CHUNK):
            chunk = der[off : off + pc.NV_WRITE_CHUNK]
            pc.expect_success(self._execute(pc.nv_write(auth, index, off, chunk)), "TPM2_NV_Write")
        pc.expect_success(self._execute(pc.nv_write_lock(auth, index)), "TPM2_NV_WriteLock")
        log.info("%s certificate (%d bytes) written to NV 0x%08x, locked", kind, len(der), index)
        return "written"


def summary(done: Sequence[Provisioned]) -> str:
    return ", ".join(f"{p.kind} (certificate {p.certificate})" for p in done)
