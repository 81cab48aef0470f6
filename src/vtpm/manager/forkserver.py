"""The Manager's side of the fork server: start the template, ask it for instances, watch it.

The template (`vtpm instance template`, `vtpm.instance.template`) is one process that has
imported an instance's code; asking it to fork a vTPM costs a few milliseconds and a few MB of
private memory instead of an interpreter's start. It is an optimisation and nothing depends on
it: while it is starting, dead, or does not answer within SPAWN_TIMEOUT, `spawn` returns None
and the supervisor starts the instance itself. A template that dies is started again with the
same doubling delay as an instance. What crosses its socket is public: the `instance run`
arguments and fds (the child's end of its key-custody link, its log, and a front-door
instance's inherited descriptors, which the child gets at the numbers its arguments name); the
socket is a socketpair, so nobody else can reach it.

The Manager makes itself a child subreaper (PR_SET_CHILD_SUBREAPER) so the template's children
become its own: `ForkedProc` then waits for and signals them as `subprocess.Popen` does its
children, with no pid reuse race (a pid is not reused before its parent reaps it).

Being a subreaper is a property of the whole process, not of the Manager object: every orphan
among the process's descendants is then adopted by it, and only a process that waits for it
takes it off the process table. So only the Manager service (`vtpm manager run`, whose
descendants are all its own) runs a fork server (`enabled` reads the switch); a Manager opened
inside another program (a test run, a tool) starts its instances with Popen, and would
otherwise hold every daemon its host ever started (a QEMU started with -daemonize, say) as a
zombie nobody waits for. `close` gives the role back.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from vtpm import instanceargs
from vtpm.errors import RemoteProtocolError
from vtpm.wire import spawn

log = logging.getLogger(__name__)

# VTPM_FORKSERVER=0 in the Manager's environment: start every instance with Popen
ENV = "VTPM_FORKSERVER"
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
SPAWN_TIMEOUT = 5.0
READY_WAIT = 3.0  # how long a spawn waits for a template that is starting
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
HEALTHY_AFTER = 60.0


def enabled() -> bool:
    """Whether the Manager service forks its instances from a template (`ENV`, default on)."""
    return os.environ.get(ENV, "1") != "0"


def is_subreaper() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int(0)
    if int(libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0)) != 0:
        return False
    return flag.value != 0


def set_subreaper(on: bool) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)) == 0


class ForkedProc:
    """An instance the template forked, now this process's child: the part of
    `subprocess.Popen` the supervisor uses."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # not ours (cannot happen once reparented)
                    self.returncode = 255
                else:
                    if pid:
                        self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (rc := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(["vtpm", "instance"], timeout or 0.0)
            time.sleep(0.02)
        return rc

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not reaped, so the pid is still this process
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    def __init__(self, log_file: Path) -> None:
        self.log_file = log_file
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._ready = False
        self._started = 0.0
        self._backoff = FIRST_BACKOFF
        self._restart_at: float | None = None
        self._closed = False
        self._made_subreaper = False  # this process was not one before `start`

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        was = is_subreaper()
        if not set_subreaper(True):
            log.warning("cannot become a child subreaper: vTPMs are started without the template")
            self._closed = True
            return
        self._made_subreaper = not was
        with self._lock:
            self._launch()

    def _launch(self) -> None:
        self._restart_at = None
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.log_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with self.log_file.open("ab") as errlog:
                self._proc = subprocess.Popen(
                    instanceargs.template_program(theirs.fileno(), self.log_file),
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=errlog,
                    start_new_session=True,
                )
        except OSError as e:
            mine.close()
            log.warning("cannot start the instance template: %s", e)
            self._restart(time.monotonic())
            return
        finally:
            theirs.close()
        self._sock = mine
        self._ready = False
        self._started = time.monotonic()
        log.info("instance template started (pid %d)", self._proc.pid)

    def _usable(self) -> bool:
        if self._ready:
            return True
        if self._sock is None or self._proc is None or self._proc.poll() is not None:
            return False
        # a template still importing is waited for a while: a start of its own costs as much
        wait = self._started + READY_WAIT - time.monotonic()
        try:
            self._sock.settimeout(max(wait, 0.0) or None)
            got = self._sock.recv(16) if wait > 0 else self._sock.recv(16, socket.MSG_DONTWAIT)
        except (BlockingIOError, TimeoutError):
            return False  # still importing
        except OSError:
            return False
        if got != spawn.TEMPLATE_READY:
            self._down("it sent no ready mark")
            return False
        self._ready = True
        return True

    def spawn(
        self, argv: list[str], log_file: Path, link: int, errlog: int, inherit: Sequence[int] = ()
    ) -> ForkedProc | None:
        """An instance forked from the template with `argv` (after `instance run`, without the
        per-process arguments), or None: then the caller starts it itself. The descriptors
        `inherit` are the child's at the same numbers (as `Popen(pass_fds=...)` gives them)."""
        if len(inherit) > spawn.MAX_INHERIT:
            return None
        with self._lock:
            if self._closed or not self._usable():
                return None
            sock = self._sock
            assert sock is not None
            try:
                sock.settimeout(SPAWN_TIMEOUT)
                request = spawn.encode_spawn(argv, log_file, inherit)
                socket.send_fds(sock, [request], [link, errlog, *inherit])
                pid = spawn.decode_pid(sock.recv(16))
            except (OSError, RemoteProtocolError) as e:
                self._down(f"spawn failed: {e}")
                return None
            if pid <= 0:
                log.warning("the instance template could not fork; starting the instance itself")
                return None
            return ForkedProc(pid)

    def _down(self, why: str) -> None:
        log.warning("instance template unusable (%s); restarting it", why)
        self._kill()
        self._restart(time.monotonic())

    def _kill(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._ready = False
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def _restart(self, now: float) -> None:
        if now - self._started >= HEALTHY_AFTER:
            self._backoff = FIRST_BACKOFF
        self._restart_at = now + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def poll(self) -> None:
        """Notice a dead template and start it again when its delay has passed."""
        now = time.monotonic()
        with self._lock:
            if self._closed:
                return
            proc = self._proc
            if self._restart_at is None and proc is not None and proc.poll() is not None:
                log.warning(
                    "instance template exited with %s; vTPMs start without it until it is back",
                    proc.returncode,
                )
                self._kill()
                self._restart(now)
            if self._restart_at is not None and now >= self._restart_at:
                self._launch()

    def close(self) -> None:
        """Stop the template and leave the process as `start` found it (call it after the
        instances are stopped: one adopted later would be nobody's to wait for)."""
        with self._lock:
            self._closed = True
            self._kill()
            if self._made_subreaper:
                set_subreaper(False)
                self._made_subreaper = False
