"""Verifier benchmark: deep quotes verified per second on one core.

Builds real evidence once (a swtpm plays the hardware TPM; tpm2-pytss makes an ECC P-256 and an
RSA-2048 attestation key, a provisioning bundle and one hardware quote over the Merkle root of a
batch of DeepQuoteInfo records), then verifies it N times in a loop, pinned to one CPU:

    deep_ecc        verify_deep_quote, parsed documents, ECDSA P-256 AK, with an expected-values
                    policy (uuid, label, vTPM PCRs), as a verifier holding the bundle does
    deep_ecc_json   the same from the JSON documents (json.loads + from_json + verify)
    deep_rsa        verify_deep_quote with an RSA-2048 RSASSA AK
    plain_ecc       verify_quote alone (one TPM2_Quote), for comparison
    bundle_ecc      verify_bundle (AK checks and its configuration quote)

Run alone: `.venv/bin/python bench/verify.py [--verify-iterations N] [--json]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TSS2_LOG", "all+NONE")

from tests.tpm_quotes import (
    Key,
    QuoteTpm,
    make_bundle,
    make_evidence,
    make_group,
    vtpm_info,
)

from bench.common import standalone_main
from vtpm.manager.simulator import Simulator
from vtpm.tpm.public import parse_public
from vtpm.verify.bundle import verify_bundle
from vtpm.verify.deepquote import verify_deep_quote
from vtpm.verify.expected import Expected
from vtpm.verify.quote import verify_quote
from vtpm.wire.evidence import Bundle, Evidence

HOST_PCRS = (0, 1, 2, 3, 4, 5, 6, 7)
BATCH = 8
NONCE = b"verifier nonce 0123456789abcdef"
LABEL = "guest1_u:vm_r:vtpm_t"
VTPM_PCRS = {i: bytes([i]) * 32 for i in range(24)}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--verify-iterations",
        type=int,
        default=2000,
        metavar="N",
        help="verifications per measurement (default 2000)",
    )


@contextlib.contextmanager
def _one_core() -> Iterator[int | None]:
    """Pin this process to one CPU while measuring (restored afterwards)."""
    if not hasattr(os, "sched_getaffinity"):
        yield None
        return
    old = os.sched_getaffinity(0)
    cpu = min(old)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, old)


def _rate(n: int, fn: Callable[[], bool]) -> float:
    if not fn():  # warm-up, and a guard: a benchmark of failing verifications means nothing
        raise RuntimeError(f"the benchmark evidence does not verify ({fn.__name__})")
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return n / (time.perf_counter() - t0)


def _build(
    tpm: QuoteTpm, ak: Key, ek_public: bytes, vtpm_uuid: uuid.UUID
) -> tuple[Bundle, Evidence]:
    group = make_group("bench", ["*:vm_r:vtpm_t"], tpm.pcrs(HOST_PCRS))
    bundle = make_bundle(tpm, ak, ek_public, group, HOST_PCRS)
    infos = [vtpm_info(NONCE, vtpm_uuid, group, LABEL, VTPM_PCRS)]
    infos += [
        vtpm_info(os.urandom(16), uuid.uuid4(), group, LABEL, VTPM_PCRS) for _ in range(BATCH - 1)
    ]
    return bundle, make_evidence(tpm, ak, infos, HOST_PCRS)[0]


def run(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    if shutil.which("swtpm") is None:
        raise RuntimeError("swtpm is not installed")
    n = args.verify_iterations
    if n < 1:
        raise RuntimeError("--verify-iterations must be at least 1")
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="vtpm-bench-verify-"))
    sim = Simulator(work / "hwtpm")
    try:
        progress("making attestation keys and evidence on a swtpm")
        tpm = QuoteTpm(sim.start())
        try:
            ek = tpm.ek()
            ek_public = ek.public
            tpm.flush(ek)
            ecc, rsa = tpm.ecc_ak(), tpm.rsa_ak()
            vtpm_uuid = uuid.uuid4()
            ecc_bundle, ecc_ev = _build(tpm, ecc, ek_public, vtpm_uuid)
            rsa_bundle, rsa_ev = _build(tpm, rsa, ek_public, vtpm_uuid)
            plain = tpm.signed_quote(ecc, HOST_PCRS, NONCE)
        finally:
            tpm.close()
    finally:
        sim.stop()
        shutil.rmtree(work, ignore_errors=True)

    expected = Expected(vtpm_uuid=vtpm_uuid, label=LABEL, vtpm_pcrs={"sha256": VTPM_PCRS})
    bundle_doc = json.dumps(ecc_bundle.to_json())
    evidence_doc = json.dumps(ecc_ev.to_json())
    ecc_public = parse_public(ecc.public)

    def deep_ecc() -> bool:
        return verify_deep_quote(ecc_ev, ecc_bundle, nonce=NONCE, expected=expected).ok

    def deep_ecc_json() -> bool:
        bundle = Bundle.from_json(json.loads(bundle_doc))
        evidence = Evidence.from_json(json.loads(evidence_doc))
        return verify_deep_quote(evidence, bundle, nonce=NONCE, expected=expected).ok

    def deep_rsa() -> bool:
        return verify_deep_quote(rsa_ev, rsa_bundle, nonce=NONCE, expected=expected).ok

    def plain_ecc() -> bool:
        return verify_quote(
            plain.attest, plain.signature, ecc_public, plain.pcrs, nonce=NONCE,
            qualified_name=ecc.qualified_name,
        ).ok  # fmt: skip

    def bundle_ecc() -> bool:
        return verify_bundle(ecc_bundle).ok

    results: dict[str, float] = {}
    with _one_core() as cpu:
        for name, fn in (
            ("deep_ecc", deep_ecc),
            ("deep_ecc_json", deep_ecc_json),
            ("deep_rsa", deep_rsa),
            ("plain_ecc", plain_ecc),
            ("bundle_ecc", bundle_ecc),
        ):
            progress(f"{name}: {n} verifications")
            results[name] = _rate(n, fn)
    return {
        "unit": "verifications per second, one core",
        "iterations": n,
        "cpu": cpu,
        "batch_size": BATCH,
        "host_pcrs": len(HOST_PCRS),
        "vtpm_pcrs": len(VTPM_PCRS),
        "results": results,
        "bench_runtime_s": time.perf_counter() - t0,
    }


LABELS = {
    "deep_ecc": "deep quote, ECC P-256 AK, policy",
    "deep_ecc_json": "deep quote from JSON documents, ECC P-256 AK",
    "deep_rsa": "deep quote, RSA-2048 AK, policy",
    "plain_ecc": "plain TPM2_Quote, ECC P-256 AK",
    "bundle_ecc": "provisioning bundle, ECC P-256 AK",
}


def print_report(rep: dict[str, Any]) -> None:
    where = f"CPU {rep['cpu']}" if rep["cpu"] is not None else "one thread"
    print(f"\nverifier, {rep['iterations']} verifications each, pinned to {where}")
    print(f"{'verification':48} {'per second':>12}")
    for name, rate in rep["results"].items():
        print(f"{LABELS.get(name, name):48} {rate:12.0f}")
    print(f"verify benchmark runtime {rep['bench_runtime_s']:.1f} s")


def main() -> int:
    return standalone_main(__doc__, add_arguments, run, print_report)


if __name__ == "__main__":
    sys.exit(main())
