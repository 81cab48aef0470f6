"""`vtpm manager init|run|status`: set up and run the vTPM Manager daemon."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

from vtpm.cli import client, logs
from vtpm.errors import ConfigError
from vtpm.labelpolicy import LabelMap
from vtpm.manager.config import ManagerConfig
from vtpm.wire import admin as api


def register(sub: Any) -> None:
    mgr = sub.add_parser(
        "manager",
        help="the vTPM Manager daemon",
        description="The vTPM Manager: holds every vTPM's state key, sealed to the hardware TPM, "
        "and supervises the vTPM instance processes.",
    )
    msub = mgr.add_subparsers(dest="manager_command", metavar="ACTION")
    msub.required = True

    init = msub.add_parser(
        "init",
        help="create a Manager data directory",
        description="Create (or re-configure) a Manager data directory: configuration and the "
        "database. Without --tcti the Manager uses /dev/tpmrm0 if present, else starts a swtpm "
        "simulator of its own as the hardware TPM.",
    )
    client.add_common(init)
    init.add_argument(
        "--tcti",
        default=None,
        help="hardware TPM as a TCTI string, e.g. device:/dev/tpmrm0 or "
        "swtpm:host=127.0.0.1,port=2321",
    )
    init.add_argument(
        "--admin-group",
        type=int,
        default=None,
        metavar="GID",
        help="a group allowed to administer besides root (admin socket 0660)",
    )
    init.add_argument(
        "--labels",
        type=Path,
        default=None,
        metavar="FILE",
        help="label policy file (TOML: unlabeled, [uid], [gid])",
    )
    init.set_defaults(func=cmd_init)

    run = msub.add_parser(
        "run",
        help="run the Manager in the foreground",
        description="Run the Manager in the foreground until SIGTERM/SIGINT: open the store and "
        "the hardware TPM, check every group against the host PCRs, serve the admin socket, and "
        "start the vTPMs that were running. On SIGTERM every instance stores its state first.",
    )
    client.add_common(run, json_output=False)
    logs.add_arguments(run)
    run.add_argument(
        "--accept-rollback",
        action="store_true",
        help="start once on a data directory older than the hardware TPM's floor says (a "
        "restored backup, when the newer copy is lost); its vTPMs run on their older state",
    )
    run.set_defaults(func=cmd_run)

    status = msub.add_parser(
        "status",
        help="the running Manager's state",
        description="Hardware TPM, groups (locked or not, and why), vTPM counts.",
    )
    client.add_common(status)
    status.set_defaults(func=cmd_status)


def cmd_init(args: argparse.Namespace) -> int:
    d = client.data_dir(args)
    if args.labels is not None:
        LabelMap.load(args.labels)  # what `run` would refuse is refused here, by the same parser
    cfg = ManagerConfig(
        d.resolve(),
        args.tcti,
        args.admin_group,
        None if args.labels is None else args.labels.resolve(),
    )
    # only `init` needs SQLite here (and the floor's checks, which load tpm2-pytss)
    from vtpm.manager import floor  # noqa: PLC0415
    from vtpm.manager.store import Store, database_present  # noqa: PLC0415

    # a lost database beside vTPM state is not re-created: its keys would be gone for good
    floor.refuse_lost_database(cfg, database_present(cfg.db_path))
    try:
        cfg.save()
        store = Store(cfg.db_path)
        store.open()
    except OSError as e:
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(d) else ""
        raise ConfigError(
            f"cannot use {d} as the Manager's data directory: {e.strerror}{where}"
        ) from None
    manager_uuid = store.meta("manager_uuid")
    store.close()
    return client.emit(
        args,
        {"data_dir": str(cfg.data_dir), "manager_uuid": manager_uuid, **cfg.to_json()},
        f"Manager data directory {cfg.data_dir} ready (manager {manager_uuid}); "
        f"hardware TPM: {cfg.tcti or 'auto (/dev/tpmrm0, else a swtpm simulator)'}",
    )


def cmd_run(args: argparse.Namespace) -> int:
    # imported here, not at the top: every `vtpm` process (each vTPM instance among them) would
    # otherwise load tpm2-pytss, which only the Manager uses
    from vtpm.manager import forkserver  # noqa: PLC0415
    from vtpm.manager.service import Manager  # noqa: PLC0415

    # the Manager's files (database, logs, sockets) are its own: nothing it creates is for others
    os.umask(0o077)
    logs.setup(args)
    cfg = ManagerConfig.load(client.data_dir(args).resolve())
    # this process is the Manager and nothing else: it may be the subreaper the template needs
    manager = Manager(cfg, accept_rollback=args.accept_rollback, forkserver=forkserver.enabled())

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        manager.request_stop()  # only record it; the loop acts

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    manager.open()
    try:
        manager.listen()
        manager.autostart()
        manager.run()
    finally:
        manager.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    st = client.call(args, api.Status())
    hw = st.hardware_tpm
    lines = [
        f"Manager pid {st.pid}, data {st.data_dir}, up {st.uptime} s",
        f"hardware TPM: {hw.description}"
        + ("" if hw.state == "ok" else f": {hw.state.upper()}: {hw.error}"),
    ]
    if hw.note:
        lines.append(f"  note: {hw.note}")
    lines.append(f"vTPMs: {st.vtpms.total} defined, {st.vtpms.running} running")
    for g in st.groups:
        s = g.status
        state = "unlocked" if s.unlocked else f"LOCKED: {s.reason}"
        lines.append(f"group {g.name} ({g.uuid}): {state}")
        for pcr, value in s.differing_pcrs.items():
            lines.append(f"    PCR {pcr} is now {value}")
    return client.emit(args, st, "\n".join(lines))
