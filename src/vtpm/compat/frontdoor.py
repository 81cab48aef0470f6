"""`swtpm socket`: the front door. Binds what the orchestrator asked for, then hands it over.

Order, and why:
1. parse the command line (standard library only) and bind the listening sockets (ctrl, server)
   or take the inherited ones: an orchestrator polls for the socket file or port right after
   it starts this process, so they exist before anything heavier is imported;
2. open the state location (a directory, created 0700, or a file, created 0600) and read the
   passphrases from their fds or files (at most `SECRET_MAX` bytes each);
3. switch user if `--runas` says so;
4. connect to the Manager's front-door socket and send `Attach` with the descriptors
   [state, ctrl, server]; the Manager authenticates this process's user, finds the vTPM recorded
   for the state location and spawns its instance on those sockets. An empty location (a new
   directory, an empty file: where swtpm would make a fresh TPM, as Incus and the tpm2-tools
   harness expect) is first given a vTPM by a `Setup` without EKs, under the Manager's rules;
5. on `Attached`: fork if `--daemon` (the parent exits 0), write the pid file (the process that
   stays), then wait. On `Ended` remove the UNIX socket files this process bound (if they are
   still its own) and exit with the instance's code (128 + N for a signal N).
SIGTERM / SIGINT send `Detach` (the Manager stops the instance, its state stored) and the
process exits on the `Ended` that follows. If this process is killed, its connection closes and
the Manager stops the instance the same way. No key ever passes through here.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from vtpm.compat.handles import (
    Bound,
    DoorError,
    bind,
    fresh,
    open_state,
    read_secret,
    remove_own,
)
from vtpm.compat.options import UsageError
from vtpm.compat.socket_args import (
    HELP,
    PROGRAM,
    Action,
    LogArg,
    PidArg,
    SocketArgs,
    parse_socket_args,
)

if TYPE_CHECKING:
    from vtpm.compat.link import Link
    from vtpm.wire.compat import Setup

ATTACH_TIMEOUT = 120.0  # seconds the Manager may take to start the instance
SETUP_TIMEOUT = 120.0  # seconds the Manager may take to make a vTPM for an empty location
DETACH_TIMEOUT = 60.0  # seconds after Detach before this process gives up waiting


class Log:
    """The `--log` destination (the orchestrator shows it when a start fails); no log: quiet."""

    def __init__(self, arg: LogArg | None) -> None:
        self.prefix = arg.prefix if arg else ""
        self.fd = -1
        if arg is None or arg.level < 1:  # level 0: nothing is logged
            return
        if arg.fd >= 0:
            self.fd = arg.fd
            return
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC
        try:
            self.fd = os.open(arg.path, flags | (os.O_TRUNC if arg.truncate else 0), 0o640)
        except OSError as e:
            raise DoorError(f"cannot open the log file {arg.path}: {e.strerror}") from None

    def line(self, text: str) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.write(self.fd, f"{self.prefix}{text}\n".encode())


def run_as(user: str) -> None:
    import pwd  # noqa: PLC0415  (only with --runas)

    try:
        pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
    except KeyError:
        raise DoorError(f"--runas {user}: no such user") from None
    if pw.pw_uid == os.getuid():
        return
    try:
        os.setgroups([])
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
    except OSError as e:
        raise DoorError(f"--runas {user}: {e.strerror}") from None


def write_pid(pid: PidArg) -> None:
    text = f"{os.getpid()}\n".encode()
    try:
        if pid.fd >= 0:
            os.write(pid.fd, text)
            os.close(pid.fd)
            return
        from pathlib import Path  # noqa: PLC0415

        from vtpm.files import write_atomic  # noqa: PLC0415

        write_atomic(Path(pid.path), text, 0o644)
    except OSError as e:
        raise DoorError(f"cannot write the pid file: {e.strerror}") from None


def daemonize(ready: Callable[[], None]) -> None:
    """Fork: the parent exits 0 once the child has run `ready` (written the pid file, which the
    orchestrator reads as soon as the parent is gone), 1 if the child failed at it."""
    rd, wr = os.pipe2(os.O_CLOEXEC)
    if os.fork() != 0:
        os.close(wr)
        ok = os.read(rd, 1) == b"1"
        os._exit(0 if ok else 1)  # the child carries on (and owns the cleanup)
    os.close(rd)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    try:
        ready()
        os.write(wr, b"1")
    finally:
        os.close(wr)


def _remove_pidfile(pid: PidArg | None) -> None:
    if pid is None or not pid.path:
        return
    with contextlib.suppress(OSError), open(pid.path, "rb") as f:
        if f.read(32).strip() == str(os.getpid()).encode():
            os.unlink(pid.path)


def _exit_code(code: int) -> int:
    return 128 - code if code < 0 else code


class Door:
    """One front-door process after its sockets are bound."""

    def __init__(self, args: SocketArgs, log: Log, bound: list[tuple[str, Bound]]) -> None:
        self.args = args
        self.log = log
        self.bound = bound
        self.signals: list[int] = []
        self.wakeup = -1

    def cleanup(self) -> None:
        for _, b in self.bound:
            if b.path:
                remove_own(b.path, b.ident)
        _remove_pidfile(self.args.pid)

    def serve(self, environ: Mapping[str, str]) -> int:
        from vtpm.compat import link  # noqa: PLC0415  (after the sockets exist)
        from vtpm.errors import VtpmError  # noqa: PLC0415
        from vtpm.wire import compat  # noqa: PLC0415

        args = self.args
        assert args.state is not None
        state_fd = open_state(args.state)
        secret = read_secret(args.key, "the --key passphrase") if args.key else None
        msecret = (
            read_secret(args.migration_key, "the --migration-key passphrase")
            if args.migration_key
            else None
        )
        if args.runas is not None:
            run_as(args.runas)
        location = compat.StateLocation(compat.StateKind(args.state.kind), args.state.path)
        roles = [compat.FdRole.STATE]
        fds = [state_fd]
        for role, b in self.bound:
            roles.append(compat.FdRole(role))
            fds.append(b.sock.fileno())
        request = compat.Attach(
            location,
            tuple(roles),
            terminate=args.terminate,
            startup_clear=args.startup_clear,
            secret=secret,
            migration_secret=msecret,
            incoming=args.incoming,
            release_lock_outgoing=args.release_lock_outgoing,
        )
        path = link.socket_path(environ)
        self.arm_signals()
        try:
            if fresh(state_fd):
                self.log.line(f"{args.state.path} is empty: asking the Manager for a new vTPM")
                self.make_vtpm(
                    path,
                    compat.Setup(
                        location,
                        (compat.FdRole.STATE,),
                        eks=(),
                        ek_certs=False,
                        lock_nvram=False,
                        overwrite=compat.Overwrite.KEEP,
                        secret=secret,
                    ),
                    state_fd,
                )
            door = link.Link(path, ATTACH_TIMEOUT)
            door.send(request, fds)
            os.close(state_fd)
            attached = link.result(compat.Attached, door.reply(), "Attached")
        except VtpmError as e:
            raise DoorError(str(e)) from None
        self.log.line(
            f"vTPM {attached.uuid} ({attached.label}) serves, instance pid {attached.pid}"
        )
        if args.daemon:
            daemonize(lambda: write_pid(args.pid) if args.pid is not None else None)
        elif args.pid is not None:
            write_pid(args.pid)
        return self.wait(door)

    @staticmethod
    def make_vtpm(path: str, request: Setup, state_fd: int) -> None:
        """What swtpm does with an empty state location (a fresh TPM), asked of the Manager:
        a vTPM without EKs, made as `swtpm_setup` would (the Manager's rules and group)."""
        from vtpm.compat import link  # noqa: PLC0415
        from vtpm.wire.compat import SetupResult  # noqa: PLC0415

        door = link.Link(path, SETUP_TIMEOUT)
        try:
            door.send(request, [state_fd])
            link.result(SetupResult, door.reply(), "SetupResult")
        finally:
            door.close()

    def fail(self, line: str) -> int:
        self.log.line(f"error: {line}")
        with contextlib.suppress(OSError):
            sys.stderr.write(f"{PROGRAM}: error: {line}\n")
        return 1

    def wait(self, door: Link) -> int:
        from vtpm.compat.link import result  # noqa: PLC0415
        from vtpm.errors import VtpmError  # noqa: PLC0415
        from vtpm.wire.compat import Detach, Ended  # noqa: PLC0415

        rd = self.wakeup
        door.sock.settimeout(None)
        detached_at: float | None = None
        while True:
            if self.signals and detached_at is None:
                self.log.line(f"signal {self.signals[0]}: asking the Manager to stop the vTPM")
                try:
                    door.send(Detach())
                except VtpmError as e:
                    return self.fail(str(e))
                detached_at = time.monotonic()
            timeout = None
            if detached_at is not None:
                timeout = max(0.0, detached_at + DETACH_TIMEOUT - time.monotonic())
            ready, _, _ = select.select([door.sock.fileno(), rd], [], [], timeout)
            if not ready:
                return self.fail("the Manager did not end the vTPM after Detach; leaving")
            if rd in ready:
                with contextlib.suppress(OSError):
                    os.read(rd, 64)
            if door.sock.fileno() not in ready:
                continue
            try:
                replies = door.replies()
            except VtpmError as e:
                return self.fail(str(e))
            for reply in replies:
                if reply is None:
                    return self.fail("the Manager closed the connection; the vTPM is gone")
                try:
                    ended = result(Ended, reply, "Ended")
                except VtpmError as e:
                    return self.fail(str(e))
                why = f": {ended.reason}" if ended.reason else ""
                self.log.line(f"the vTPM ended with exit code {ended.exit_code}{why}")
                return _exit_code(ended.exit_code)

    def arm_signals(self) -> None:
        """From the first request on, SIGTERM / SIGINT / SIGHUP are recorded, not fatal: the
        vTPM is then stopped through the Manager (Detach) once it serves."""
        rd, wr = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.wakeup = rd
        signal.set_wakeup_fd(wr)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._record)

    def _record(self, signum: int, _frame: object) -> None:
        self.signals.append(signum)


