"""Benchmarks: a vtpm instance beside swtpm, same machine, same transport, one run.

For each: process start -> first answer, idle RSS, and round-trip rates over one persistent
raw TCP connection (the data socket tpm2-tss TCTI `swtpm` uses) for TPM2_PCR_Extend,
TPM2_GetRandom(32), TPM2_Quote (ECC P-256 AK) and TPM2_Create (RSA 2048). Then the in-process
floor: the libtpms engine alone, no transport. Prints a table with the vtpm/swtpm ratios
(rates: higher is better; RSS and start time: lower is better; a rate's ratio is the median
of back-to-back slice ratios, see `measure`); `--json` prints it as data.
Then the Manager benchmark (bench/manager.py): create + start N vTPMs through the vTPM Manager
beside swtpm_setup + swtpm, and the memory N of each take. Then bench/mssim.py: TCTI mssim
against TCTI swtpm per command on one vTPM. Then bench/compat.py: the compat `swtpm socket` (the
front door) against /usr/bin/swtpm from exec to a serving control socket.
`--only transport|manager|mssim|compat|...` runs one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vtpm.tpm.constants import TPM_ALG

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common
from bench import compat as compat_bench
from bench import deepquote as dq_bench
from bench import manager as mgr_bench
from bench import mssim as mssim_bench
from bench import templates as tmpl
from bench import verify as verify_bench
from bench.common import GETRANDOM, Client, free_pair, rss_kib, standalone_main
from vtpm.tpm import frames

VTPM = [sys.executable, "-m", "vtpm.cli.main"]
EXTEND = frames.pcr_extend(16, {TPM_ALG.SHA256: b"\x5a" * 32})


@dataclass
class Target:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    start_s: float
    results: dict[str, float] = field(default_factory=dict)


def first_answer(argv: list[str], port: int) -> tuple[subprocess.Popen[bytes], float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"{argv[0]} exited: {err}")
        try:
            c = Client(port)
        except OSError:
            time.sleep(0.001)
            continue
        try:
            c.call(GETRANDOM)
        finally:
            c.close()
        return proc, time.perf_counter() - t0


def start_swtpm(work: Path) -> Target:
    port = free_pair()
    state = work / "swtpm"
    state.mkdir()
    argv = [
        "swtpm",
        "socket",
        "--tpm2",
        "--tpmstate",
        f"dir={state}",
        "--server",
        f"type=tcp,port={port}",
        "--ctrl",
        f"type=tcp,port={port + 1}",
        "--flags",
        "not-need-init,startup-clear",
    ]
    proc, t = first_answer(argv, port)
    return Target("swtpm", proc, port, t)


def start_vtpm(work: Path, extra: Sequence[str] = ()) -> Target:
    port = free_pair()
    key = work / "vtpm.key"
    if not key.exists():
        subprocess.run([*VTPM, "instance", "keygen", str(key)], check=True, capture_output=True)
    argv = [
        *VTPM,
        "instance",
        "run",
        "--state-dir",
        str(work / "vtpm"),
        "--key-file",
        str(key),
        "--server",
        f"tcp:127.0.0.1:{port}",
        "--ctrl",
        f"tcp:127.0.0.1:{port + 1}",
        "--startup-clear",
        "--log-level",
        "warning",
        *extra,
    ]
    proc, t = first_answer(argv, port)
    return Target("vtpm", proc, port, t)


def rate(fn: Callable[[], object], seconds: float, min_count: int = 3) -> float:
    n = 0
    t0 = time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= min_count:
            return n / dt


class Session:
    """One benchmark connection to a target, with the objects the command mix needs."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.client = Client(target.port)
        c = self.client
        ak = tmpl.handle_of(c.call_ok(tmpl.create_primary(tmpl.ecc_ak_public())))
        storage = tmpl.handle_of(c.call_ok(tmpl.create_primary(tmpl.ecc_storage_public())))
        self.commands = {
            "pcr_extend_per_s": EXTEND,
            "getrandom_per_s": GETRANDOM,
            "quote_ecc_p256_per_s": tmpl.quote(ak, b"benchmark-nonce!", list(range(8))),
            "create_rsa2048_per_s": tmpl.create(storage, tmpl.rsa2048_sign_public()),
        }
        c.call_ok(self.commands["quote_ecc_p256_per_s"])  # first ECDSA use may say RETRY
        for _ in range(200):  # warm-up
            c.call_ok(GETRANDOM)

    def rate(self, metric: str, seconds: float, min_count: int) -> float:
        cmd = self.commands[metric]
        return rate(lambda: self.client.call_ok(cmd), seconds, min_count)

    def close(self) -> None:
        self.client.close()


