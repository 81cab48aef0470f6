"""An instance's configuration, parsed once by the CLI and passed down frozen."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from vtpm.endpoints import Endpoint
from vtpm.engine.engine import TpmVersion
from vtpm.errors import ConfigError
from vtpm.instance.ekprov import Request
from vtpm.launchrecord import LaunchRecord
from vtpm.listen import SocketPolicy

MIN_BUFFER = 2808
MAX_BUFFER = 4096


@dataclass(frozen=True, slots=True)
class InstanceConfig:
    state_dir: Path | None = None  # exactly one of state_dir and state_file
    tpm_version: TpmVersion = TpmVersion.TPM20
    vtpm_uuid: uuid.UUID | None = None
    key_file: Path | None = None
    key_fd: int | None = None
    manager_fd: int | None = None
    ctrl: tuple[Endpoint, ...] = ()
    server: tuple[Endpoint, ...] = ()
    mssim: tuple[Endpoint, ...] = ()
    sockets: SocketPolicy = field(default_factory=SocketPolicy)
    buffer_size: int = 0
    startup_clear: bool = False
    max_clients: int = 32
    label: str | None = None  # this vTPM's security label: frontend peers are checked against it
    labels_file: Path | None = None  # uid/gid -> label map for peers the kernel does not label
    launch: LaunchRecord | None = None  # a measured launch to apply after Startup(CLEAR)
    # seconds any frontend peer may stay silent before it is dropped (`serving.IdleTimeoutError`);
    # None (the default): the servers' own rule, TCP peers after `listen.TCP_IDLE_TIMEOUT`,
    # UNIX peers and QEMU's data channel never (QEMU keeps its control channel and data fd
    # silent for the guest's whole life; UNIX peers are counted per uid instead)
    idle_timeout: float | None = None
    # GET_STATEBLOB may answer in clear when the peer asks (standalone only; see README)
    export_plaintext_state: bool = False
    # EKs (and a platform certificate) to provision at this start (`instance.ekprov`)
    ek: Request = field(default_factory=Request)
    # stop (state stored) when a UNIX control channel's or a data channel's client disconnects
    terminate: bool = False
    # PCR banks (TPM_ALG hash ids) to allocate at this start (`instance.pcrbanks`)
    pcr_banks: tuple[int, ...] = ()
    # inherited descriptor holding a secret mixed into the transfer-blob key (`transfer`)
    migration_secret_fd: int | None = None
    # one file or block device instead of a directory (`vtpm.instance.statefile`)
    state_file: Path | None = None
    # accept on-disk state the Manager does not record, once (`vtpm accept-state UUID`)
    accept_state: bool = False

    def __post_init__(self) -> None:
        if (self.state_dir is None) == (self.state_file is None):
            raise ConfigError("give exactly one of --state-dir and --state-file")
        if self.accept_state and self.manager_fd is None:
            raise ConfigError(
                "--accept-state needs a Manager (--manager-fd): without one no record of the "
                "state exists to be refused"
            )
        sources = [x for x in (self.key_file, self.key_fd, self.manager_fd) if x is not None]
        if len(sources) != 1:
            raise ConfigError("give exactly one of --key-file, --key-fd and --manager-fd")
        if self.manager_fd is not None and self.vtpm_uuid is None:
            raise ConfigError("--manager-fd needs --uuid")
        if self.manager_fd is not None and self.export_plaintext_state:
            raise ConfigError(
                "--export-plaintext-state is refused under a Manager (--manager-fd): "
                "a managed vTPM's state leaves it only sealed"
            )
        if not (self.ctrl or self.server or self.mssim):
            raise ConfigError("no frontend: give at least one of --ctrl, --server, --mssim")
        if self.buffer_size and not MIN_BUFFER <= self.buffer_size <= MAX_BUFFER:
            raise ConfigError(
                f"--buffer-size {self.buffer_size} is outside {MIN_BUFFER}..{MAX_BUFFER}"
            )
        if not 1 <= self.max_clients <= 1024:
            raise ConfigError("--max-clients must be between 1 and 1024")
        if self.idle_timeout is not None and not self.idle_timeout > 0:
            raise ConfigError(f"idle timeout {self.idle_timeout} is not a positive number")
        fds = [ep.fd for ep in (*self.ctrl, *self.server) if ep.kind == "fd"]
        others = (self.key_fd, self.manager_fd, self.migration_secret_fd)
        fds += [x for x in others if x is not None]
        if len(set(fds)) != len(fds):
            dup = next(x for x in fds if fds.count(x) > 1)
            raise ConfigError(f"descriptor {dup} is named twice (each fd:N and --*-fd its own)")
        for ep in self.mssim:
            if ep.kind != "tcp":
                raise ConfigError(f"--mssim {ep}: the simulator protocol runs on TCP only")
        if self.ek and self.tpm_version is not TpmVersion.TPM20:
            raise ConfigError(
                "--ek: EKs and their certificates are provisioned in TPM 2.0 vTPMs only; a TPM "
                "1.2 EK certificate (NV 0x1000F000) is not made by this version"
            )
        if self.pcr_banks and self.tpm_version is not TpmVersion.TPM20:
            raise ConfigError("--pcr-banks: PCR banks are allocated in TPM 2.0 vTPMs only")
        fd = self.migration_secret_fd
        if fd is not None and fd < 0:
            raise ConfigError(f"--migration-secret-fd {fd}: no such descriptor")
        if self.launch is not None:
            if self.tpm_version is not TpmVersion.TPM20:
                raise ConfigError("--launch: a measured launch needs a TPM 2.0 vTPM")
            if self.launch.vtpm_uuid not in (None, self.vtpm_uuid):
                raise ConfigError(
                    f"--launch: the launch record is for vTPM {self.launch.vtpm_uuid}"
                )
