"""Fixtures shared by the hardware-TPM tests: a simulated hardware TPM (swtpm, started by the
Manager's Simulator) and a HardwareTpm connected to it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vtpm.manager.hwtpm import HardwareTpm
from vtpm.manager.simulator import Simulator


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[Simulator]:
    s = Simulator(tmp_path / "hwtpm")
    s.start()
    yield s
    s.stop()


@pytest.fixture
def hw(sim: Simulator) -> Iterator[HardwareTpm]:
    with HardwareTpm(sim.tcti, retries=3) as tpm:
        yield tpm
