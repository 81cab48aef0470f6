"""The records the Manager's store reads and writes (`vtpm.manager.store`), as frozen values.

Kept apart from the store so the SQL and the shapes it fills change for their own reasons; the
store re-exports them, so `from vtpm.manager.store import GroupRecord` keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from vtpm.tpm.policy import PcrState


@dataclass(frozen=True, slots=True)
class GroupRecord:
    uuid: UUID
    name: str
    owner_pub: bytes  # PEM
    seq: int
    pcr_states: tuple[PcrState, ...]
    labels: tuple[str, ...]
    sealed_public: bytes
    sealed_private: bytes
    sealed_root: bytes  # the states root the sealed key's policy was built from
    approval: bytes  # the owner's TPM approval of pcr_states (empty until the owner signs one)
    created: float = 0.0
    ak_alg: str = ""  # "ecc" or "rsa"; "" while the group has no attestation key yet
    ak_public: bytes = b""  # the AK as the hardware TPM returned it: TPM2B_PUBLIC
    ak_private: bytes = b""  # ... and TPM2B_PRIVATE (useless off that TPM)
    approval_nv: int = 0  # NV index in the hardware TPM behind the owner's approvals; 0: none
    ca: GroupCaRecord | None = None  # the group CA (`vtpm.manager.ca`); None until made


@dataclass(frozen=True, slots=True)
class GroupCaRecord:
    """A group's CA: its key as the hardware TPM's blobs, its self-signed certificate, and the
    group AK's TPM2_Certify of the key (TPMS_ATTEST, TPMT_SIGNATURE)."""

    public: bytes  # TPM2B_PUBLIC
    private: bytes  # TPM2B_PRIVATE (useless off that TPM, and without the group key)
    certificate: bytes  # DER
    certify_attest: bytes
    certify_signature: bytes


@dataclass(frozen=True, slots=True)
class CertRecord:
    """A certificate the group CA issued to a vTPM, and the TPM name of the key it is about."""

    kind: str  # "ek-rsa2048", "ek-ecc256", "ek-ecc384", "platform"
    ek_name: bytes  # nameAlg || H(TPMT_PUBLIC) of the certified key
    certificate: bytes  # DER


@dataclass(frozen=True, slots=True)
class VtpmRecord:
    uuid: UUID
    group_uuid: UUID
    label: str
    tpm: str
    owner_uid: int | None
    owner_gid: int | None
    frontends: tuple[str, ...]  # endpoint specs: "ctrl=unix:/path", "server=tcp:...", ...
    wrapped_key: bytes = b""
    wanted_running: bool = False
    created: float = 0.0
    accept_state: bool = False  # the next start accepts unrecorded on-disk state, once


@dataclass(frozen=True, slots=True)
class LocationRecord:
    """Where a front-door vTPM's state is: the orchestrator's path, as it named it, and the
    directory's or file's identity when it was set up (a path whose inode changed is another
    directory: the orchestrator removed the vTPM and made a new one there)."""

    vtpm_uuid: UUID
    kind: str  # `vtpm.wire.compat.StateKind`: "dir" or "file"
    path: str
    st_dev: int
    st_ino: int
    secret_check: bytes = b""  # HMAC of the vTPM's secret (`vtpm.manager.statesecret`); b"": none


@dataclass(frozen=True, slots=True)
class StateDigest:
    name: str
    counter: int
    digest: bytes


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    ts: float
    actor: str
    action: str
    target: str
    outcome: str
    detail: str
