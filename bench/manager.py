"""Manager benchmark: create + start N vTPMs through the vTPM Manager, and the memory they take,
beside the swtpm equivalent (swtpm_setup + swtpm per vTPM), one after the other in one run.

vtpm: a fresh data directory, `vtpm manager run` (its hardware TPM is the swtpm simulator it
starts itself when there is no /dev/tpmrm0), one group, then per vTPM `vtpm.new` and
`vtpm.start` over the admin socket (`vtpm new --start` is one request; two here, to time each),
each vTPM with a raw TCP port. swtpm: per vTPM `swtpm_setup --tpm2 --createek` into a fresh
state directory, then `swtpm socket` on a raw TCP port. By default both sides provision EKs and
their certificates, as libvirt asks for: vtpm's default EKs (RSA-2048 and ECC P-256 with
certificates from the group CA in the hardware TPM, and a platform certificate) at the first
start, swtpm_setup `--create-ek-cert --create-platform-cert --lock-nvram` (certificates from
swtpm_localca); `--no-ek-certs`: swtpm_setup `--createek` alone, vtpm `--ek none`. On both sides
a vTPM counts as started once it has answered TPM2_Startup(CLEAR) and TPM2_GetRandom on its raw
port; the clock runs from the first create to the last answer. Memory is read from /proc once
all N are running: VmRSS (what `ps` shows; pages shared between processes are counted in each)
and PSS (shared pages divided among their users, so the sum is what N of them really take). CPU
time is that of every process involved (swtpm_setup and the swtpm it runs; the Manager, its
simulator and instances).

swtpm_setup 0.7 spends most of its time waiting, not working: once its own swtpm has shut down,
it polls kill(pid, 0) 500 times 1 ms apart before it reaps that (zombie) child, so about 0.55 s
of each swtpm_setup is idle (see its CPU time beside its wall time).

Run alone: `.venv/bin/python bench/manager.py [--vtpms N] [--json]`; `bench/run.py` runs it
after the transport benchmark (`--only manager` for this one alone).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import GETRANDOM, Client, free_pair, pss_kib, rss_kib, standalone_main, stop
from vtpm.cli import client
from vtpm.endpoints import Frontend
from vtpm.errors import ManagerError
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_RC
from vtpm.wire import admin as api

VTPM = [sys.executable, "-m", "vtpm.cli.main"]
STARTUP = frames.startup()
GROUP = "bench"
ANSWER_TIMEOUT = 30.0
MANAGER_TIMEOUT = 60.0


@dataclass
class Side:
    """One side's figures: per-vTPM phase times (s) and per-process memory (KiB)."""

    name: str
    total_s: float = 0.0
    create_s: list[float] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)
    instance_rss: list[int] = field(default_factory=list)
    instance_pss: list[int] = field(default_factory=list)
    extra: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "total_s": self.total_s,
            "create_s": self.create_s,
            "start_s": self.start_s,
            "instance_rss_kib": self.instance_rss,
            "instance_pss_kib": self.instance_pss,
            **self.extra,
        }


class ExitedError(RuntimeError):
    """The TPM process ended before it answered."""


PORT_ATTEMPTS = 3  # a port found free may be taken before the TPM binds it: then another


def answer(port: int, alive: Callable[[], bool], what: str) -> None:
    """Wait until the TPM on `port` answers TPM2_Startup(CLEAR), then TPM2_GetRandom."""
    deadline = time.monotonic() + ANSWER_TIMEOUT
    while True:
        try:
            c = Client(port)
            break
        except OSError:
            if not alive():
                raise ExitedError(f"{what} exited before it answered") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not listen on {port}") from None
            time.sleep(0.001)
    try:
        rc = frames.response_code(c.call(STARTUP))
        if rc not in (TPM_RC.SUCCESS, TPM_RC.INITIALIZE):
            raise RuntimeError(f"{what}: TPM2_Startup answered {rc:#x}")
        c.call_ok(GETRANDOM)
    finally:
        c.close()


_interrupted: list[int] = []
_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _check_interrupted() -> None:
    if _interrupted:
        raise KeyboardInterrupt


