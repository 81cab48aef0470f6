"""The compat `swtpm socket` (the front door) against the real /usr/bin/swtpm, same arguments.

What an orchestrator waits for, from the exec of `swtpm socket --tpm2 --tpmstate dir=D --ctrl
type=unixio,path=S`: (1) S connectable (libvirt polls for the socket file, then QEMU connects)
and (2) the control channel answering GET_CAPABILITY (the TPM serves). For vtpm, (1) is the
front door's own start (it binds S before it imports more than the standard library; target
<= 300 ms), (2) adds the Manager spawning the vTPM instance on the passed sockets.

Set-up (not timed): a Manager in a fresh data directory with its front door enabled (`vtpm
compat enable`), the compat programs installed into the work directory, one vTPM made with the
compat `swtpm_setup` for the vtpm side's state directory. Then `--compat-rounds` rounds, each
starting both sides once (the one going first alternating) after one warm-up start each; a
figure is the median over the rounds, a ratio the median of the rounds' vtpm/swtpm ratios.
Each started process is stopped with SIGTERM (the front door: Detach, state stored).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import standalone_main, stop
from vtpm.cli import client
from vtpm.compat import install
from vtpm.wire import admin as api
from vtpm.wire import ctrl
from vtpm.wire._common import NEED_DATA

VTPM = [sys.executable, "-m", "vtpm.cli.main"]
TIMEOUT = 60.0
TARGET_CONNECTABLE_MS = 300.0


@dataclass(frozen=True, slots=True)
class Start:
    connectable_ms: float
    answer_ms: float


def _capability(sock: socket.socket) -> None:
    codec = ctrl.ControlClientConnection()
    sock.sendall(codec.send(ctrl.GetCapability()))
    while True:
        ev = codec.next_event()
        if ev is not NEED_DATA:
            if not isinstance(ev, ctrl.CapabilityResult) or ev.result != 0:
                raise RuntimeError(f"GET_CAPABILITY answered {ev}")
            return
        data = sock.recv(4096)
        if not data:
            raise RuntimeError("the control channel closed without answering")
        codec.receive_data(data)


def start_once(argv: list[str], path: str, env: dict[str, str]) -> Start:
    """Exec `argv`, time S connectable and GET_CAPABILITY answered, then SIGTERM it."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"{argv[0]} exited with {proc.returncode}: {err.strip()}")
            try:
                sock.connect(path)
                break
            except OSError:
                if time.perf_counter() - t0 > TIMEOUT:
                    raise RuntimeError(f"{path} not connectable within {TIMEOUT:.0f} s") from None
                time.sleep(0.0005)
        t1 = time.perf_counter()
        with sock:
            _capability(sock)
        t2 = time.perf_counter()
    finally:
        stop(proc, TIMEOUT)
        if proc.stderr:
            proc.stderr.close()
    return Start((t1 - t0) * 1000, (t2 - t0) * 1000)


def _argv(program: str, state: Path, sock: str) -> list[str]:
    return [program, "socket", "--tpm2", "--tpmstate", f"dir={state}", "--ctrl",
            f"type=unixio,path={sock},mode=0600"]  # fmt: skip


