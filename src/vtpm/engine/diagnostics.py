"""libtpms' own diagnostics, kept out of the instance's log in clear.

libtpms writes some messages whatever its debug level (`TPMLIB_LogPrintfA` with indent ~0):
a state blob it cannot read, the TPM entering failure mode, and then a hex dump of the command
that put it there (`TPM2_Process`: "Entered failure mode through command:"). That command may be
an NV_Write, a Create with a sensitive part, a password session: bytes that must never reach a
log. By default these go to stderr, which is the instance's log file. Here they go to a pipe
whose reader logs each message line through `logging` and replaces each run of dump lines by
one line saying how many bytes were withheld.

The pipe is the process's (libtpms' debug fd is global, like the rest of its state), made once.
Its write end is non-blocking: should the reader ever fall behind, libtpms' write fails and the
message is lost, rather than a TPM command blocking on a full pipe.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading

log = logging.getLogger("vtpm.engine.libtpms")

_DUMP_LINE = re.compile(rb"\s*(?:[0-9a-fA-F]{2}\s+)*[0-9a-fA-F]{2}\s*")
_MAX_LINE = 4096

_lock = threading.Lock()
_write_fd: list[int] = []  # the pipe's write end, once made


def sink_fd() -> int:
    """The write end of the diagnostics pipe (made, and its reader started, on first use)."""
    with _lock:
        if not _write_fd:
            r, w = os.pipe2(os.O_CLOEXEC)
            fcntl.fcntl(w, fcntl.F_SETFL, fcntl.fcntl(w, fcntl.F_GETFL) | os.O_NONBLOCK)
            threading.Thread(target=_read, args=(r,), name="libtpms-log", daemon=True).start()
            _write_fd.append(w)
        return _write_fd[0]


def redact(lines: list[bytes]) -> list[str]:
    """The messages among `lines`, each run of hex-dump lines replaced by a count."""
    out: list[str] = []
    withheld = 0
    for line in lines:
        if _DUMP_LINE.fullmatch(line):
            withheld += len(line.split())
            continue
        if withheld:
            out.append(f"({withheld} bytes of a command dump withheld)")
            withheld = 0
        text = line.decode("utf-8", "replace").strip()
        if text:
            out.append(text[:_MAX_LINE])
    if withheld:
        out.append(f"({withheld} bytes of a command dump withheld)")
    return out


def _read(fd: int) -> None:
    pending = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            return
        if not chunk:
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        if len(pending) > _MAX_LINE:  # no newline for too long: judge what came so far
            lines.append(pending)
            pending = b""
        for message in redact(lines):
            log.warning("libtpms: %s", message)
