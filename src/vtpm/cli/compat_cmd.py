"""`vtpm compat enable|show|dir`: the front door for the swtpm-compatible executables.

`enable` writes `<data-dir>/compat.json` (`vtpm.manager.compatconfig`); the Manager reads it
when it starts, so it takes effect at the next `vtpm manager run`. `dir` prints the compat
directory that holds the executables (`vtpm.compat.install`).
"""

from __future__ import annotations

import argparse
import grp
import pwd
from pathlib import Path
from typing import Any

from vtpm.cli import client
from vtpm.compat import install
from vtpm.errors import ConfigError, ManagerError
from vtpm.manager.compatconfig import DEFAULT_SOCKET, CompatConfig
from vtpm.wire import admin as api
from vtpm.wire.compat import SOCKET_ENV


def register(sub: Any) -> None:
    p = sub.add_parser(
        "compat",
        help="the front door for swtpm-compatible executables (libvirt, Proxmox, Incus, ...)",
        description="Configure the Manager's front door: the socket through which vtpm's own "
        "swtpm, swtpm_setup and swtpm_ioctl (started by an orchestrator) have the Manager make "
        "and run vTPMs whose state lives where the orchestrator puts it.",
    )
    csub = p.add_subparsers(dest="compat_command", metavar="ACTION")
    csub.required = True
    enable = csub.add_parser(
        "enable",
        help="write the front door's configuration (used from the next `vtpm manager run`)",
        description="Write <data-dir>/compat.json. The Manager opens the front door when it "
        "starts; restart it for this to take effect.",
    )
    enable.add_argument(
        "--group", required=True, help="the group (name or uuid) its vTPMs are made in"
    )
    enable.add_argument(
        "--socket",
        default=str(DEFAULT_SOCKET),
        help=f"the front-door socket (default {DEFAULT_SOCKET}; the compat executables read "
        f"${SOCKET_ENV}, else that default)",
    )
    enable.add_argument(
        "--socket-group",
        default=None,
        metavar="GROUP",
        help="the socket is 0660 to this group (name or gid); default 0600 to root",
    )
    enable.add_argument(
        "--allow-user",
        action="append",
        default=[],
        metavar="USER",
        help="a user (name or uid) who may use the front door besides root, e.g. tss",
    )
    enable.add_argument(
        "--label-template",
        default=None,
        help="the vTPMs' label, {name} the VM's name (default {name}_u:vm_r:vtpm_t)",
    )
    client.add_common(enable)
    enable.set_defaults(func=cmd_enable)
    show = csub.add_parser(
        "show", help="the front door's configuration", description="Print compat.json."
    )
    client.add_common(show)
    show.set_defaults(func=cmd_show)
    where = csub.add_parser(
        "dir",
        help="print the compat directory (put it first on the orchestrator's PATH)",
        description="Print the absolute path of the directory holding vtpm's swtpm, "
        "swtpm_setup and swtpm_ioctl (scripts/install.sh creates it; never /usr/bin).",
    )
    where.add_argument("--json", action="store_true", help="machine-readable output")
    where.set_defaults(func=cmd_dir)


def _uid(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return pwd.getpwnam(text).pw_uid
    except KeyError:
        raise ConfigError(f"no user {text!r}") from None


def _gid(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise ConfigError(f"no group {text!r} on this host") from None


def _describe(cfg: CompatConfig) -> str:
    mode = "0600 root" if cfg.socket_gid is None else f"0660 group {cfg.socket_gid}"
    users = ", ".join(["root", *(str(u) for u in cfg.allow_uids)])
    return "\n".join(
        [
            f"front door {cfg.socket} ({mode})",
            f"  group {cfg.group}, labels {cfg.label_template}",
            f"  users {users}",
        ]
    )


def cmd_enable(args: argparse.Namespace) -> int:
    data_dir = client.data_dir(args)
    kw: dict[str, Any] = {}
    if args.label_template is not None:
        kw["label_template"] = args.label_template
    cfg = CompatConfig(
        args.group,
        Path(args.socket),
        None if args.socket_group is None else _gid(args.socket_group),
        tuple(dict.fromkeys(_uid(u) for u in args.allow_user if _uid(u) != 0)),
        **kw,
    )
    note = "the Manager checks the group when it starts"
    try:  # a running Manager knows the group now
        g = client.call(args, api.GroupShow(cfg.group))
        cfg = CompatConfig(g.name, cfg.socket, cfg.socket_gid, cfg.allow_uids, cfg.label_template)
        note = f"group {g.name} found"
    except ConfigError:
        pass  # no Manager running
    except ManagerError as e:
        raise ConfigError(f"compat: {e}") from None
    path = cfg.save(data_dir)
    text = f"{_describe(cfg)}\nwritten to {path} ({note}); restart the Manager to use it"
    return client.emit(args, cfg.to_json(), text)


def cmd_show(args: argparse.Namespace) -> int:
    cfg = CompatConfig.load(client.data_dir(args))
    if cfg is None:
        if getattr(args, "json", False):
            return client.emit(args, None, "")
        print("no front door configured (vtpm compat enable)")
        return 0
    return client.emit(args, cfg.to_json(), _describe(cfg))


def cmd_dir(args: argparse.Namespace) -> int:
    directory = install.default_dir()
    if not install.installed(directory):
        raise ConfigError(
            f"the compat programs are not installed in {directory} (run scripts/install.sh)"
        )
    return client.emit(args, {"dir": str(directory)}, str(directory))
