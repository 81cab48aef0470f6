"""TCTI mssim answers without the delayed-ACK stall.

tpm2-tss' tcti-mssim writes a command in several small writes with Nagle on; if the instance
delays its ACK of the first ones, every command waits for Linux's delayed-ACK timer (40 ms at
least: measured 44 ms per TPM2_GetRandom before the fix, ~0.1 ms after). The test takes the
median of 40 GetRandom round trips through tpm2-pytss: with the stall it cannot be below
40 ms, without it it is well under a millisecond, so a 20 ms bound holds on a loaded machine.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator

import pytest

from tests.helpers import RunningInstance, instance

pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is a dev dependency of the project")
from tpm2_pytss import ESAPI, TCTILdr

pytestmark = pytest.mark.integration

os.environ.setdefault("TSS2_LOG", "all+NONE")

STALL_S = 0.040  # Linux's shortest delayed ACK (TCP_ATO_MIN)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningInstance]:
    base = tmp_path_factory.mktemp("mssim-latency")
    with instance(base / "state", base / "state.key", extra=["--startup-clear"]) as inst:
        yield inst


def test_mssim_command_does_not_wait_for_a_delayed_ack(running: RunningInstance) -> None:
    assert running.port is not None
    with TCTILdr("mssim", f"host=127.0.0.1,port={running.port + 2}") as tcti:
        ectx = ESAPI(tcti)
        try:
            ectx.get_random(8)  # connection set up, first command out of the way
            times = []
            for _ in range(40):
                t0 = time.perf_counter()
                assert len(bytes(ectx.get_random(32))) == 32
                times.append(time.perf_counter() - t0)
        finally:
            ectx.close()
    median = statistics.median(times)
    assert median < STALL_S / 2, f"median TCTI mssim GetRandom {median * 1000:.1f} ms"
