"""What the benchmarks share: free TCP port pairs, a raw TPM client, process memory, stopping a
process, and the entry point of a benchmark run alone."""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vtpm.errors import VtpmError
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_RC

GETRANDOM = frames.get_random(32)


def stop(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (a vTPM or Manager stores its state), SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_pair() -> int:
    while True:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        s.close()
        if port >= 65000:
            continue
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
        finally:
            t.close()


class Client:
    """A raw TPM client over one TCP connection."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("TPM closed the connection")
            buf += chunk
        return buf

    def call(self, command: bytes) -> bytes:
        self.sock.sendall(command)
        head = self._read(10)
        (size,) = struct.unpack_from(">I", head, 2)
        return head + self._read(size - 10)

    def call_ok(self, command: bytes) -> bytes:
        for _ in range(10):
            resp = self.call(command)
            rc = frames.response_code(resp)
            if rc == TPM_RC.RETRY:
                continue
            if rc != TPM_RC.SUCCESS:
                raise RuntimeError(f"TPM answered {rc:#x}")
            return resp
        raise RuntimeError("TPM kept answering RETRY")

    def close(self) -> None:
        self.sock.close()


def _status_kib(pid: int, path: str, key: str) -> int:
    for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    return _status_kib(pid, "status", "VmRSS:")


def pss_kib(pid: int) -> int:
    """Proportional set size (shared pages divided among their users), in KiB."""
    return _status_kib(pid, "smaps_rollup", "Pss:")


Report = dict[str, Any]


def standalone_main(
    doc: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    run: Callable[[argparse.Namespace, Callable[[str], None]], Report],
    print_report: Callable[[Report], None],
    *,
    interrupted: str = "bench: interrupted",
    passed: Callable[[Report], bool] = lambda _rep: True,
) -> int:
    """`main` of a benchmark script (bench/run.py, or one module run alone): its options plus
    --json, progress on stderr, one-line errors (exit 1), the report as a table or JSON; exit 1
    too when `passed` says the benchmark missed its target."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    add_arguments(ap)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()

    def progress(msg: str) -> None:
        if not args.json:
            print(f"bench: {msg}", file=sys.stderr)

    try:
        rep = run(args, progress)
    except (RuntimeError, VtpmError) as e:
        print(f"bench: {e}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        print(f"bench: {' '.join(map(str, e.cmd))} failed: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print_report(rep)
    return 0 if passed(rep) else 1
