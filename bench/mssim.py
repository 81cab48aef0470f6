"""TCTI mssim against TCTI swtpm on the same vTPM: tpm2-tss' own clients, in process.

One vtpm instance serves both the raw TPM port (tpm2-tss TCTI `swtpm`) and the Microsoft
simulator ports (TCTI `mssim`); a real swtpm serves TCTI `swtpm` for reference. One ESAPI
context per client (tpm2-pytss, loaded with `TCTILdr`) sends TPM2_GetRandom(32) in slices of
`--seconds`/5, the clients taking turns and the one going first rotating; each client's
figure is the median of its per-command times, and the ratio printed is the median of the
mssim/swtpm ratios of back-to-back slices (pairing cancels the machine's drift, as in the
transport benchmark). What it guards: tcti-mssim writes each command in several small
writes with Nagle on, and an instance that delays its ACK stalls every command by Linux's
delayed-ACK timer (~44 ms per command before `listen.quickack_reader`).

TCTI swtpm opens a new connection per command; TCTI mssim keeps one, so mssim may well be
the faster of the two once nothing stalls it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

from tpm2_pytss import ESAPI, TCTILdr

from bench.common import free_pair

SLICES_PER_ROUND = 5
CLIENTS = (
    ("vtpm_mssim", "vtpm, TCTI mssim"),
    ("vtpm_swtpm", "vtpm, TCTI swtpm"),
    ("swtpm_swtpm", "swtpm, TCTI swtpm (reference)"),
)


class Started(Protocol):
    """What bench/run.py's starters return (its `Target`)."""

    @property
    def port(self) -> int: ...


StartSwtpm = Callable[[Path], Started]
StartVtpm = Callable[[Path, Sequence[str]], Started]


def _slice(get_random: Callable[[int], object], seconds: float) -> float:
    """Median seconds per GetRandom(32) over at least `seconds` and 3 commands."""
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        get_random(32)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(
    args: argparse.Namespace,
    progress: Callable[[str], None],
    start_swtpm: StartSwtpm,
    start_vtpm: StartVtpm,
    stop: Callable[[Any], None],
) -> dict[str, Any]:
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    work = Path(tempfile.mkdtemp(prefix="vtpm-bench-mssim-"))
    mssim_port = free_pair()
    targets: list[Any] = []
    contexts: dict[str, Any] = {}
    try:
        sw = start_swtpm(work)
        targets.append(sw)
        vt = start_vtpm(work, ["--mssim", f"tcp:127.0.0.1:{mssim_port}"])
        targets.append(vt)
        confs = {
            "vtpm_mssim": ("mssim", mssim_port),
            "vtpm_swtpm": ("swtpm", vt.port),
            "swtpm_swtpm": ("swtpm", sw.port),
        }
        for name, (tcti, port) in confs.items():
            ctx = ESAPI(TCTILdr(tcti, f"host=127.0.0.1,port={port}"))
            contexts[name] = ctx
            for _ in range(20):  # warm-up
                ctx.get_random(32)
        progress(f"TCTI mssim vs TCTI swtpm, {args.rounds} rounds ...")
        samples: dict[str, list[float]] = {name: [] for name in contexts}
        ratios: list[float] = []
        ref_ratios: list[float] = []
        names = list(contexts)
        for i in range(args.rounds * SLICES_PER_ROUND):
            k = i % len(names)
            pair: dict[str, float] = {}
            for name in names[k:] + names[:k]:
                pair[name] = _slice(contexts[name].get_random, args.seconds / SLICES_PER_ROUND)
                samples[name].append(pair[name])
            ratios.append(pair["vtpm_mssim"] / pair["vtpm_swtpm"])
            ref_ratios.append(pair["vtpm_swtpm"] / pair["swtpm_swtpm"])
    finally:
        for ctx in contexts.values():
            ctx.close()
        for t in targets:
            stop(t)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "per_command_ms": {n: statistics.median(s) * 1000 for n, s in samples.items()},
        "mssim_over_swtpm_tcti": statistics.median(ratios),
        "vtpm_over_swtpm_tcti_swtpm": statistics.median(ref_ratios),
        "slices": len(ratios),
    }


def print_report(rep: dict[str, Any]) -> None:
    print("\nTPM2_GetRandom(32) through tpm2-tss (tpm2-pytss ESAPI, in process), per command")
    print(f"{'client':40} {'ms':>10}")
    for name, label in CLIENTS:
        print(f"{label:40} {rep['per_command_ms'][name]:10.3f}")
    print(
        f"vtpm: TCTI mssim / TCTI swtpm per command: {rep['mssim_over_swtpm_tcti']:.2f}x "
        f"(target <= 1.5x); TCTI swtpm, vtpm / swtpm: {rep['vtpm_over_swtpm_tcti_swtpm']:.2f}x "
        f"(medians of {rep['slices']} slice pairs)"
    )


if __name__ == "__main__":
    sys.exit("run it through bench/run.py --only mssim")
