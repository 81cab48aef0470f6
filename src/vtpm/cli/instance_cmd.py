"""`vtpm instance ...`: run a vTPM in the foreground, make a state key."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

from vtpm import instanceargs
from vtpm.cli import logs
from vtpm.cli.main import main as cli_main
from vtpm.endpoints import Endpoint, FrontendKind
from vtpm.engine.engine import TpmVersion
from vtpm.errors import ConfigError
from vtpm.instance import pcrbanks
from vtpm.instance.config import InstanceConfig
from vtpm.instance.custody import ManagerLink
from vtpm.instance.ekprov import Request
from vtpm.instance.runner import Instance
from vtpm.instance.statekey import generate_key_file, load_key_fd, load_key_file, load_secret_fd
from vtpm.instance.template import serve as serve_template
from vtpm.instance.transfer import MAX_SECRET
from vtpm.launchrecord import LaunchRecord
from vtpm.listen import TCP_IDLE_TIMEOUT, SocketPolicy


def register(sub: Any) -> None:
    inst = sub.add_parser(
        "instance",
        help="run one vTPM instance",
        description="Run one vTPM instance (one guest's TPM).",
    )
    isub = inst.add_subparsers(dest="instance_command", metavar="ACTION")
    isub.required = True

    run = isub.add_parser(
        "run",
        help="run a vTPM in the foreground",
        description=(
            "Run a vTPM in the foreground until SIGTERM/SIGINT (or a control-channel SHUTDOWN), "
            "then store its state and exit. State blobs are kept AES-256-GCM encrypted under the "
            "state key. Socket forms: unix:PATH, tcp:PORT, tcp:HOST:PORT (HOST defaults to "
            "127.0.0.1), fd:N (an inherited listening UNIX or TCP socket, bound by the process "
            "that passed it). Each frontend option may be repeated. TPM commands are served "
            "from the start, before any control-channel INIT (the client sends TPM2_Startup, "
            "or --startup-clear does)."
        ),
    )
    where = run.add_mutually_exclusive_group(required=True)
    where.add_argument(
        instanceargs.STATE_DIR,
        type=Path,
        help="directory of this vTPM's encrypted state (created 0700 if missing)",
    )
    where.add_argument(
        instanceargs.STATE_FILE,
        type=Path,
        metavar="PATH",
        help="one regular file or block device holding this vTPM's encrypted state (two "
        "slots, written in place; a missing or empty file is made 4 MiB; /proc/self/fd/N "
        "for an inherited descriptor)",
    )
    run.add_argument(
        instanceargs.UUID,
        type=uuid.UUID,
        default=None,
        help="the vTPM's uuid (default: the one recorded in the state directory or file, or a "
        "new one)",
    )
    run.add_argument(
        instanceargs.TPM,
        choices=["2.0", "1.2"],
        default="2.0",
        help="TPM version of a new vTPM (default 2.0); must match existing state",
    )
    key = run.add_mutually_exclusive_group(required=True)
    key.add_argument(
        "--key-file",
        type=Path,
        help="file holding the 32-byte state key (raw or 64 hex digits), mode 0600",
    )
    key.add_argument(
        "--key-fd",
        type=int,
        help="inherited file descriptor to read the state key from (then closed)",
    )
    key.add_argument(
        instanceargs.MANAGER_FD,
        type=int,
        help="inherited socket to the vTPM Manager, which holds the state key and records "
        "every state write (set by the Manager's supervisor; needs --uuid)",
    )
    run.add_argument(
        instanceargs.FRONTEND_FLAGS[FrontendKind.CTRL],
        action="append",
        default=[],
        metavar="SOCKET",
        help="swtpm-compatible control channel (QEMU -tpmdev emulator; "
        "tcti swtpm uses the data port + 1)",
    )
    run.add_argument(
        instanceargs.FRONTEND_FLAGS[FrontendKind.SERVER],
        action="append",
        default=[],
        metavar="SOCKET",
        help="raw TPM command/response socket (tcti swtpm's data port)",
    )
    run.add_argument(
        instanceargs.FRONTEND_FLAGS[FrontendKind.MSSIM],
        action="append",
        default=[],
        metavar="tcp:[HOST:]PORT",
        help="Microsoft simulator protocol: command port PORT, platform port PORT+1",
    )
    run.add_argument(
        instanceargs.SOCKET_MODE,
        choices=["600", "660"],
        default="600",
        help="mode of the UNIX sockets (660 lets --socket-group connect)",
    )
    run.add_argument(
        instanceargs.SOCKET_OWNER,
        type=int,
        default=None,
        metavar="UID",
        help="owner uid of the UNIX sockets (default: this process)",
    )
    run.add_argument(
        instanceargs.SOCKET_GROUP,
        type=int,
        default=None,
        metavar="GID",
        help="group gid of the UNIX sockets",
    )
    run.add_argument(
        instanceargs.LABEL,
        default=None,
        help="this vTPM's security label (user:role:type): UNIX-socket peers must be of type "
        "guest_t or hwdom_t with the same user",
    )
    run.add_argument(
        instanceargs.LABELS_FILE,
        type=Path,
        default=None,
        help="label policy (TOML) mapping peer uids/gids to labels; with --label",
    )
    run.add_argument(
        "--buffer-size",
        type=int,
        default=0,
        help="TPM I/O buffer size in bytes (2808..4096; default libtpms')",
    )
    run.add_argument(
        instanceargs.STARTUP_CLEAR,
        action="store_true",
        help="send TPM Startup(CLEAR) at start (for clients that do not)",
    )
    run.add_argument(
        instanceargs.LAUNCH,
        type=Path,
        default=None,
        metavar="FILE",
        help="measured launch record (written by `vtpm launch`): the TPM is made fresh and the "
        "recorded kernel, command line and initrd digests are extended into PCR 4/5 after each "
        "TPM2_Startup(CLEAR)",
    )
    run.add_argument(
        instanceargs.EK,
        default="",
        metavar="KINDS",
        help="provision these endorsement keys at this start (comma-separated: rsa2048, ecc256, "
        "ecc384; 'platform' as --platform-cert), persisted at their TCG handles, with their "
        "certificates from the Manager's group CA in the TCG NV indices, write-locked; "
        "give it once (it makes the TPM go through Startup/Shutdown(CLEAR)). Without a "
        "Manager: keys only, no certificates",
    )
    run.add_argument(
        instanceargs.PCR_BANKS,
        default="",
        metavar="BANKS",
        help="allocate exactly these PCR banks at this start (comma-separated: "
        f"{', '.join(pcrbanks.BY_NAME)}), after any --ek; the TPM keeps them on later starts",
    )
    run.add_argument(
        instanceargs.TERMINATE,
        action="store_true",
        help="stop (state stored, exit 0) when a client of a UNIX control channel or of a "
        "data channel (the raw server, QEMU's data fd) disconnects",
    )
    run.add_argument(
        instanceargs.MIGRATION_SECRET_FD,
        type=int,
        default=None,
        metavar="FD",
        help="inherited descriptor to read a migration secret from (1..4096 bytes, to end of "
        "file; then closed): state blobs leave and enter sealed under a key that mixes it in, "
        "so a blob taken out with one secret goes back in only with the same",
    )
    run.add_argument(
        instanceargs.PLATFORM_CERT,
        action="store_true",
        help="with --ek: also a platform certificate in NV 0x01c08000 (needs a Manager)",
    )
    run.add_argument(
        "--export-plaintext-state",
        action="store_true",
        help="let CMD_GET_STATEBLOB answer in clear when the peer asks (STATE_FLAG_DECRYPTED): "
        "anyone who reaches the control socket then reads the TPM's secrets; standalone "
        "instances only (refused with --manager-fd). Without it state leaves sealed",
    )
    run.add_argument(
        "--max-clients",
        type=int,
        default=32,
        help="connections served at once per socket (default 32)",
    )
    run.add_argument(
        "--idle-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="drop any frontend peer silent this long, UNIX ones and QEMU's data channel "
        "included (not for QEMU: it keeps its control channel silent for the guest's life); "
        f"default: TCP peers after {TCP_IDLE_TIMEOUT:g} s, UNIX peers never",
    )
    run.add_argument(
        instanceargs.ACCEPT_STATE,
        action="store_true",
        help="accept, once, state on disk that opens under the key but that the Manager does "
        "not record (an older copy put back on purpose): it is recorded as current "
        "(`vtpm accept-state UUID` makes the Manager pass it; needs --manager-fd)",
    )
    logs.add_arguments(run)
    run.set_defaults(func=cmd_run)

    template = isub.add_parser(
        "template",
        help="fork server of the vTPM Manager (started by it; not for operators)",
        description="Import what a vTPM instance needs, then fork one `instance run` per "
        "spawn request on the inherited socket FD (the vTPM Manager's supervisor starts it).",
    )
    template.add_argument(instanceargs.TEMPLATE_FD, type=int, required=True, dest="fd")
    logs.add_arguments(template)
    template.set_defaults(func=cmd_template)

    keygen = isub.add_parser(
        "keygen",
        help="create a new random state key file (0600)",
        description="Create a new random 32-byte state key file, mode "
        "0600. Refuses to overwrite an existing file.",
    )
    keygen.add_argument("path", type=Path)
    keygen.add_argument("--json", action="store_true", help="machine-readable output")
    keygen.set_defaults(func=cmd_keygen)


def config_from_args(args: argparse.Namespace) -> InstanceConfig:
    return InstanceConfig(
        state_dir=args.state_dir,
        state_file=args.state_file,
        accept_state=args.accept_state,
        tpm_version=TpmVersion(args.tpm),
        vtpm_uuid=args.uuid,
        key_file=args.key_file,
        key_fd=args.key_fd,
        manager_fd=args.manager_fd,
        ctrl=tuple(Endpoint.parse(t) for t in args.ctrl),
        server=tuple(Endpoint.parse(t) for t in args.server),
        mssim=tuple(Endpoint.parse(t) for t in args.mssim),
        sockets=SocketPolicy(int(args.socket_mode, 8), args.socket_owner, args.socket_group),
        buffer_size=args.buffer_size,
        startup_clear=args.startup_clear,
        max_clients=args.max_clients,
        idle_timeout=args.idle_timeout,
        label=args.label,
        labels_file=args.labels_file,
        launch=None if args.launch is None else LaunchRecord.load(args.launch),
        export_plaintext_state=args.export_plaintext_state,
        ek=Request.parse(args.ek, args.platform_cert),
        terminate=args.terminate,
        pcr_banks=pcrbanks.parse(args.pcr_banks),
        migration_secret_fd=args.migration_secret_fd,
    )


def cmd_run(args: argparse.Namespace) -> int:
    logs.setup(args)
    cfg = config_from_args(args)
    secret = None
    if cfg.migration_secret_fd is not None:
        secret = load_secret_fd(cfg.migration_secret_fd, MAX_SECRET, "migration secret")
    link: ManagerLink | None = None
    if cfg.manager_fd is not None:
        assert cfg.vtpm_uuid is not None
        try:
            sock = socket.socket(fileno=cfg.manager_fd)
        except OSError as e:
            raise ConfigError(f"--manager-fd {cfg.manager_fd}: {e.strerror}") from None
        link = ManagerLink(sock, cfg.vtpm_uuid)
        try:
            key = link.hello()
        except BaseException:
            link.close()
            raise
    elif cfg.key_file is not None:
        key = load_key_file(cfg.key_file)
    else:
        key = load_key_fd(cfg.key_fd if cfg.key_fd is not None else -1)
    inst = Instance(cfg, key, link=link, migration_secret=secret)
    del secret

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        inst.stop()  # only record it; the main loop acts

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        inst.start()
    except OSError as e:  # the state directory (or a file in it) is unusable
        where = f"{e.filename}: " if e.filename else f"{cfg.state_dir or cfg.state_file}: "
        raise ConfigError(f"cannot start the vTPM: {where}{e.strerror}") from None
    if link is not None:
        link.ready()
    try:
        while not inst.wait(0.5):
            pass
    finally:
        inst.close()
    return 0


def cmd_template(args: argparse.Namespace) -> int:
    logs.setup(args)
    try:
        sock = socket.socket(fileno=args.fd)
    except OSError as e:
        raise ConfigError(f"{instanceargs.TEMPLATE_FD} {args.fd}: {e.strerror}") from None
    return serve_template(sock, run_argv)


def run_argv(argv: list[str]) -> int:
    """`vtpm instance run ARGV...` in this (forked) process, parsed by the same parser and
    failing the same way as the command; returns its exit code."""
    try:
        cli_main([*instanceargs.COMMAND, *argv])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    generate_key_file(args.path)
    if args.json:
        print(json.dumps({"ok": True, "key_file": str(args.path)}))
    else:
        print(f"wrote a new state key to {args.path} (mode 0600)")
    return 0