SLICES_PER_ROUND = 5


def measure(targets: list[Target], seconds: float, creates: int, rounds: int) -> dict[str, float]:
    """Each rate: the targets take turns in short slices (`rounds` x 5 slices of seconds/5 per
    target for the fast commands, `rounds` turns for Create), the one going first alternating.
    Each target's rate is the median of its slices; the vtpm/swtpm ratio returned is the median
    of the ratios of back-to-back slices, so drift in the machine's speed (which on a shared
    machine moves both rates by tens of percent within seconds) cancels out of it."""
    sessions = [Session(t) for t in targets]
    ratios: dict[str, float] = {}
    try:
        for metric, _label, _ in ROWS[:4]:
            samples: dict[str, list[float]] = {t.name: [] for t in targets}
            pair_ratios: list[float] = []
            create = metric == "create_rsa2048_per_s"
            turns = rounds if create else rounds * SLICES_PER_ROUND
            for i in range(turns):
                pair: dict[str, float] = {}
                for s in sessions if i % 2 == 0 else sessions[::-1]:
                    if create:
                        value = s.rate(metric, 0.0, creates)
                    else:
                        value = s.rate(metric, seconds / SLICES_PER_ROUND, 3)
                    samples[s.target.name].append(value)
                    pair[s.target.name] = value
                pair_ratios.append(pair["vtpm"] / pair["swtpm"])
            for t in targets:
                t.results[metric] = statistics.median(samples[t.name])
            ratios[metric] = statistics.median(pair_ratios)
    finally:
        for s in sessions:
            s.close()
    time.sleep(0.5)
    for t in targets:
        t.results["idle_rss_kib"] = rss_kib(t.proc.pid)
        t.results["start_to_first_answer_ms"] = t.start_s * 1000
    return ratios


def stop(target: Target) -> None:
    common.stop(target.proc, 20)


FLOOR_CODE = """
import json, sys, time
from vtpm.engine.engine import Engine, TpmVersion
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_ALG
class Mem:
    def __init__(self): self.d = {}
    def load(self, n): return self.d.get(n)
    def store(self, n, data): self.d[n] = data
    def delete(self, n, m): return self.d.pop(n, None) is not None
seconds = float(sys.argv[1])
ext = frames.pcr_extend(16, {TPM_ALG.SHA256: b"Z" * 32})
rnd = frames.get_random(32)
out = {}
with Engine(TpmVersion.TPM20, Mem()) as e:
    e.start(); e.process(frames.startup())
    for name, cmd in (("pcr_extend_per_s", ext), ("getrandom_per_s", rnd)):
        n = 0; t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            e.process(cmd); n += 1
        out[name] = n / (time.perf_counter() - t0)
print(json.dumps(out))
"""

ROWS = (
    ("pcr_extend_per_s", "TPM2_PCR_Extend round trips/s", True),
    ("getrandom_per_s", "TPM2_GetRandom(32) round trips/s", True),
    ("quote_ecc_p256_per_s", "TPM2_Quote (ECC P-256 AK)/s", True),
    ("create_rsa2048_per_s", "TPM2_Create (RSA 2048)/s", True),
    ("start_to_first_answer_ms", "process start -> first answer (ms)", False),
    ("idle_rss_kib", "idle RSS (KiB)", False),
)


