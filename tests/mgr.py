"""Test helpers for the Manager: a real `vtpm manager run` process and the `vtpm` CLI."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers import VTPM, free_port_pair, stop_process, wait_connectable
from vtpm.cli import client
from vtpm.wire import admin as api
from vtpm.wire import typedjson

GUEST1 = "guest1_u:vm_r:vtpm_t"
GUEST2 = "guest2_u:vm_r:vtpm_t"
ALL_GUESTS = "*:vm_r:vtpm_t"


def vtpm_cli(
    data_dir: Path, *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VTPM_DATA_DIR=str(data_dir))
    res = subprocess.run(
        [*VTPM, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and res.returncode != 0:
        raise AssertionError(f"vtpm {' '.join(args)} failed ({res.returncode}): {res.stderr}")
    return res


def admin_call(data_dir: Path, op: str, **params: Any) -> Any:
    """One admin request given as JSON arguments, as the `vtpm` CLI sends it, without a process
    per call; the result as JSON."""
    req = typedjson.decode(params, api.REQUESTS[op], op)
    return typedjson.encode(client.call(argparse.Namespace(data_dir=data_dir), req))


def vtpm_json(data_dir: Path, *args: str) -> Any:
    res = vtpm_cli(data_dir, *args, "--json")
    out = json.loads(res.stdout)
    assert out["ok"] is True, out
    return out["result"]


@dataclass
class ManagerProc:
    data_dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def log_file(self) -> Path:
        return self.data_dir / "manager.log"

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return vtpm_cli(self.data_dir, *args, check=check)

    def json(self, *args: str) -> Any:
        return vtpm_json(self.data_dir, *args)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        return stop_process(self.proc, sig, timeout)

    def instance_argv(self, pid: int) -> list[str]:
        """The command line of this Manager's instance process `pid`: its own when the Manager
        started it; one forked from the template shows the template's, so then `instance run`
        with the arguments the Manager logged for it (at debug level, as this Manager runs)."""
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
        if "template" not in argv:
            return argv
        found = re.findall(rf"instance pid {pid} arguments: (.*)", self.log())
        assert found, f"the Manager logged no arguments for its instance {pid}"
        return [*argv[: argv.index("template")], "run", *shlex.split(found[-1])]


def init_manager(data_dir: Path, *extra: str) -> None:
    vtpm_cli(data_dir, "manager", "init", *extra)


def start_manager(data_dir: Path, *run_args: str, prefix: Sequence[str] = ()) -> ManagerProc:
    """`vtpm manager run` on `data_dir`; `prefix` goes before the command (e.g. an nsenter)."""
    log = data_dir / "manager.log"
    proc = subprocess.Popen(
        [
            *prefix,
            *VTPM,
            "manager",
            "run",
            "--data-dir",
            str(data_dir),
            "--log-file",
            str(log),
            "--log-level=debug",
            *run_args,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    m = ManagerProc(data_dir, proc)
    try:
        wait_connectable(str(data_dir / "admin.sock"), proc, timeout=60)
    except BaseException:
        with contextlib.suppress(Exception):
            m.stop(signal.SIGKILL)
        raise
    return m


@contextlib.contextmanager
def manager(
    data_dir: Path, *init_args: str, run_args: Sequence[str] = (), prefix: Sequence[str] = ()
) -> Iterator[ManagerProc]:
    if not (data_dir / "manager.json").exists():
        init_manager(data_dir, *init_args)
    m = start_manager(data_dir, *run_args, prefix=prefix)
    try:
        yield m
    finally:
        with contextlib.suppress(Exception):
            m.stop()


def owner_key(directory: Path, name: str = "owner.pem") -> Path:
    key = directory / name
    if not key.exists():
        vtpm_cli(directory, "group", "keygen", str(key))
    return key


def new_group(
    m: ManagerProc, name: str, key: Path, labels: Sequence[str] = (ALL_GUESTS,), pcrs: str = "0-7"
) -> Any:
    args = ["group", "new", name, "--owner-key", f"{key}.pub", "--pcrs", pcrs]
    for label in labels:
        args += ["--label", label]
    return m.json(*args)


def new_vtpm(m: ManagerProc, group: str, label: str, *, start: bool = True) -> tuple[Any, int]:
    """A vTPM with raw + ctrl on TCP P/P+1 (tcti swtpm); returns its view and P."""
    port = free_port_pair()
    args = ["new", "--group", group, "--label", label]
    args += ["--server", f"tcp:127.0.0.1:{port}", "--ctrl", f"tcp:127.0.0.1:{port + 1}"]
    if start:
        args.append("--start")
    return m.json(*args), port


def wait_state(m: ManagerProc, vtpm_uuid: str, state: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = m.json("show", vtpm_uuid)
        if v["run"]["state"] == state:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"vTPM {vtpm_uuid} is {v['run']}, not {state}")
        time.sleep(0.1)
