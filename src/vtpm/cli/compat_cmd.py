"""`vtpm compat ...`: the swtpm-compatible programs (`swtpm`, `swtpm_setup`, `swtpm_ioctl`)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from vtpm.compat import install
from vtpm.errors import ConfigError


def register(sub: Any) -> None:
    grp = sub.add_parser(
        "compat",
        help="the swtpm-compatible front door for libvirt, Proxmox, Incus, LXD",
        description="vtpm ships its own swtpm, swtpm_setup and swtpm_ioctl in a directory of "
        "its own (never over /usr/bin); an orchestrator that finds them first on its PATH "
        "gets vTPMs of the Manager.",
    )
    gsub = grp.add_subparsers(dest="compat_command", metavar="ACTION")
    gsub.required = True
    p = gsub.add_parser(
        "dir",
        help="print the compat directory (put it first on the orchestrator's PATH)",
        description="Print the absolute path of the directory holding the compat swtpm, "
        "swtpm_setup and swtpm_ioctl (scripts/install.sh creates it).",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_dir)


def cmd_dir(args: argparse.Namespace) -> int:
    directory = install.default_dir()
    if not install.installed(directory):
        raise ConfigError(
            f"the compat programs are not installed in {directory} (run scripts/install.sh)"
        )
    if args.json:
        print(json.dumps({"ok": True, "result": {"dir": str(directory)}}, indent=2))
    else:
        print(directory)
    return 0