def run(argv: list[str], environ: Mapping[str, str], out: Callable[[str], None]) -> int:
    try:
        args = parse_socket_args(argv)
    except UsageError as e:
        out(f"{PROGRAM}: error: {e}")
        return 1
    if args.action is not Action.RUN:
        from vtpm.compat.capabilities import SWTPM_FEATURES, about  # noqa: PLC0415

        about(args.action, "swtpm-compatible front door", HELP, SWTPM_FEATURES)
        return 0
    bound: list[tuple[str, Bound]] = []
    door: Door | None = None
    log = Log(None)
    try:
        if args.ctrl is not None:
            bound.append(("ctrl", bind(args.ctrl, "the control socket")))
        if args.server is not None:
            bound.append(("server", bind(args.server, "the server socket")))
        log = Log(args.log)
        for note in args.notes:
            log.line(note)
        door = Door(args, log, bound)
        code = door.serve(environ)
    except (DoorError, OSError) as e:
        text = (e.strerror or str(e)) if isinstance(e, OSError) else str(e)
        log.line(f"error: {text}")
        out(f"{PROGRAM}: error: {text}")
        code = 1
    if door is not None:
        door.cleanup()
    else:
        for _, b in bound:
            if b.path:
                remove_own(b.path, b.ident)
    return code


def main() -> int:
    """The `swtpm` executable of the compat directory."""

    def out(line: str) -> None:
        sys.stderr.write(line + "\n")

    try:
        return run(sys.argv[1:], os.environ, out)
    except KeyboardInterrupt:
        return 130
