"""Instance processes: spawned over a socketpair, watched, restarted with backoff, stopped.

Each vTPM runs as `vtpm instance run --manager-fd N` with one end of a socketpair as fd N, so
the Manager knows which vTPM (and so which label) is on the other end of every key-custody link
without trusting anything the peer says. The supervisor only manages processes; what is said on
the link is the `Serve` callback's business, run in a thread per child, which calls the `ready`
it is given when the instance reports that it serves, and the `health` it is given when the
instance reports that its TPM cannot serve (a state write fails, libtpms in failure mode) or
serves again. A child's state is changed only here; a respawned process starts healthy.

Restart policy: a child that exits while wanted is started again after a delay that doubles from
0.5 s to 30 s and is reset once a child has run for a minute. A child that fails
`MAX_QUICK_FAILURES` times in a row before it ever served (a refused key, a rolled-back state)
is given up on and marked failed with the last line of its log, rather than looped.

Front-door instances (`vtpm.manager.frontdoor`) are started with `restart=False`: they belong
to an orchestrator's process, which decides whether to run them again. They inherit the
descriptors the front door received (`pass_fds`), and `on_exit(exit code, reason)` is called
(from `poll`, outside the supervisor's lock) once their process has exited, whyever it did.

A process is forked from the fork server's template when there is one and it answers
(`forkserver`), else started with `subprocess.Popen`; either way it is this process's child, the
rules above are the same, and the inherited descriptors reach it at the numbers they have here.
"""

from __future__ import annotations

import logging
import shlex
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from vtpm import instanceargs
from vtpm.errors import InstanceExitedError, ManagerError
from vtpm.manager.forkserver import ForkedProc, ForkServer

log = logging.getLogger(__name__)

FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
HEALTHY_AFTER = 60.0
MAX_QUICK_FAILURES = 5
STOP_TIMEOUT = 20.0

# serve(vtpm_uuid, the Manager's end of the link, ready, health): runs for the life of the
# link; health(reason) with "" once the TPM serves again
Serve = Callable[[uuid.UUID, socket.socket, Callable[[], None], Callable[[str], None]], None]
# on_exit(exit code, the last line of the instance's log): a process without restarts exited
OnExit = Callable[[int, str], None]


