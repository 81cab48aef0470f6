"""The front-door protocol: what the swtpm-compatible executables ask of the Manager.

`swtpm_setup` and `swtpm socket` (vtpm's own, in the compat directory) are started by an
orchestrator (libvirt, Proxmox, Incus, LXD, a test harness) as its user. They do not hold any
vTPM key: they reach the Manager's front-door socket, name the state location the orchestrator
gave, hand over open descriptors, and the Manager does the rest with instances it spawns itself.

Carried by the Manager IPC framing (`vtpm.wire.ipc`) like the admin protocol: a request is an
`AdminRequest(op, args)`, each answer an `AdminReply`, in the JSON form `vtpm.wire.typedjson`
gives the dataclasses below. Descriptors ride as SCM_RIGHTS on the request frame (the first
`sendmsg` of it); `FDS_MAX` bound them. The request's `fds` field says what each one is, in
order; the receiver closes any it did not expect and refuses the request.

Conversations:
  setup   client: Setup + fds [state]               server: one reply (SetupResult or error)
  attach  client: Attach + fds [state, sockets...]  server: Attached once the instance serves
          (or an error); later Ended when the instance exits. The client may send Detach to
          have the instance stopped (it then gets Ended); closing the connection (the
          front-door process killed) also stops the instance, with its state stored.

Secrets (`secret`, `migration_secret`: the orchestrator's passphrases, read from its pwd fds)
travel only on this socket, are never logged and never written anywhere in clear.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, TypeVar

from vtpm.errors import RequestError
from vtpm.wire import typedrequest
from vtpm.wire.ipc_events import AdminReply, AdminRequest
from vtpm.wire.typedjson import Bounds

R = TypeVar("R")
Request = typedrequest.Request  # the base of this protocol's requests (`compat.Request`)

DEFAULT_SOCKET = "/run/vtpm/compat.sock"  # where the front door listens unless configured
SOCKET_ENV = "VTPM_COMPAT_SOCKET"  # the compat programs' override of DEFAULT_SOCKET
FDS_MAX = 4  # state + ctrl + server, with room for one more
SECRET_MAX = 4096  # bytes of a passphrase read from a pwd fd
Pid = Annotated[int, Bounds(1, 2**31 - 1)]
ExitCode = Annotated[int, Bounds(-255, 255)]  # negative: killed by that signal


class StateKind(enum.StrEnum):
    DIR = "dir"  # a directory (`--tpmstate dir=`, `dir://`, `--tpm-state`)
    FILE = "file"  # one regular file or block device (`backend-uri=file://`)


class FdRole(enum.StrEnum):
    STATE = "state"  # O_PATH/O_RDONLY of the directory, or O_RDWR of the file
    CTRL = "ctrl"  # a listening socket: the swtpm control channel (`--ctrl`)
    SERVER = "server"  # a listening socket: the raw TPM data channel (`--server`)


class Overwrite(enum.StrEnum):
    FAIL = "fail"  # neither flag: an existing vTPM at this location is an error
    KEEP = "keep"  # --not-overwrite: an existing vTPM is kept, success
    REPLACE = "replace"  # --overwrite: an existing vTPM is deleted (key erased), a new one made


@dataclass(frozen=True, slots=True)
class StateLocation:
    kind: StateKind
    path: str  # absolute, as the orchestrator named it, scheme stripped


# results ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SetupResult:
    uuid: uuid.UUID
    label: str
    group: str
    created: bool  # False: --not-overwrite found one and kept it (or --reconfigure)
    eks: tuple[str, ...]  # provisioned at this setup ("rsa2048", "ecc256", "platform")
    pcr_banks: tuple[str, ...]  # active after this setup ("sha256", ...); () = unchanged


@dataclass(frozen=True, slots=True)
class Attached:
    uuid: uuid.UUID
    label: str
    pid: Pid  # the instance process the Manager spawned


@dataclass(frozen=True, slots=True)
class Ended:
    exit_code: ExitCode
    reason: str = ""  # the instance's last error line, "" after an orderly exit


# requests -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup(Request[SetupResult]):
    """`swtpm_setup`: make (or keep, or reconfigure) the vTPM of a state location."""

    op: ClassVar[str] = "compat.setup"
    result: ClassVar[Any] = SetupResult
    state: StateLocation
    fds: tuple[FdRole, ...]  # (STATE,)
    vm_uuid: uuid.UUID | None = None  # from --vmid NAME:UUID, or the state path
    vm_name: str | None = None  # from --vmid: the label's user field is made of it
    eks: tuple[str, ...] = ("rsa2048",)  # ("ecc256",) with --ecc; () without --createek
    ek_certs: bool = True  # --create-ek-cert
    platform_cert: bool = False  # --create-platform-cert
    lock_nvram: bool = True  # --lock-nvram
    pcr_banks: tuple[str, ...] = ()  # --pcr-banks; () = the TPM's default
    reconfigure: bool = False  # --reconfigure: change the banks of the existing vTPM only
    overwrite: Overwrite = Overwrite.FAIL
    secret: bytes | None = None  # --pwdfile-fd: a second factor on the state


@dataclass(frozen=True, slots=True)
class Attach(Request[Attached]):
    """`swtpm socket`: run the vTPM of a state location on the listening sockets passed."""

    op: ClassVar[str] = "compat.attach"
    result: ClassVar[Any] = Attached
    state: StateLocation
    fds: tuple[FdRole, ...]  # (STATE, CTRL[, SERVER]) or (STATE, SERVER)
    vm_uuid: uuid.UUID | None = None
    terminate: bool = False  # --terminate: end when the control channel's client leaves
    startup_clear: bool = False  # --flags startup-clear
    secret: bytes | None = None  # --key pwdfd= / fd= / file=
    migration_secret: bytes | None = None  # --migration-key pwdfd=
    incoming: bool = False  # --migration incoming
    release_lock_outgoing: bool = False  # --migration release-lock-outgoing


@dataclass(frozen=True, slots=True)
class Detach(Request[Ended]):
    """On an attached connection: stop the instance (state stored); answered by Ended."""

    op: ClassVar[str] = "compat.detach"
    result: ClassVar[Any] = Ended


REQUESTS: dict[str, type[Request[Any]]] = {cls.op: cls for cls in (Setup, Attach, Detach)}


request_frame = typedrequest.request_frame
reply_frame = typedrequest.reply_frame


def parse_request(frame: AdminRequest) -> Request[Any]:
    """The typed request in `frame`, its secrets bounded; RequestError naming the problem."""
    req = typedrequest.parse_request(REQUESTS, frame, "front-door operation")
    for name in ("secret", "migration_secret"):
        value = getattr(req, name, None)
        if value is not None and not 1 <= len(value) <= SECRET_MAX:
            raise RequestError(f"{frame.op}.{name}: 1..{SECRET_MAX} bytes")
    return req


def parse_result(cls: type[R], reply: AdminReply, what: str) -> R:
    """The result of type `cls` in `reply`; RemoteProtocolError if it has another form."""
    out: R = typedrequest.parse_result(cls, reply, what)
    return out
