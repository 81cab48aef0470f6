"""`swtpm_setup`: have the Manager create (or keep, or reconfigure) the vTPM of a state location.

Sends `vtpm.wire.compat.Setup` with the state location's descriptor and prints the result in a
few lines (also appended to `--logfile`, which libvirt shows when a start fails).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Mapping

from vtpm.compat.capabilities import SWTPM_SETUP_FEATURES, about
from vtpm.compat.handles import DoorError, open_state, read_secret
from vtpm.compat.options import UsageError
from vtpm.compat.setup_args import HELP, PROGRAM, SetupAction, SetupArgs, parse_setup_args
from vtpm.errors import VtpmError

SETUP_TIMEOUT = 300.0  # EK provisioning with certificates takes seconds, not minutes


class LogFile:
    def __init__(self, path: str | None) -> None:
        self.fd = -1
        if path is not None:
            try:
                self.fd = os.open(
                    path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640
                )
            except OSError as e:
                raise DoorError(f"cannot open the log file {path}: {e.strerror}") from None

    def line(self, text: str) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.fd, (text + "\n").encode())


def setup(args: SetupArgs, environ: Mapping[str, str]) -> list[str]:
    """Ask the Manager; the lines that say what it did."""
    from vtpm.compat import link  # noqa: PLC0415
    from vtpm.wire import compat  # noqa: PLC0415

    assert args.state is not None
    secret = read_secret(args.secret, "the passphrase") if args.secret else None
    fd = open_state(args.state)
    request = compat.Setup(
        compat.StateLocation(compat.StateKind(args.state.kind), args.state.path),
        (compat.FdRole.STATE,),
        vm_uuid=args.vm_uuid,
        vm_name=args.vm_name,
        eks=args.eks,
        ek_certs=args.ek_certs,
        platform_cert=args.platform_cert,
        lock_nvram=args.lock_nvram,
        pcr_banks=args.pcr_banks,
        reconfigure=args.reconfigure,
        overwrite=compat.Overwrite(args.overwrite.value),
        secret=secret,
    )
    try:
        door = link.Link(link.socket_path(environ), SETUP_TIMEOUT)
        try:
            door.send(request, [fd])
            done = link.result(compat.SetupResult, door.reply(), "SetupResult")
        finally:
            door.close()
    finally:
        os.close(fd)
    verb = "created" if done.created else ("reconfigured" if args.reconfigure else "kept")
    lines = [f"vTPM {done.uuid} {verb} (label {done.label}, group {done.group})"]
    if done.eks:
        lines.append(f"provisioned: {', '.join(done.eks)}")
    if done.pcr_banks:
        lines.append(f"active PCR banks: {', '.join(done.pcr_banks)}")
    return lines


def run(argv: list[str], environ: Mapping[str, str], out: Callable[[str], None]) -> int:
    try:
        args = parse_setup_args(argv)
    except UsageError as e:
        out(f"{PROGRAM}: error: {e}")
        return 1
    if about(args.action, "swtpm_setup-compatible", HELP, SWTPM_SETUP_FEATURES):
        return 0
    if args.action is SetupAction.CONFIG_FILES:
        print("nothing to create: vtpm's swtpm_setup needs no per-user configuration files")
        return 0
    log = LogFile(None)
    try:
        log = LogFile(args.logfile)
        for note in args.notes:
            log.line(note)
        lines = setup(args, environ)
    except (DoorError, VtpmError, OSError) as e:
        text = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
        log.line(f"error: {text}")
        out(f"{PROGRAM}: error: {text}")
        return 1
    for line in lines:
        log.line(line)
        print(line)
    return 0


def main() -> int:
    """The `swtpm_setup` executable of the compat directory."""

    def out(line: str) -> None:
        sys.stderr.write(line + "\n")

    try:
        return run(sys.argv[1:], os.environ, out)
    except KeyboardInterrupt:
        return 130