def run_transport(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="vtpm-bench-"))
    targets: list[Target] = []
    paired: dict[str, float] = {}
    try:
        for start in (start_swtpm, start_vtpm):
            targets.append(start(work))
        if not args.json:
            print(
                f"bench: measuring swtpm and vtpm, {args.rounds} alternating rounds ...",
                file=sys.stderr,
            )
        paired = measure(targets, args.seconds, args.creates, args.rounds)
    finally:
        for t in targets:
            stop(t)
        shutil.rmtree(work, ignore_errors=True)
    floor = json.loads(
        subprocess.run(
            [sys.executable, "-c", FLOOR_CODE, str(args.seconds)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    sw, vt = targets[0].results, targets[1].results
    table = []
    for key, label, higher_better in ROWS:
        plain = vt[key] / sw[key] if sw[key] else float("nan")
        ratio = paired.get(key, plain)
        table.append(
            {
                "metric": key,
                "label": label,
                "swtpm": sw[key],
                "vtpm": vt[key],
                "ratio_vtpm_over_swtpm": ratio,
                "higher_is_better": higher_better,
            }
        )
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    python = f"CPython {platform.python_version()} ({base})"
    return {"results": table, "engine_floor": floor, "python": python}


def print_transport(rep: dict[str, Any]) -> None:
    print(f"\n{'metric':40} {'swtpm':>12} {'vtpm':>12} {'vtpm/swtpm':>11}")
    for row in rep["results"]:
        print(
            f"{row['label']:40} {row['swtpm']:12.1f} {row['vtpm']:12.1f} "
            f"{row['ratio_vtpm_over_swtpm']:10.2f}x"
        )
    print("\nin-process floor (libtpms engine alone, no transport):")
    for k, v in rep["engine_floor"].items():
        print(f"  {k:38} {v:12.1f}")
    print(
        f"\nmachine: {os.cpu_count()} cores; transport: raw TPM over one TCP connection "
        f"on 127.0.0.1; vtpm runs on {rep['python']}"
    )


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--only",
        choices=["transport", "manager", "deepquote", "verify", "mssim", "compat"],
        default=None,
        help="run one benchmark: transport (one instance each, command rates, start, RSS), "
        "manager (create + start N vTPMs, memory with N running), deepquote (batched vs "
        "unbatched deep quotes on a slowed hardware quote) or verify (deep quotes verified per "
        "second on one core) or mssim (TCTI mssim against TCTI swtpm per command on one vTPM) "
        "or compat (the compat swtpm socket against /usr/bin/swtpm, exec to serving); default all",
    )
    ap.add_argument("--seconds", type=float, default=1.0, help="per sample (default 1)")
    ap.add_argument("--creates", type=int, default=4, help="RSA 2048 creates per round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (median kept)")
    mgr_bench.add_arguments(ap)
    dq_bench.add_arguments(ap)
    verify_bench.add_arguments(ap)
    compat_bench.add_arguments(ap)


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    if shutil.which("swtpm") is None:
        raise RuntimeError("swtpm is not installed (run ./dev install)")
    out: dict[str, Any] = {}
    if args.only in (None, "transport"):
        out.update(run_transport(args))
    if args.only in (None, "mssim"):
        out["mssim"] = mssim_bench.run(args, progress, start_swtpm, start_vtpm, stop)
    if args.only in (None, "compat"):
        out["compat"] = compat_bench.run(args, progress)
    if args.only in (None, "manager"):
        out["manager"] = mgr_bench.run(args, progress)
    if args.only in (None, "deepquote"):
        out["deepquote"] = dq_bench.run_args(args, progress)
    if args.only in (None, "verify"):
        out["verify"] = verify_bench.run(args, progress)
    return out


def print_report(out: dict[str, Any]) -> None:
    if "results" in out:
        print_transport(out)
    if "mssim" in out:
        mssim_bench.print_report(out["mssim"])
    if "compat" in out:
        compat_bench.print_report(out["compat"])
    if "manager" in out:
        mgr_bench.print_report(out["manager"])
    if "deepquote" in out:
        dq_bench.print_report(out["deepquote"])
    if "verify" in out:
        verify_bench.print_report(out["verify"])


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
