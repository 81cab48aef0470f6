"""The fork server's protocol, sans-IO: the Manager asks its template process to fork a vTPM
instance, and the template answers with the child's pid.

The template's socket (SOCK_SEQPACKET, one message per request): the Manager sends a spawn
request (JSON: the `instance run` arguments without the per-process ones, the log file, and
the numbers the inherited descriptors must have in the child) with `SPAWN_FDS` fds (the
child's end of its key-custody link, its log opened for stderr) followed by the inherited ones
in the same order (a front-door instance's: its state location, listening sockets, the read end
of its migration secret's pipe); the template answers with the child's pid (0: it could not
fork). Nothing secret crosses: at most a descriptor the child reads a secret from, which the
template closes unread.

A malformed request or answer is a `RemoteProtocolError`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from pathlib import Path

from vtpm.errors import RemoteProtocolError

TEMPLATE_READY = b"R"
SPAWN_FDS = 2  # the link and the log, before any inherited descriptor
MAX_INHERIT = 8  # inherited descriptors in one request (a front door passes up to 4)
MAX_FD_NUMBER = 1 << 16  # an inherited descriptor's number in the child is in 3..this-1
SPAWN_MAX = 1 << 16
_PID = struct.Struct(">i")


def encode_spawn(argv: list[str], log_file: Path, inherit: Sequence[int] = ()) -> bytes:
    msg = {"argv": argv, "log_file": str(log_file), "inherit": list(inherit)}
    return json.dumps(msg).encode()


def decode_spawn(data: bytes) -> tuple[list[str], Path, tuple[int, ...]]:
    """The arguments, the log file, and the numbers the inherited descriptors get."""
    try:
        msg = json.loads(data)
    except ValueError:
        raise RemoteProtocolError("spawn request: not JSON") from None
    argv = msg.get("argv") if isinstance(msg, dict) else None
    log_file = msg.get("log_file") if isinstance(msg, dict) else None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise RemoteProtocolError("spawn request: argv is not a list of strings")
    if not isinstance(log_file, str) or not log_file:
        raise RemoteProtocolError("spawn request: no log file")
    inherit = msg.get("inherit", [])
    if (
        not isinstance(inherit, list)
        or len(inherit) > MAX_INHERIT
        or not all(type(n) is int and 3 <= n < MAX_FD_NUMBER for n in inherit)
        or len(set(inherit)) != len(inherit)
    ):
        raise RemoteProtocolError("spawn request: inherit is not a list of distinct fd numbers")
    return argv, Path(log_file), tuple(inherit)


def encode_pid(pid: int) -> bytes:
    return _PID.pack(pid)


def decode_pid(data: bytes) -> int:
    if len(data) != _PID.size:
        raise RemoteProtocolError(f"spawn answer: {len(data)} bytes, not {_PID.size}")
    pid: int = _PID.unpack(data)[0]
    return pid