class Proc(Protocol):
    """An instance process: a `subprocess.Popen` or a `forkserver.ForkedProc`."""

    @property
    def pid(self) -> int: ...
    @property
    def returncode(self) -> int | None: ...
    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def send_signal(self, sig: int) -> None: ...
    def kill(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ChildStatus:
    """What `vtpm status` shows of an instance process."""

    state: str  # starting, running, restarting, failed, stopped
    pid: int | None
    restarts: int
    last_exit: int | None
    failed: str
    log_file: Path
    tpm_failed: str = ""  # why the running instance's TPM cannot serve ("" while it can)


@dataclass
class Child:
    vtpm_uuid: uuid.UUID
    argv: list[str]
    log_file: Path
    proc: Proc | None = None
    started: float = 0.0
    wanted: bool = True
    restarts: int = 0
    quick_failures: int = 0
    backoff: float = FIRST_BACKOFF
    restart_at: float | None = None
    ready: bool = False  # the current process reported that it serves
    ready_event: threading.Event = field(default_factory=threading.Event, repr=False)
    # poll() has handled the current process's exit; its returncode cannot tell, since any
    # proc.poll() (`state`, a `vtpm show`) reaps the process and sets it
    exit_handled: bool = False
    once: list[str] = field(default_factory=list)  # arguments for the next process only
    failed: str = ""
    tpm_failed: str = ""  # the current process's last TpmHealth report
    last_exit: int | None = None
    link_thread: threading.Thread | None = field(default=None, repr=False)
    restart: bool = True  # False: a front-door instance, never started again by the supervisor
    pass_fds: tuple[int, ...] = ()  # inherited by the first process (the caller's to close)
    on_exit: OnExit | None = field(default=None, repr=False)

    @property
    def state(self) -> str:
        if self.proc is not None and self.proc.poll() is None:
            return "running" if self.ready else "starting"
        if self.failed:
            return "failed"
        if self.restart_at is not None:
            return "restarting"
        return "stopped"

    def status(self) -> ChildStatus:
        alive = self.proc is not None and self.proc.poll() is None
        return ChildStatus(
            state=self.state,
            pid=self.proc.pid if alive and self.proc is not None else None,
            restarts=self.restarts,
            last_exit=self.last_exit,
            failed=self.failed,
            log_file=self.log_file,
            tpm_failed=self.tpm_failed if alive else "",
        )


def last_log_line(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if " ERROR " in line or " CRITICAL " in line or "error:" in line:
            return line.split(": ", 1)[-1] if ": " in line else line
    return lines[-1] if lines else ""


class Supervisor:
    def __init__(self, serve: Serve, forkserver: ForkServer | None = None) -> None:
        self._serve = serve
        self._forkserver = forkserver
        self._children: dict[uuid.UUID, Child] = {}
        self._lock = threading.RLock()

    # control --------------------------------------------------------------------------------

    def start(
        self,
        vtpm_uuid: uuid.UUID,
        args: list[str],
        log_file: Path,
        once: Sequence[str] = (),
        *,
        restart: bool = True,
        pass_fds: Sequence[int] = (),
        on_exit: OnExit | None = None,
    ) -> Child:
        """Start (or restart) the instance of `vtpm_uuid` with `args` after `instance run`;
        `once` goes to this first process only, not to restarts (a measured launch's
        `--launch FILE` must not outlive the instance it was given to). `restart=False`: the
        process is not started again when it exits; `pass_fds` are inherited by it (they stay
        the caller's: close them once this returns); `on_exit` is told when it has exited."""
        if pass_fds and restart:
            raise ManagerError("inherited descriptors are for instances without restarts")
        with self._lock:
            child = self._children.get(vtpm_uuid)
            if child is not None and child.state in ("running", "starting"):
                raise ManagerError(f"vTPM {vtpm_uuid} is {child.state} already")
            child = Child(
                vtpm_uuid,
                args,
                log_file,
                once=list(once),
                restart=restart,
                pass_fds=tuple(pass_fds),
                on_exit=on_exit,
            )
            self._children[vtpm_uuid] = child
            self._spawn(child)
            return child

    def _spawn(self, child: Child) -> None:
        args = [*child.argv, *child.once]
        child.once = []
        try:
            child.log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            proc, mine = self._forked(child, args) or self._popen(child, args)
        except OSError as e:
            raise ManagerError(
                f"cannot start the instance of vTPM {child.vtpm_uuid}: {e}"
            ) from None
        finally:
            child.pass_fds = ()  # the first process only: the caller closes its copies
        child.proc = proc
        child.started = time.monotonic()
        child.restart_at = None
        child.ready = False
        child.ready_event = threading.Event()
        child.exit_handled = False
        child.failed = ""
        child.tpm_failed = ""
        child.link_thread = threading.Thread(
            target=self._run_link,
            args=(child, child.proc, mine),
            name=f"link-{child.vtpm_uuid}",
            daemon=True,
        )
        child.link_thread.start()
        how = "forked from the template" if isinstance(proc, ForkedProc) else "started"
        log.info("vTPM %s: instance %s (pid %d)", child.vtpm_uuid, how, proc.pid)
        # a forked instance shows the template's command line: its own is here (nothing secret)
        log.debug(
            "vTPM %s: instance pid %d arguments: %s", child.vtpm_uuid, proc.pid, shlex.join(args)
        )

    def _forked(self, child: Child, args: list[str]) -> tuple[Proc, socket.socket] | None:
        """From the template; None when there is none or it fails (the link is closed then:
        a child it may still have forked sees EOF and exits without a key)."""
        if self._forkserver is None:
            return None
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with child.log_file.open("ab") as errlog:
                proc = self._forkserver.spawn(
                    args, child.log_file, theirs.fileno(), errlog.fileno(), child.pass_fds
                )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        if proc is None:
            mine.close()
            return None
        return proc, mine

    def _popen(self, child: Child, args: list[str]) -> tuple[Proc, socket.socket]:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            argv = [*instanceargs.program(), *args]
            argv += instanceargs.per_process(theirs.fileno(), child.log_file)
            with child.log_file.open("ab") as errlog:
                proc = subprocess.Popen(
                    argv,
                    pass_fds=(theirs.fileno(), *child.pass_fds),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errlog,
                    start_new_session=True,
                )
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        return proc, mine

    def _run_link(self, child: Child, proc: Proc, sock: socket.socket) -> None:
        def ready() -> None:  # only for the process this link belongs to
            with self._lock:
                if child.proc is proc:
                    child.ready = True
                    child.ready_event.set()

        def health(reason: str) -> None:
            with self._lock:
                if child.proc is proc:
                    child.tpm_failed = reason

        try:
            self._serve(child.vtpm_uuid, sock, ready, health)
        except Exception:
            log.exception("vTPM %s: key-custody link failed", child.vtpm_uuid)
        finally:
            sock.close()

    def wait_ready(self, vtpm_uuid: uuid.UUID, timeout: float) -> None:
        """Wait until the instance just started serves; InstanceExitedError (and the vTPM no
        longer wanted running) when it exits first, ManagerError when `timeout` passes."""
        with self._lock:
            child = self._children.get(vtpm_uuid)
        if child is None:
            raise ManagerError(f"vTPM {vtpm_uuid} is not started")
        deadline = time.monotonic() + timeout
        while not child.ready_event.wait(0.05):
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                with self._lock:
                    child.wanted = False
                raise InstanceExitedError(
                    f"vTPM {vtpm_uuid} did not start: "
                    f"{last_log_line(child.log_file) or proc.returncode}"
                )
            if time.monotonic() > deadline:
                raise ManagerError(f"vTPM {vtpm_uuid} did not come up within {timeout:.0f} s")

    def stop(self, vtpm_uuid: uuid.UUID, timeout: float = STOP_TIMEOUT) -> bool:
        """Stop an instance (SIGTERM: it stores its state); True if it was running."""
        with self._lock:
            child = self._children.get(vtpm_uuid)
            if child is None:
                return False
            child.wanted = False
            child.restart_at = None
            proc = child.proc
        if proc is None or proc.poll() is not None:
            return False
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("vTPM %s did not stop within %.0f s; killing it", vtpm_uuid, timeout)
            proc.kill()
            proc.wait()
        child.last_exit = proc.returncode
        if child.link_thread is not None:
            child.link_thread.join(timeout=5)
        return True

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> None:
        with self._lock:
            uuids = list(self._children)
            for u in uuids:
                c = self._children[u]
                c.wanted = False
                c.restart_at = None
                if c.proc is not None and c.proc.poll() is None:
                    c.proc.send_signal(signal.SIGTERM)
        for u in uuids:
            self.stop(u, timeout)

    def forget(self, vtpm_uuid: uuid.UUID) -> None:
        with self._lock:
            self._children.pop(vtpm_uuid, None)

    def status(self, vtpm_uuid: uuid.UUID) -> ChildStatus | None:
        with self._lock:
            child = self._children.get(vtpm_uuid)
            return None if child is None else child.status()

    def active(self, vtpm_uuid: uuid.UUID) -> bool:
        """Whether the vTPM's instance runs or is starting."""
        with self._lock:
            child = self._children.get(vtpm_uuid)
            return child is not None and child.state in ("running", "starting")

    def running(self) -> list[uuid.UUID]:
        with self._lock:
            return [u for u, c in self._children.items() if c.state in ("running", "starting")]

    def pids(self) -> list[int]:
        with self._lock:
            return [
                c.proc.pid
                for c in self._children.values()
                if c.proc is not None and c.proc.poll() is None
            ]

    # the watch loop -------------------------------------------------------------------------

    def poll(self) -> None:
        """Reap exited children and restart the wanted ones when their delay has passed;
        tell the `on_exit` of those that are not restarted."""
        if self._forkserver is not None:
            self._forkserver.poll()
        now = time.monotonic()
        told: list[tuple[OnExit, int, str]] = []
        with self._lock:
            for child in self._children.values():
                proc = child.proc
                code = None if proc is None or child.exit_handled else proc.poll()
                if code is not None:
                    child.exit_handled = True
                    if not child.restart:
                        child.wanted = False
                        child.restart_at = None
                        child.last_exit = code
                        if child.on_exit is not None:
                            reason = last_log_line(child.log_file) if code else ""
                            told.append((child.on_exit, code, reason))
                        continue
                    self._exited(child, now)
                if child.wanted and child.restart_at is not None and now >= child.restart_at:
                    child.restarts += 1
                    try:
                        self._spawn(child)
                    except ManagerError as e:
                        child.failed = str(e)
                        child.restart_at = None
        for on_exit, code, reason in told:
            try:
                on_exit(code, reason)
            except Exception:
                log.exception("an instance's exit callback failed")

    def _exited(self, child: Child, now: float) -> None:
        assert child.proc is not None
        rc = child.proc.returncode
        child.last_exit = rc
        ran = now - child.started
        if not child.wanted:
            return
        reason = last_log_line(child.log_file)
        if ran >= HEALTHY_AFTER:
            child.backoff = FIRST_BACKOFF
        if child.ready:
            child.quick_failures = 0
        elif rc != 0:
            child.quick_failures += 1
        if child.quick_failures >= MAX_QUICK_FAILURES:
            child.failed = reason or f"exited with {rc}"
            child.restart_at = None
            log.error(
                "vTPM %s: instance failed %d times at start; giving up: %s",
                child.vtpm_uuid,
                child.quick_failures,
                child.failed,
            )
            return
        child.restart_at = now + child.backoff
        log.warning(
            "vTPM %s: instance exited with %s after %.1f s; restarting in %.1f s (%s)",
            child.vtpm_uuid,
            rc,
            ran,
            child.backoff,
            reason,
        )
        child.backoff = min(child.backoff * 2, MAX_BACKOFF)
