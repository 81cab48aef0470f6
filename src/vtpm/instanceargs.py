"""The command line of a vTPM instance process (`vtpm instance run ...`), spelled once.

The Manager builds it (`ManagedInstance.argv`) and `vtpm.cli.instance_cmd` parses it, both with
the flag names below, so the two cannot drift apart.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from vtpm.endpoints import Frontend, FrontendKind

COMMAND = ("instance", "run")
UUID = "--uuid"
TPM = "--tpm"
STATE_DIR = "--state-dir"
LABEL = "--label"
LABELS_FILE = "--labels-file"
SOCKET_OWNER = "--socket-owner"
SOCKET_GROUP = "--socket-group"
SOCKET_MODE = "--socket-mode"
MANAGER_FD = "--manager-fd"
LOG_FILE = "--log-file"
LAUNCH = "--launch"
EK = "--ek"
PLATFORM_CERT = "--platform-cert"
# the front door's (`vtpm.wire.compat`) instances
STATE_FILE = "--state-file"  # one file or block device instead of --state-dir
TERMINATE = "--terminate"  # end when the control channel's client leaves
STARTUP_CLEAR = "--startup-clear"
PCR_BANKS = "--pcr-banks"  # allocate these banks at this start (once, like --ek)
# a secret mixed into the transfer-blob key (a flag name, not a password)
MIGRATION_SECRET_FD = "--migration-secret-fd"  # noqa: S105
ACCEPT_STATE = "--accept-state"  # accept on-disk blobs the Manager does not record (once)
FRONTEND_FLAGS: dict[FrontendKind, str] = {
    FrontendKind.CTRL: "--ctrl",
    FrontendKind.SERVER: "--server",
    FrontendKind.MSSIM: "--mssim",
}


TEMPLATE_COMMAND = ("instance", "template")
TEMPLATE_FD = "--fd"


def program() -> list[str]:
    """How this Python runs the instance command."""
    return [sys.executable, "-m", "vtpm.cli.main", *COMMAND]


def fd_endpoint(fd: int) -> str:
    """The endpoint text of an inherited listening socket (UNIX or TCP, whichever it is)."""
    return f"fd:{fd}"


def proc_fd(fd: int) -> Path:
    """The path an instance opens an inherited descriptor by (its state location)."""
    return Path(f"/proc/self/fd/{fd}")


def template_program(fd: int, log_file: Path) -> list[str]:
    """How this Python runs the fork server's template, serving spawn requests on fd."""
    return [
        *(sys.executable, "-m", "vtpm.cli.main", *TEMPLATE_COMMAND),
        *(TEMPLATE_FD, str(fd), LOG_FILE, str(log_file)),
    ]


@dataclass(frozen=True, slots=True)
class ManagedInstance:
    """What the Manager tells an instance it spawns (the link and log come per process).

    A front-door instance (`vtpm.wire.compat`) has no label check on its sockets (`label`
    None: the orchestrator made those sockets, their permissions are the boundary), its state
    where the orchestrator put it (`state_file` for one file or block device), and serves
    listening sockets it inherits (`fd_frontends`: kind and descriptor number)."""

    vtpm_uuid: uuid.UUID
    tpm: str
    state_dir: Path
    label: str | None
    frontends: tuple[Frontend, ...]
    socket_owner: int | None = None
    socket_group: int | None = None  # given: the sockets are 0660 to it
    labels_file: Path | None = None
    state_file: bool = False  # `state_dir` names one file (or block device): --state-file
    fd_frontends: tuple[tuple[FrontendKind, int], ...] = ()
    terminate: bool = False
    startup_clear: bool = False
    migration_secret_fd: int | None = None

    def argv(self) -> list[str]:
        args = [UUID, str(self.vtpm_uuid), TPM, self.tpm]
        args += [STATE_FILE if self.state_file else STATE_DIR, str(self.state_dir)]
        if self.label is not None:
            args += [LABEL, self.label]
        for f in self.frontends:
            args += [FRONTEND_FLAGS[f.kind], str(f.endpoint)]
        for kind, fd in self.fd_frontends:
            args += [FRONTEND_FLAGS[kind], fd_endpoint(fd)]
        if self.terminate:
            args.append(TERMINATE)
        if self.startup_clear:
            args.append(STARTUP_CLEAR)
        if self.migration_secret_fd is not None:
            args += [MIGRATION_SECRET_FD, str(self.migration_secret_fd)]
        if self.socket_owner is not None:
            args += [SOCKET_OWNER, str(self.socket_owner)]
        if self.socket_group is not None:
            args += [SOCKET_GROUP, str(self.socket_group), SOCKET_MODE, "660"]
        if self.labels_file is not None:
            args += [LABELS_FILE, str(self.labels_file)]
        return args


def per_process(manager_fd: int, log_file: Path) -> list[str]:
    """The arguments every spawned process gets: its end of the link and its log."""
    return [MANAGER_FD, str(manager_fd), LOG_FILE, str(log_file)]


def launch(record: Path) -> list[str]:
    """The arguments that arm a measured launch (for one process, not its restarts)."""
    return [LAUNCH, str(record)]


def pcr_banks(banks: tuple[str, ...]) -> list[str]:
    """The arguments that allocate PCR banks ("sha256", ...) at this start only."""
    return [PCR_BANKS, ",".join(banks)] if banks else []


def ek(names: tuple[str, ...]) -> list[str]:
    """The arguments that provision EKs ("rsa2048", ..., "platform") at this start only."""
    return [EK, ",".join(names)] if names else []
