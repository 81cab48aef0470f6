"""The fork server's protocol, sans-IO: the Manager asks its template process to fork a vTPM
instance, and the template answers with the child's pid.

The template's socket (SOCK_SEQPACKET, one message per request): the Manager sends a spawn
request (JSON: the `instance run` arguments without the per-process ones, and the log file)
with two fds (the child's end of its key-custody link, its log opened for stderr); the
template answers with the child's pid (0: it could not fork). Nothing secret ever crosses.

A malformed request or answer is a `RemoteProtocolError`.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from vtpm.errors import RemoteProtocolError

TEMPLATE_READY = b"R"
SPAWN_FDS = 2
SPAWN_MAX = 1 << 16
_PID = struct.Struct(">i")


def encode_spawn(argv: list[str], log_file: Path) -> bytes:
    return json.dumps({"argv": argv, "log_file": str(log_file)}).encode()


def decode_spawn(data: bytes) -> tuple[list[str], Path]:
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
    return argv, Path(log_file)


def encode_pid(pid: int) -> bytes:
    return _PID.pack(pid)


def decode_pid(data: bytes) -> int:
    if len(data) != _PID.size:
        raise RemoteProtocolError(f"spawn answer: {len(data)} bytes, not {_PID.size}")
    pid: int = _PID.unpack(data)[0]
    return pid
