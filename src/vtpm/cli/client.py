"""What every Manager-facing command shares: where the Manager is, one request, the output."""

from __future__ import annotations

import argparse
import json
import os
import socket
from pathlib import Path
from typing import Any

from vtpm.errors import ConfigError, ManagerError, RemoteProtocolError
from vtpm.manager.config import DEFAULT_DATA_DIR
from vtpm.wire import ipc
from vtpm.wire._common import CLOSED, NEED_DATA

TIMEOUT = 120.0


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


def call(args: argparse.Namespace, op: str, **params: Any) -> Any:
    """One admin request to the Manager; its result, or ManagerError with its error."""
    path = data_dir(args) / "admin.sock"
    codec = ipc.IpcConnection(ipc.Role.PEER)
    request = ipc.AdminRequest(op, {k: v for k, v in params.items() if v is not None})
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
            s.sendall(codec.send(request))
            while True:
                ev = codec.next_event()
                if ev is NEED_DATA:
                    codec.receive_data(s.recv(65536))
                    continue
                if ev is CLOSED:
                    raise ManagerError("the Manager closed the connection without answering")
                break
        except TimeoutError:
            raise ManagerError(f"the Manager did not answer {op} within {TIMEOUT:.0f} s") from None
        except (OSError, RemoteProtocolError) as e:
            raise ManagerError(f"talking to the Manager failed: {e}") from None
    if not isinstance(ev, ipc.AdminReply):
        raise ManagerError(f"the Manager answered with {type(ev).__name__}")
    if not ev.ok:
        raise ManagerError(ev.error)
    return ev.result


def emit(args: argparse.Namespace, result: Any, text: str) -> int:
    if getattr(args, "json", False):
        print(json.dumps({"ok": True, "result": result}, indent=2, sort_keys=True))
    elif text:
        print(text)
    return 0


def table(rows: list[list[str]], header: list[str]) -> str:
    if not rows:
        return "(none)"
    cols = [header, *rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cols]
    return "\n".join(lines)