def _die_with_us() -> None:
    """In a child before exec: SIGTERM it when the benchmark's process ends, however it ends
    (the Manager then stops its instances; swtpm simply ends)."""
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _running(proc: subprocess.Popen[bytes]) -> bool:
    return proc.poll() is None


def cpu_s(pid: int) -> float:
    """User + system CPU time a live process has used, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU time of this process's reaped children (and theirs), in seconds."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _kill_leftovers(pids: list[int], marker: str) -> None:
    """SIGKILL the processes of `pids` still alive whose command line names `marker` (a pid
    may have been reused: only ours are touched)."""
    for pid in pids:
        if marker in _cmdline(pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# vtpm: the Manager -------------------------------------------------------------------------


def run_vtpm(work: Path, n: int, ek_certs: bool, progress: Callable[[str], None]) -> Side:
    side = Side("vtpm")
    data = work / "vtpm-data"
    ns = argparse.Namespace(data_dir=data)
    env = dict(os.environ, VTPM_DATA_DIR=str(data))
    proc: subprocess.Popen[bytes] | None = None
    instances: list[int] = []
    pids: list[int] = []  # the simulator and the instances: killed if the Manager leaves them
    try:
        t0 = time.perf_counter()
        subprocess.run([*VTPM, "manager", "init"], env=env, check=True, capture_output=True)
        key = work / "owner.pem"
        subprocess.run(
            [*VTPM, "group", "keygen", str(key)], env=env, check=True, capture_output=True
        )
        with (work / "manager.stderr").open("wb") as err:
            proc = subprocess.Popen(
                [*VTPM, "manager", "run", "--log-file", str(work / "manager.log")],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # not hit by a Ctrl-C: stopped in order below
                preexec_fn=_die_with_us,  # noqa: PLW1509 - the benchmark has one thread
            )
        status = _wait_manager(ns, proc)
        sim = json.loads((data / "hwtpm" / "simulator.json").read_text())
        pids.append(int(sim["pid"]))
        client.call(
            ns,
            api.GroupNew(
                name=GROUP,
                owner_pub=Path(f"{key}.pub").read_text(),
                pcrs=tuple(range(8)),
                labels=("*:vm_r:vtpm_t",),
            ),
        )
        side.extra["manager_setup_s"] = time.perf_counter() - t0
        time.sleep(0.5)
        side.extra["manager_idle_rss_kib"] = rss_kib(status.pid)

        progress(f"vtpm: creating and starting {n} vTPMs through the Manager ...")
        mgr_cpu0, sim_cpu0 = cpu_s(status.pid), cpu_s(int(sim["pid"]))
        start = time.perf_counter()
        for i in range(n):
            _check_interrupted()
            t = time.perf_counter()
            create = 0.0
            for attempt in range(PORT_ATTEMPTS):
                port = free_pair()
                t1 = time.perf_counter()
                frontends = (
                    Frontend.parse(f"server=tcp:127.0.0.1:{port}"),
                    Frontend.parse(f"ctrl=tcp:127.0.0.1:{port + 1}"),
                )
                eks = api.DEFAULT_EKS if ek_certs else ()
                made = client.call(
                    ns,
                    api.VtpmNew(GROUP, f"bench{i}_u:vm_r:vtpm_t", frontends=frontends, eks=eks),
                )
                create += time.perf_counter() - t1
                try:
                    v = client.call(ns, api.VtpmStart(made.uuid))
                    break
                except ManagerError as e:
                    if "in use" not in str(e) or attempt == PORT_ATTEMPTS - 1:
                        raise
                    client.call(ns, api.VtpmDel(made.uuid))
                    side.extra["port_retries"] = side.extra.get("port_retries", 0) + 1
            pid = v.run.pid
            if pid is None:
                raise RuntimeError(f"vTPM {v.uuid} started but has no pid")
            pids.append(pid)
            instances.append(pid)
            answer(port, partial(os.path.exists, f"/proc/{pid}"), f"vTPM {v.uuid}")
            done = time.perf_counter()
            side.create_s.append(create)
            side.start_s.append(done - t - create)
        side.total_s = time.perf_counter() - start
        x = side.extra
        x["cpu_manager_s"] = cpu_s(status.pid) - mgr_cpu0
        x["cpu_hw_simulator_s"] = cpu_s(int(sim["pid"])) - sim_cpu0
        x["cpu_instances_s"] = sum(cpu_s(p) for p in instances)
        x["cpu_s"] = x["cpu_manager_s"] + x["cpu_hw_simulator_s"] + x["cpu_instances_s"]

        time.sleep(1.0)
        final = client.call(ns, api.Status())
        if sorted(final.instance_pids) != sorted(instances):
            raise RuntimeError(f"the Manager runs {final.instance_pids}, not {instances}")
        side.instance_rss = [rss_kib(p) for p in instances]
        side.instance_pss = [pss_kib(p) for p in instances]
        side.extra["manager_rss_kib"] = rss_kib(status.pid)
        side.extra["manager_pss_kib"] = pss_kib(status.pid)
        template = _template_pid(status.pid)
        side.extra["template_rss_kib"] = rss_kib(template) if template else 0
        side.extra["template_pss_kib"] = pss_kib(template) if template else 0
        side.extra["manager_threads"] = _threads(status.pid)
        side.extra["hw_simulator_rss_kib"] = rss_kib(int(sim["pid"]))
        side.extra["hw_simulator_pss_kib"] = pss_kib(int(sim["pid"]))
        progress("vtpm: stopping the Manager and its instances ...")
        t = time.perf_counter()
        _stop_manager(proc)
        side.extra["manager_stop_s"] = time.perf_counter() - t
        return side
    except Exception:
        if proc is not None:
            sys.stderr.write(_tail(work / "manager.log") + _tail(work / "manager.stderr"))
        raise
    finally:
        if proc is not None:
            with contextlib.suppress(BaseException):
                _stop_manager(proc)
        _kill_leftovers(pids, str(data))


def _wait_manager(ns: argparse.Namespace, proc: subprocess.Popen[bytes]) -> api.StatusView:
    deadline = time.monotonic() + MANAGER_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the Manager exited with {proc.returncode}")
        with contextlib.suppress(Exception):
            return client.call(ns, api.Status())
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Manager did not answer within {MANAGER_TIMEOUT:.0f} s")
        time.sleep(0.05)


def _stop_manager(proc: subprocess.Popen[bytes]) -> None:
    stop(proc, MANAGER_TIMEOUT)


def _threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def _tail(path: Path, lines: int = 6) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"  {path.name}: {line}\n" for line in text)


# swtpm: swtpm_setup + swtpm per vTPM ------------------------------------------------------


def swtpm_setup_argv(state: Path, ek_certs: bool) -> list[str]:
    argv = ["swtpm_setup", "--tpm2", "--tpmstate", str(state), "--createek"]
    if ek_certs:  # as libvirt does: EK and platform certificates from swtpm_localca
        argv += ["--create-ek-cert", "--create-platform-cert", "--lock-nvram"]
    return argv


def swtpm_argv(state: Path, port: int) -> list[str]:
    return [
        "swtpm",
        "socket",
        "--tpm2",
        "--tpmstate",
        f"dir={state}",
        "--server",
        f"type=tcp,port={port},bindaddr=127.0.0.1",
        "--ctrl",
        f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
        "--flags",
        "not-need-init",
    ]


def run_swtpm(work: Path, n: int, ek_certs: bool, progress: Callable[[str], None]) -> Side:
    side = Side("swtpm")
    root = work / "swtpm"
    root.mkdir()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        progress(f"swtpm: swtpm_setup + swtpm for {n} vTPMs ...")
        cpu0 = children_cpu_s()
        start = time.perf_counter()
        for i in range(n):
            _check_interrupted()
            state = root / str(i)
            t = time.perf_counter()
            state.mkdir()
            subprocess.run(swtpm_setup_argv(state, ek_certs), check=True, capture_output=True)
            created = time.perf_counter()
            for attempt in range(PORT_ATTEMPTS):
                port = free_pair()
                log_path = root / f"{i}.{attempt}.log"
                with log_path.open("wb") as log:
                    proc = subprocess.Popen(
                        swtpm_argv(state, port),
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=log,
                        preexec_fn=_die_with_us,  # noqa: PLW1509 - the benchmark has one thread
                    )
                procs.append(proc)
                try:
                    answer(port, partial(_running, proc), f"swtpm {i}")
                    break
                except ExitedError as e:
                    why = log_path.read_text(errors="replace").strip()
                    if "in use" not in why or attempt == PORT_ATTEMPTS - 1:
                        raise RuntimeError(f"{e}: {why}") from None
                    side.extra["port_retries"] = side.extra.get("port_retries", 0) + 1
            done = time.perf_counter()
            side.create_s.append(created - t)
            side.start_s.append(done - created)
        side.total_s = time.perf_counter() - start
        # swtpm_setup reaps the swtpm it runs, so that swtpm's time is in its children's
        side.extra["cpu_s"] = (
            children_cpu_s() - cpu0 + sum(cpu_s(p.pid) for p in procs if p.poll() is None)
        )
        time.sleep(1.0)
        running = [p for p in procs if p.poll() is None]
        if len(running) != n:
            raise RuntimeError(f"{len(running)} swtpm processes run, not {n}")
        side.instance_rss = [rss_kib(p.pid) for p in running]
        side.instance_pss = [pss_kib(p.pid) for p in running]
        return side
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# the report --------------------------------------------------------------------------------


def _rows(n: int, sw: Side, vt: Side) -> list[tuple[str, str, float | None, float | None]]:
    def ms(xs: list[float]) -> float:
        return 1000 * statistics.mean(xs)

    def mean(xs: list[int]) -> float:
        return statistics.mean(xs)

    x = vt.extra
    return [
        ("create_start_total_s", f"create + start {n} vTPMs (s)", sw.total_s, vt.total_s),
        (
            "create_start_per_vtpm_ms",
            "  per vTPM (ms)",
            1000 * sw.total_s / n,
            1000 * vt.total_s / n,
        ),
        (
            "create_per_vtpm_ms",
            "  create: swtpm_setup / vtpm.new (ms)",
            ms(sw.create_s),
            ms(vt.create_s),
        ),
        (
            "start_per_vtpm_ms",
            "  start -> answers Startup+GetRandom (ms)",
            ms(sw.start_s),
            ms(vt.start_s),
        ),
        ("cpu_s", f"CPU time for those {n} (s, all processes)", sw.extra["cpu_s"], x["cpu_s"]),
        (
            "total_rss_kib",
            f"RSS, {n} running: total (KiB)",
            sum(sw.instance_rss),
            x["manager_rss_kib"] + x["template_rss_kib"] + sum(vt.instance_rss),
        ),
        (
            "instance_rss_kib",
            "  per instance process (KiB)",
            mean(sw.instance_rss),
            mean(vt.instance_rss),
        ),
        ("manager_rss_kib", f"  Manager, {n} running (KiB)", None, x["manager_rss_kib"]),
        ("manager_idle_rss_kib", "  Manager, 0 vTPMs (KiB)", None, x["manager_idle_rss_kib"]),
        ("template_rss_kib", "  instance template (KiB)", None, x["template_rss_kib"]),
        (
            "hw_simulator_rss_kib",
            "  hardware TPM simulator (KiB, not in total)",
            None,
            x["hw_simulator_rss_kib"],
        ),
        (
            "total_pss_kib",
            f"PSS, {n} running: total (KiB)",
            sum(sw.instance_pss),
            x["manager_pss_kib"] + x["template_pss_kib"] + sum(vt.instance_pss),
        ),
        (
            "instance_pss_kib",
            "  per instance process (KiB)",
            mean(sw.instance_pss),
            mean(vt.instance_pss),
        ),
        ("manager_pss_kib", f"  Manager, {n} running (KiB)", None, x["manager_pss_kib"]),
        ("template_pss_kib", "  instance template (KiB)", None, x["template_pss_kib"]),
        (
            "manager_setup_s",
            "Manager init + start + group (s, not in total)",
            None,
            x["manager_setup_s"],
        ),
    ]


def _template_pid(manager: int) -> int | None:
    """The Manager's fork-server template, if it runs one (its cost is the vTPMs')."""
    for task in Path(f"/proc/{manager}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"instance\0template" in cmd:
                return int(pid)
    return None


def report(n: int, sw: Side, vt: Side, ek_certs: bool) -> dict[str, Any]:
    table = []
    for key, label, s, v in _rows(n, sw, vt):
        table.append(
            {
                "metric": key,
                "label": label.strip(),
                "swtpm": s,
                "vtpm": v,
                "ratio_vtpm_over_swtpm": v / s if s and v is not None else None,
                "higher_is_better": False,
            }
        )
    return {
        "vtpms": n,
        "swtpm_setup": " ".join(swtpm_setup_argv(Path("DIR"), ek_certs)),
        "results": table,
        "labels": {key: label for key, label, _, _ in _rows(n, sw, vt)},
        "swtpm": sw.to_json(),
        "vtpm": vt.to_json(),
    }


def print_report(rep: dict[str, Any]) -> None:
    def cell(x: float | None) -> str:
        if x is None:
            return "-"
        return f"{x:.1f}" if abs(x) < 1000 else f"{x:.0f}"

    print(f"\n{rep['vtpms']} vTPMs, one after the other: Manager vs {rep['swtpm_setup']} + swtpm")
    print(f"{'metric':48} {'swtpm':>10} {'vtpm':>10} {'vtpm/swtpm':>11}")
    for row in rep["results"]:
        ratio = row["ratio_vtpm_over_swtpm"]
        print(
            f"{rep['labels'][row['metric']]:48} {cell(row['swtpm']):>10} {cell(row['vtpm']):>10} "
            f"{'-' if ratio is None else f'{ratio:.2f}x':>11}"
        )
    for name in ("swtpm", "vtpm"):
        side = rep[name]
        per = [1000 * (c + s) for c, s in zip(side["create_s"], side["start_s"], strict=True)]
        k = max(1, len(per) // 10)
        print(
            f"{name} per vTPM (ms): min {min(per):.0f}, median {statistics.median(per):.0f}, "
            f"max {max(per):.0f}; first {k} mean {statistics.mean(per[:k]):.0f}, "
            f"last {k} mean {statistics.mean(per[-k:]):.0f}"
        )
    for name in ("swtpm", "vtpm"):
        if rep[name].get("port_retries"):
            print(f"{name}: {rep[name]['port_retries']:.0f} start(s) retried: port taken meanwhile")
    vt = rep["vtpm"]
    print(
        f"vtpm CPU (s): instances {vt['cpu_instances_s']:.1f}, Manager {vt['cpu_manager_s']:.1f}, "
        f"hardware TPM simulator {vt['cpu_hw_simulator_s']:.1f}"
    )
    print(
        f"Manager: {vt['manager_threads']:.0f} threads with {rep['vtpms']} running; "
        f"stopping it and its instances took {vt['manager_stop_s']:.1f} s"
    )
    print(f"manager benchmark runtime {rep['bench_runtime_s']:.0f} s on {os.cpu_count()} cores")


# entry points ------------------------------------------------------------------------------


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--vtpms", type=int, default=50, metavar="N", help="vTPMs per side (default 50)"
    )
    ap.add_argument(
        "--ek-certs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="both sides provision EK and platform certificates, as libvirt asks for "
        "(default; --no-ek-certs: swtpm_setup --createek alone, vtpm --ek none)",
    )


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every process and directory is cleaned up."""

    def on_term(signum: int, _frame: FrameType | None) -> None:
        _interrupted.append(signum)  # seen by the loops too, were this exception swallowed
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    """Both sides, swtpm first; the report (see `report`)."""
    for tool in ("swtpm", "swtpm_setup"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (run ./dev install)")
    if args.vtpms < 1:
        raise RuntimeError("--vtpms must be at least 1")
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="vtpm-bench-mgr-"))
    try:
        with _sigterm_interrupts():
            sw = run_swtpm(work, args.vtpms, args.ek_certs, progress)
            vt = run_vtpm(work, args.vtpms, args.ek_certs, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rep = report(args.vtpms, sw, vt, args.ek_certs)
    rep["bench_runtime_s"] = time.perf_counter() - t0
    return rep


def main() -> int:
    return standalone_main(
        __doc__,
        add_arguments,
        run,
        print_report,
        interrupted="bench: interrupted; processes and temporary files removed",
    )


if __name__ == "__main__":
    sys.exit(main())
