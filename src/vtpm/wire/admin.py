"""The Manager's admin protocol as types: one frozen request and one result per operation.

Carried by the Manager IPC framing (`vtpm.wire.ipc`): a request travels as
`AdminRequest(op, args)`, its result as `AdminReply(ok=True, result)`, each in the JSON form
`vtpm.wire.typedjson` gives the dataclass (field names are the JSON keys). Both ends use the
types: the CLI builds a request and gets its typed result back; the Manager receives the typed
request and answers with the typed result. Adding an operation is one request class here (its
`op` name and result type) and one case in the Manager's dispatch.

Checks on the way in are part of the types: integers are bounded (`Bounds`), uuids, hex and
frontends parse, unknown or missing fields are refused. A request that fails them is a
`RequestError` (the Manager answers it, naming the field); a result that fails them means the
Manager spoke outside the protocol (`RemoteProtocolError` at the client).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, TypeVar

from vtpm.endpoints import Frontend
from vtpm.tpm import ektemplates
from vtpm.tpm.policy import Epoch, PcrState
from vtpm.wire import typedrequest
from vtpm.wire.evidence import Bundle, Evidence
from vtpm.wire.ipc_events import AdminReply, AdminRequest
from vtpm.wire.typedjson import Bounds, Document

R = TypeVar("R")
Request = typedrequest.Request  # the base of this protocol's requests (`api.Request`)

Id = Annotated[int, Bounds(0, 2**32 - 2)]  # a uid or gid ((uid_t)-1 means "none")
Pcr = Annotated[int, Bounds(0, 23)]
Limit = Annotated[int, Bounds(1, 100_000)]
Count = Annotated[int, Bounds(0, 2**63 - 1)]
PCRS_DEFAULT = tuple(range(8))
DEFAULT_EKS = ektemplates.DEFAULT_PROVISION


# results ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupStatusView:
    unlocked: bool
    reason: str = ""
    matched_state: Count | None = None  # index of the permitted state the host is in
    differing_pcrs: dict[str, str] = field(default_factory=dict)  # PCR -> current value (hex)


@dataclass(frozen=True, slots=True)
class GroupView:
    uuid: uuid.UUID
    name: str
    seq: Count
    owner_pub: str
    labels: tuple[str, ...]
    pcr_states: tuple[PcrState, ...]
    owner_approved: bool
    ak: str | None
    vtpms: Count
    status: GroupStatusView
    approval_epoch: Epoch | None = None  # the group's approval counter now; sign for value + 1


@dataclass(frozen=True, slots=True)
class RunView:
    """A vTPM's instance as the supervisor sees it."""

    state: str  # stopped, starting, running, restarting, failed
    wanted_running: bool
    pid: Count | None = None
    restarts: Count = 0
    last_exit: int | None = None
    failed: str = ""
    log: str = ""
    tpm_failed: str = ""  # why the running instance's TPM cannot serve ("" while it can)


@dataclass(frozen=True, slots=True)
class VtpmView:
    uuid: uuid.UUID
    group: str
    label: str
    tpm: str
    owner_uid: Id | None
    owner_gid: Id | None
    frontends: tuple[Frontend, ...]
    state_dir: str
    state_blobs: dict[str, str]  # blob name -> SHA-256 (hex) the Manager recorded
    run: RunView


@dataclass(frozen=True, slots=True)
class HardwareTpmView:
    description: str
    simulated: bool
    tcti: str
    note: str = ""
    state: str = "ok"  # "ok", or "down": it did not answer at its last use
    error: str = ""  # why it is down, and when the Manager tries it again


@dataclass(frozen=True, slots=True)
class VtpmCounts:
    total: Count
    running: Count


@dataclass(frozen=True, slots=True)
class StatusView:
    pid: Count
    data_dir: str
    uptime: float
    hardware_tpm: HardwareTpmView
    groups: tuple[GroupView, ...]
    vtpms: VtpmCounts
    instance_pids: tuple[Count, ...]


@dataclass(frozen=True, slots=True)
class AuditView:
    id: Count
    ts: float
    actor: str
    action: str
    target: str
    outcome: str
    detail: str  # JSON text