def _manager(work: Path, progress: Callable[[str], None]) -> tuple[subprocess.Popen[bytes], Path]:
    data = work / "m"
    env = dict(os.environ, VTPM_DATA_DIR=str(data))
    ns = argparse.Namespace(data_dir=data)
    door = work / "door.sock"

    def run_manager() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [*VTPM, "manager", "run", "--log-file", str(work / "manager.log")],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the Manager exited with {proc.returncode}")
            with contextlib.suppress(Exception):
                client.call(ns, api.Status())
                return proc
            if time.monotonic() > deadline:
                raise RuntimeError("the Manager did not answer")
            time.sleep(0.05)

    progress("compat: a Manager with its front door ...")
    subprocess.run([*VTPM, "manager", "init"], env=env, check=True, capture_output=True)
    key = work / "owner.pem"
    subprocess.run([*VTPM, "group", "keygen", str(key)], env=env, check=True, capture_output=True)
    proc = run_manager()
    try:
        client.call(
            ns,
            api.GroupNew(
                name="bench",
                owner_pub=Path(f"{key}.pub").read_text(),
                pcrs=tuple(range(8)),
                labels=("*:vm_r:vtpm_t",),
            ),
        )
        subprocess.run(
            [*VTPM, "compat", "enable", "--group", "bench", "--socket", str(door)],
            env=env,
            check=True,
            capture_output=True,
        )
    finally:
        stop(proc, TIMEOUT)
    return run_manager(), door


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    swtpm = shutil.which("swtpm", path="/usr/bin") or "/usr/bin/swtpm"
    work = Path(tempfile.mkdtemp(prefix="vtb-"))
    manager: subprocess.Popen[bytes] | None = None
    try:
        manager, door = _manager(work, progress)
        bindir = work / "bin"
        install.install(bindir, sys.executable)
        env = dict(os.environ, VTPM_COMPAT_SOCKET=str(door))
        vt_state, sw_state = work / "vt", work / "sw"
        sw_state.mkdir()
        made = subprocess.run(
            [str(bindir / "swtpm_setup"), "--tpm2", "--tpm-state", str(vt_state), "--createek"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if made.returncode != 0:
            raise RuntimeError(f"compat swtpm_setup failed: {made.stderr.strip()}")
        sides = {
            "vtpm": _argv(str(bindir / "swtpm"), vt_state, str(work / "vt.sock")),
            "swtpm": _argv(swtpm, sw_state, str(work / "sw.sock")),
        }
        paths = {"vtpm": str(work / "vt.sock"), "swtpm": str(work / "sw.sock")}
        for name, argv in sides.items():  # warm-up: page cache, first manufacture
            start_once(argv, paths[name], env)
        progress(f"compat: {args.compat_rounds} rounds of compat swtpm beside /usr/bin/swtpm ...")
        got: dict[str, list[Start]] = {"vtpm": [], "swtpm": []}
        for i in range(args.compat_rounds):
            order = ["vtpm", "swtpm"] if i % 2 == 0 else ["swtpm", "vtpm"]
            for name in order:
                got[name].append(start_once(sides[name], paths[name], env))
    finally:
        if manager is not None:
            stop(manager, TIMEOUT)
        shutil.rmtree(work, ignore_errors=True)
    out: dict[str, Any] = {"rounds": args.compat_rounds, "swtpm": swtpm}
    for metric in ("connectable_ms", "answer_ms"):
        out[metric] = {n: statistics.median(getattr(s, metric) for s in got[n]) for n in got}
        out[f"{metric}_ratio"] = statistics.median(
            getattr(v, metric) / getattr(s, metric)
            for v, s in zip(got["vtpm"], got["swtpm"], strict=True)
        )
    return out


def print_report(rep: dict[str, Any]) -> None:
    print(f"\nswtpm socket started by exec, median of {rep['rounds']} rounds (ms)")
    print(f"{'':44} {'compat swtpm':>13} {rep['swtpm']:>14} {'ratio':>8}")
    rows = (
        ("connectable_ms", "exec -> ctrl socket connectable"),
        ("answer_ms", "exec -> GET_CAPABILITY answered"),
    )
    for key, label in rows:
        v, s = rep[key]["vtpm"], rep[key]["swtpm"]
        print(f"{label:44} {v:13.1f} {s:14.1f} {rep[key + '_ratio']:7.2f}x")
    print(
        f"front door connectable within {TARGET_CONNECTABLE_MS:.0f} ms: "
        f"{'yes' if rep['connectable_ms']['vtpm'] <= TARGET_CONNECTABLE_MS else 'NO'}"
    )


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--compat-rounds", type=int, default=5, help="compat: starts of each side (default 5)"
    )


def main() -> int:
    return standalone_main(
        __doc__,
        add_arguments,
        run,
        print_report,
        passed=lambda rep: rep["connectable_ms"]["vtpm"] <= TARGET_CONNECTABLE_MS,
    )


if __name__ == "__main__":
    sys.exit(main())
