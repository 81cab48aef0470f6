"""The fork server's template: a process that has imported an instance's code and forks vTPMs.

Starting a Python interpreter and importing the instance's modules (cryptography, the engine,
the frontends) is nearly all of a vTPM's start time and memory. The template pays it once and
forks one process per spawn request; the children share its pages copy-on-write (the GC is
frozen first, so collections do not touch and so copy them).

What the template holds is public: code. It never creates an Engine (libtpms is initialised
only in each child, which claims the engine itself) and never sees a key: a child's state key
arrives over the child's own key-custody link after the fork, exactly as for a process the
Manager starts itself. A child is a fresh process in what matters: its own session, default
signal handlers, no fd of the template's but its link, its log and the descriptors the request
passed it (at the numbers the request names, which its arguments refer to), and OpenSSL's
randomness reseeded (OpenSSL 3 reseeds after a fork by itself; the explicit mix costs nothing
and does not depend on it). Python reseeds `random` at fork on its own.

Each child is forked twice (template -> intermediate -> child, the intermediate exits at once)
so it is reparented to the Manager, which is a child subreaper: the Manager is the parent of
every instance however it was started, reaps it and signals it without a pid race, and a
template that dies takes no vTPM with it. The template answers a spawn only after it has reaped
the intermediate, so by then the child is the Manager's.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import random
import signal
import socket
import ssl
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vtpm import instanceargs
from vtpm.errors import RemoteProtocolError
from vtpm.wire import spawn

log = logging.getLogger(__name__)

ChildMain = Callable[[list[str]], int]

_MAX_FD = 1 << 16


def serve(sock: socket.socket, child_main: ChildMain) -> int:
    """Answer spawn requests on `sock` until the Manager closes it."""
    gc.collect()
    gc.freeze()  # what is imported now is shared with every child; keep the GC off it
    sock.sendall(spawn.TEMPLATE_READY)
    log.info("instance template ready (pid %d)", os.getpid())
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(
                sock, spawn.SPAWN_MAX, spawn.SPAWN_FDS + spawn.MAX_INHERIT
            )
        except ConnectionError:
            return 0
        if not data and not fds:
            return 0  # the Manager went away
        pid = 0
        try:
            argv, log_file, inherit = spawn.decode_spawn(data)
            if len(fds) != spawn.SPAWN_FDS + len(inherit):
                raise RemoteProtocolError(f"spawn request with {len(fds)} fds")
            inherited = tuple(zip(fds[spawn.SPAWN_FDS :], inherit, strict=True))
            passed = Passed(fds[0], fds[1], inherited)
            pid = _fork(sock, argv, log_file, passed, child_main)
        except (RemoteProtocolError, OSError) as e:
            log.error("spawn refused: %s", e)
        finally:
            for fd in fds:
                os.close(fd)
        sock.sendall(spawn.encode_pid(pid))


@dataclass(frozen=True, slots=True)
class Passed:
    """The descriptors of one spawn request, as the template received them."""

    link: int
    errlog: int
    inherit: tuple[tuple[int, int], ...]  # (received here, number in the child)


def _fork(
    sock: socket.socket, argv: list[str], log_file: Path, passed: Passed, main: ChildMain
) -> int:
    r, w = os.pipe()
    mid = os.fork()
    if mid == 0:  # the intermediate: fork the child, tell its pid, exit
        try:
            os.close(r)
            pid = os.fork()
            if pid == 0:
                os.close(w)
                _child(sock, argv, log_file, passed, main)
            os.write(w, spawn.encode_pid(pid))
        finally:
            os._exit(0)
    os.close(w)
    try:
        os.waitpid(mid, 0)
        data = os.read(r, 16)
    finally:
        os.close(r)
    return spawn.decode_pid(data) if data else 0


def _child(
    sock: socket.socket, argv: list[str], log_file: Path, passed: Passed, main: ChildMain
) -> None:
    """Become the instance: never returns."""
    code = 1
    try:
        os.setsid()
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        os.dup2(passed.errlog, 2)
        sock.detach()
        for h in logging.getLogger().handlers[:]:  # the template's log is not the child's
            logging.getLogger().removeHandler(h)
            h.close()
        link = _place(passed)
        ssl.RAND_add(os.urandom(64), 64.0)
        random.seed()
        code = main([*argv, *instanceargs.per_process(link, log_file)])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _place(passed: Passed) -> int:
    """Give each inherited descriptor its number in the child and close every other fd of the
    template's but 0-2 and the link; returns the link's number."""
    wanted = [n for _, n in passed.inherit]
    high = max([2, passed.link, *wanted, *(fd for fd, _ in passed.inherit)]) + 1
    # first out of the way of every wanted number, then onto them
    link = fcntl.fcntl(passed.link, fcntl.F_DUPFD, high)
    moved = [(fcntl.fcntl(fd, fcntl.F_DUPFD, high), n) for fd, n in passed.inherit]
    for fd, n in moved:
        os.dup2(fd, n)  # inheritable, as Popen's pass_fds leaves them
    keep = sorted({link, *wanted})
    low = 3
    for fd in keep:
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max(_MAX_FD, low))
    return link