@dataclass(frozen=True, slots=True)
class ActivateResult:
    secret: bytes


@dataclass(frozen=True, slots=True)
class LaunchResult:
    vtpm: VtpmView
    launch_file: str
    record: Document  # a launch record document (`vtpm.launchrecord.LaunchRecord`)


@dataclass(frozen=True, slots=True)
class CertsView:
    """A vTPM's certificates as its group CA issued them (kind -> DER; kinds not issued are
    absent) and the group CA's certificate (DER; empty while the group has no CA)."""

    certificates: dict[str, bytes]
    ca_certificate: bytes


# requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Status(Request[StatusView]):
    op: ClassVar[str] = "status"
    result: ClassVar[Any] = StatusView


@dataclass(frozen=True, slots=True)
class PcrsRead(Request[dict[str, str]]):
    """The host's SHA-256 PCR values (PCR index -> hex)."""

    op: ClassVar[str] = "pcrs.read"
    result: ClassVar[Any] = dict[str, str]
    pcrs: tuple[Pcr, ...] = PCRS_DEFAULT


@dataclass(frozen=True, slots=True)
class GroupNew(Request[GroupView]):
    op: ClassVar[str] = "group.new"
    result: ClassVar[Any] = GroupView
    name: str
    owner_pub: str  # PEM
    pcrs: tuple[Pcr, ...] = PCRS_DEFAULT
    labels: tuple[str, ...] = ()
    ak: str = "ecc"


@dataclass(frozen=True, slots=True)
class GroupList(Request[tuple[GroupView, ...]]):
    op: ClassVar[str] = "group.list"
    result: ClassVar[Any] = tuple[GroupView, ...]


@dataclass(frozen=True, slots=True)
class GroupShow(Request[GroupView]):
    op: ClassVar[str] = "group.show"
    result: ClassVar[Any] = GroupView
    group: str  # name or uuid


@dataclass(frozen=True, slots=True)
class GroupUpdate(Request[GroupView]):
    op: ClassVar[str] = "group.update"
    result: ClassVar[Any] = GroupView
    group: str
    request: str  # the owner-signed request document (`vtpm.manager.ownerreq`)


@dataclass(frozen=True, slots=True)
class GroupDel(Request[None]):
    op: ClassVar[str] = "group.del"
    result: ClassVar[Any] = type(None)
    group: str


@dataclass(frozen=True, slots=True)
class GroupProvision(Request[Bundle]):
    op: ClassVar[str] = "group.provision"
    result: ClassVar[Any] = Bundle
    group: str


@dataclass(frozen=True, slots=True)
class GroupActivate(Request[ActivateResult]):
    op: ClassVar[str] = "group.activate"
    result: ClassVar[Any] = ActivateResult
    group: str
    credential_blob: bytes
    encrypted_secret: bytes


@dataclass(frozen=True, slots=True)
class VtpmNew(Request[VtpmView]):
    op: ClassVar[str] = "vtpm.new"
    result: ClassVar[Any] = VtpmView
    group: str
    label: str
    tpm: str = "2.0"
    uuid: uuid.UUID | None = None
    owner_uid: Id | None = None
    owner_gid: Id | None = None  # the owner's uid when only a uid is given
    frontends: tuple[Frontend, ...] = ()
    start: bool = False
    # EKs provisioned at the first start (`--ek`; "platform": a platform certificate); a TPM
    # 1.2 vTPM gets none
    eks: tuple[str, ...] = DEFAULT_EKS


@dataclass(frozen=True, slots=True)
class VtpmEkProvision(Request[VtpmView]):
    """Provision EKs and certificates in an existing vTPM: its instance is restarted once
    with `--ek` (kept EKs and locked certificates are left as they are)."""

    op: ClassVar[str] = "vtpm.ek.provision"
    result: ClassVar[Any] = VtpmView
    uuid: uuid.UUID
    eks: tuple[str, ...] = DEFAULT_EKS


@dataclass(frozen=True, slots=True)
class VtpmList(Request[tuple[VtpmView, ...]]):
    op: ClassVar[str] = "vtpm.list"
    result: ClassVar[Any] = tuple[VtpmView, ...]
    group: str | None = None


