"""What every Manager-facing command shares: where the Manager is, one request, the output."""

from __future__ import annotations

import argparse
import json
import os
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar, get_args

from vtpm.errors import ConfigError, ManagerError, RemoteProtocolError
from vtpm.manager.config import DEFAULT_DATA_DIR
from vtpm.serving import ConnectionLostError, IdleTimeoutError, events
from vtpm.wire import admin as api
from vtpm.wire import ipc, typedjson
from vtpm.wire.typedjson import Bounds

TIMEOUT = 120.0
R = TypeVar("R")


def add_common(p: argparse.ArgumentParser, *, json_output: bool = True) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help=f"the Manager's data directory (default $VTPM_DATA_DIR or {DEFAULT_DATA_DIR})",
    )
    if json_output:
        p.add_argument("--json", action="store_true", help="machine-readable output")


def data_dir(args: argparse.Namespace) -> Path:
    if args.data_dir is not None:
        return Path(args.data_dir)
    env = os.environ.get("VTPM_DATA_DIR")
    return Path(env) if env else DEFAULT_DATA_DIR


def call(args: argparse.Namespace, req: api.Request[R]) -> R:
    """One admin request to the Manager; its typed result, or ManagerError with its error."""
    path = data_dir(args) / "admin.sock"
    codec = ipc.IpcConnection(ipc.Role.PEER)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT)
        try:
            s.connect(str(path))
        except FileNotFoundError:
            raise ConfigError(
                f"no Manager at {path} (start one with: vtpm manager run --data-dir "
                f"{data_dir(args)})"
            ) from None
        except OSError as e:
            raise ConfigError(f"cannot reach the Manager at {path}: {e.strerror}") from None
        try:
            sent = _send(s, codec.send(api.request_frame(req)))
            reply = next(iter(events(s, codec)), None)
        except (TimeoutError, IdleTimeoutError):
            raise ManagerError(
                f"the Manager did not answer {req.op} within {TIMEOUT:.0f} s"
            ) from None
        except (OSError, RemoteProtocolError, ConnectionLostError) as e:
            if not sent:
                raise ManagerError(REFUSED) from None
            raise ManagerError(f"talking to the Manager failed: {e}") from None
    if reply is None:
        raise ManagerError(
            REFUSED if not sent else "the Manager closed the connection without answering"
        )
    if not isinstance(reply, ipc.AdminReply):
        raise ManagerError(f"the Manager answered with {type(reply).__name__}")
    if not reply.ok:
        raise ManagerError(reply.error)
    try:
        return api.parse_result(req, reply)
    except RemoteProtocolError as e:
        raise ManagerError(str(e)) from None


REFUSED = (
    "the Manager refused this user: it closed the connection before reading the request "
    "(not its user or admin group, or too many connections; see its log)"
)


def _send(s: socket.socket, frame: bytes) -> bool:
    """Send the request; False if the Manager had already closed the connection (it refuses a
    peer at once, after writing the reason as a reply, which is still there to read)."""
    try:
        s.sendall(frame)
    except (BrokenPipeError, ConnectionResetError):
        return False
    return True


def bounded_int(annotated: object) -> Callable[[str], int]:
    """An argparse type for an integer field of the admin protocol (`api.Id`, `api.Limit`):
    the CLI refuses locally what the Manager would refuse, with the same `Bounds`."""
    bounds = next(b for b in get_args(annotated)[1:] if isinstance(b, Bounds))

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not an integer") from None
        if not bounds.lo <= value <= bounds.hi:
            raise argparse.ArgumentTypeError(f"{text[:40]} is outside {bounds.lo}..{bounds.hi}")
        return value

    return parse


def emit(args: argparse.Namespace, result: object, text: str) -> int:
    """Print `result` (as JSON with --json) or `text`."""
    if getattr(args, "json", False):
        doc = {"ok": True, "result": typedjson.encode(result)}
        print(json.dumps(doc, indent=2, sort_keys=True))
    elif text:
        print(text)
    return 0


def vtpm_uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ConfigError(f"{text[:80]!r} is not a vTPM uuid") from None


def write_output(path: Path, data: bytes) -> None:
    """Write a command's output file; one clear error when it cannot be written."""
    try:
        path.write_bytes(data)
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}") from None


def table(rows: list[list[str]], header: list[str]) -> str:
    if not rows:
        return "(none)"
    cols = [header, *rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cols]
    return "\n".join(lines)
