"""Deep-quote batching: 256 concurrent requests against a hardware TPM whose quote takes
~200 ms, batched (one quote signs a Merkle root) beside unbatched (one quote per request).

The hardware TPM is the swtpm simulator; `SlowQuoteForBench` is a clearly named wrapper that
sleeps before each real TPM2_Quote so that a quote costs what it costs on real hardware. Both
runs use the Manager's own `DeepQuoter` and the simulator's real quotes, in one process.

    python bench/deepquote.py [--dq-requests 256] [--dq-delay 0.2] [--dq-baseline N] [--json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import standalone_main
from vtpm.manager.attestation import AttestationTpm
from vtpm.manager.deepquote import DeepQuoter
from vtpm.manager.hwtpm import HardwareTpm, SealedObject
from vtpm.manager.simulator import Simulator
from vtpm.wire.deepquote import DeepQuoteInfo, root_from_path
from vtpm.wire.evidence import SignedQuote

HOST_PCRS = tuple(range(8))
LABEL = "guest1_u:vm_r:vtpm_t"


class SlowQuoteForBench:
    """A test wrapper: a real simulator quote that takes at least `delay` seconds."""

    def __init__(self, att: AttestationTpm, ak: SealedObject, delay: float) -> None:
        self.att, self.ak, self.delay = att, ak, delay
        self.calls = 0

    def __call__(self, _group: uuid.UUID, qdata: bytes, pcrs: tuple[int, ...]) -> SignedQuote:
        self.calls += 1
        time.sleep(self.delay)
        return self.att.quote(self.ak, qdata, pcrs)


def storm(quoter: DeepQuoter, n: int, group: uuid.UUID) -> tuple[float, list[int]]:
    """n concurrent requests; wall time until the last answer, and the batch sizes seen."""
    sizes: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(n + 1)

    def one(i: int) -> None:
        info = DeepQuoteInfo(i.to_bytes(4, "big"), uuid.uuid4(), group, LABEL)
        start.wait()
        try:
            ev = quoter.request(group, info, HOST_PCRS, timeout=600)
        except BaseException as e:
            with lock:
                errors.append(e)
            return
        if root_from_path(info.leaf(), ev.path) != _extra_data(ev.host.attest):
            with lock:
                errors.append(AssertionError("a Merkle path does not lead to the signed root"))
        with lock:
            sizes.append(ev.batch_size)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return wall, sizes


def _extra_data(attest: bytes) -> bytes:
    # TPMS_ATTEST: magic u32, type u16, qualifiedSigner TPM2B, extraData TPM2B
    n = int.from_bytes(attest[6:8], "big")
    off = 8 + n
    m = int.from_bytes(attest[off : off + 2], "big")
    return attest[off + 2 : off + 2 + m]


def run(requests: int, delay: float, baseline: int, window: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vtpm-bench-dq-") as tmp:
        sim = Simulator(Path(tmp) / "hwtpm")
        hw = HardwareTpm(sim.start())
        try:
            hw.open()
            att = AttestationTpm(hw)
            ak = att.create_ak("ecc")
            slow = SlowQuoteForBench(att, ak, delay)
            group = uuid.uuid4()
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                slow(group, b"\x00" * 32, HOST_PCRS)
                times.append(time.perf_counter() - t0)
            one_quote = statistics.median(times)

            batched = DeepQuoter(slow, window=window)
            calls0 = slow.calls
            wall, sizes = storm(batched, requests, group)
            batched_quotes = slow.calls - calls0
            batched.close()

            unbatched = DeepQuoter(slow, window=0.0, max_batch=1)
            calls0 = slow.calls
            base_wall, _ = storm(unbatched, baseline, group)
            base_quotes = slow.calls - calls0
            unbatched.close()
        finally:
            hw.close()
            sim.stop()
    per_request_unbatched = base_wall / baseline
    return {
        "requests": requests,
        "hardware_quote_s": round(one_quote, 4),
        "batched_wall_s": round(wall, 3),
        "batched_in_quote_times": round(wall / one_quote, 2),
        "batched_hardware_quotes": batched_quotes,
        "largest_batch": max(sizes),
        "window_s": window,
        "unbatched_requests_measured": baseline,
        "unbatched_hardware_quotes": base_quotes,
        "unbatched_wall_s": round(base_wall, 3),
        "unbatched_wall_for_all_s": round(per_request_unbatched * requests, 2),
        "speedup": round(per_request_unbatched * requests / wall, 1),
    }


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--dq-requests", type=int, default=256, help="concurrent deep quotes")
    ap.add_argument("--dq-delay", type=float, default=0.2, help="added to each hardware quote (s)")
    ap.add_argument(
        "--dq-baseline",
        type=int,
        default=32,
        help="requests for the unbatched run, scaled to --dq-requests (256 measures them all)",
    )
    ap.add_argument("--dq-window", type=float, default=0.02, help="batching window (s)")


def run_args(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    progress(
        f"deep quotes: {args.dq_requests} concurrent, batched and unbatched "
        f"({args.dq_baseline} requests, one quote each) ..."
    )
    return run(args.dq_requests, args.dq_delay, args.dq_baseline, args.dq_window)


def print_report(rep: dict[str, Any]) -> None:
    q = rep["hardware_quote_s"]
    print(f"\ndeep quotes, hardware quote slowed to {q * 1000:.0f} ms (SlowQuoteForBench):")
    print(
        f"  batched:   {rep['requests']} concurrent in {rep['batched_wall_s']:.2f} s = "
        f"{rep['batched_in_quote_times']:.2f} hardware-quote times "
        f"({rep['batched_hardware_quotes']} hardware quote(s), largest batch "
        f"{rep['largest_batch']}; target <= 3)"
    )
    print(
        f"  unbatched: {rep['unbatched_requests_measured']} requests in "
        f"{rep['unbatched_wall_s']:.2f} s ({rep['unbatched_hardware_quotes']} hardware quotes)"
        f" -> {rep['unbatched_wall_for_all_s']:.1f} s for {rep['requests']}"
    )
    print(f"  batched/unbatched speed-up: {rep['speedup']:.0f}x")


def main() -> int:
    return standalone_main(
        __doc__,
        add_arguments,
        run_args,
        print_report,
        passed=lambda rep: bool(rep["batched_in_quote_times"] <= 3),
    )


if __name__ == "__main__":
    sys.exit(main())