@dataclass(frozen=True, slots=True)
class VtpmShow(Request[VtpmView]):
    op: ClassVar[str] = "vtpm.show"
    result: ClassVar[Any] = VtpmView
    uuid: uuid.UUID


@dataclass(frozen=True, slots=True)
class VtpmStart(Request[VtpmView]):
    op: ClassVar[str] = "vtpm.start"
    result: ClassVar[Any] = VtpmView
    uuid: uuid.UUID


@dataclass(frozen=True, slots=True)
class VtpmStop(Request[VtpmView]):
    op: ClassVar[str] = "vtpm.stop"
    result: ClassVar[Any] = VtpmView
    uuid: uuid.UUID


@dataclass(frozen=True, slots=True)
class VtpmDel(Request[None]):
    op: ClassVar[str] = "vtpm.del"
    result: ClassVar[Any] = type(None)
    uuid: uuid.UUID


@dataclass(frozen=True, slots=True)
class VtpmAcceptState(Request[VtpmView]):
    """The vTPM's next start accepts the state on disk that opens under its key but is not
    the state recorded (an older copy put back on purpose), and records it; once."""

    op: ClassVar[str] = "vtpm.accept-state"
    result: ClassVar[Any] = VtpmView
    uuid: uuid.UUID


@dataclass(frozen=True, slots=True)
class VtpmCerts(Request[CertsView]):
    """The vTPM's EK and platform certificates and its group CA's certificate."""

    op: ClassVar[str] = "vtpm.certs"
    result: ClassVar[Any] = CertsView
    uuid: uuid.UUID


@dataclass(frozen=True, slots=True)
class VtpmLaunch(Request[LaunchResult]):
    op: ClassVar[str] = "vtpm.launch"
    result: ClassVar[Any] = LaunchResult
    uuid: uuid.UUID
    record: Document  # a launch record document
    label: str | None = None  # the label the launcher requires of the vTPM


@dataclass(frozen=True, slots=True)
class VtpmLaunchCancel(Request[VtpmView]):
    op: ClassVar[str] = "vtpm.launch.cancel"
    result: ClassVar[Any] = VtpmView
    uuid: uuid.UUID


@dataclass(frozen=True, slots=True)
class QuoteDeep(Request[Evidence]):
    op: ClassVar[str] = "quote.deep"
    result: ClassVar[Any] = Evidence
    uuid: uuid.UUID
    nonce: bytes
    pcrs: tuple[Pcr, ...] = ()  # host PCRs; empty: those of the group's first state
    vtpm_pcrs: tuple[Pcr, ...] = ()


@dataclass(frozen=True, slots=True)
class Audit(Request[tuple[AuditView, ...]]):
    op: ClassVar[str] = "audit"
    result: ClassVar[Any] = tuple[AuditView, ...]
    limit: Limit = 50


REQUESTS: dict[str, type[Request[Any]]] = {
    cls.op: cls
    for cls in (
        Status,
        PcrsRead,
        GroupNew,
        GroupList,
        GroupShow,
        GroupUpdate,
        GroupDel,
        GroupProvision,
        GroupActivate,
        VtpmNew,
        VtpmList,
        VtpmShow,
        VtpmStart,
        VtpmStop,
        VtpmDel,
        VtpmAcceptState,
        VtpmCerts,
        VtpmEkProvision,
        VtpmLaunch,
        VtpmLaunchCancel,
        QuoteDeep,
        Audit,
    )
}

# the two directions ---------------------------------------------------------------------------


request_frame = typedrequest.request_frame


def parse_request(frame: AdminRequest) -> Request[Any]:
    """The typed request in `frame`; RequestError naming the problem."""
    return typedrequest.parse_request(REQUESTS, frame, "operation")


def reply_frame(req: Request[R], result: R) -> AdminReply:
    return typedrequest.reply_frame(result)


def parse_result(req: Request[R], reply: AdminReply) -> R:
    """The typed result of `req` in `reply` (ok); RemoteProtocolError if it has another form."""
    out: R = typedrequest.parse_result(req.result, reply, f"{req.op} result")
    return out
