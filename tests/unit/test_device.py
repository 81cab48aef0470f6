"""The Device against the real engine: its interposer is called at the documented points, with
the power lock held; deep quotes go to the function it was built with; power_off(orderly=...)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests.helpers import MemoryStore
from vtpm.engine.engine import TpmVersion
from vtpm.errors import DeviceError
from vtpm.instance import vendor
from vtpm.instance.device import Device
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_RC, TPM_SU


class Recorder:
    """An interposer that records its calls, and whether a power change could run meanwhile."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.calls: list[tuple[str, bytes, int | None]] = []
        self.power_change_waited: list[bool] = []
        self.threads: list[threading.Thread] = []

    def execute(self, command: bytes, locality: int | None) -> bytes:
        self.calls.append(("execute", command, locality))
        done = threading.Event()
        t = threading.Thread(target=self._power_operation, args=(done,))
        t.start()
        self.threads.append(t)
        self.power_change_waited.append(not done.wait(0.1))  # the lock held it back
        return self.device.process(command, locality)

    def _power_operation(self, done: threading.Event) -> None:
        self.device.buffer_size(0)  # takes the power lock, as power changes do
        done.set()

    def join(self) -> None:
        for t in self.threads:
            t.join()

    def end(self) -> None:
        self.calls.append(("end", b"", None))
        # the engine is not yet released: the interposer can still reach the TPM
        rc = frames.response_code(self.device.process(frames.shutdown(TPM_SU.CLEAR)))
        self.calls.append(("end-shutdown", rc.to_bytes(4, "big"), None))


def rc(response: bytes) -> int:
    return frames.response_code(response)


@pytest.fixture
def device() -> Iterator[Device]:
    dev = Device(TpmVersion.TPM20, MemoryStore(), deep_quote=lambda *a: b"evidence")
    try:
        dev.power_on()
        yield dev
    finally:
        dev.close()


def test_the_device_calls_its_interposer_with_the_power_lock_held(device: Device) -> None:
    rec = Recorder(device)
    device.interpose(rec)
    assert rc(device.execute(frames.startup(), 3)) == TPM_RC.SUCCESS
    rec.join()
    assert rec.calls == [("execute", frames.startup(), 3)]
    assert rec.power_change_waited == [True]
    with pytest.raises(DeviceError):
        device.interpose(Recorder(device))  # one interposer per device


def test_a_deep_quote_is_not_interposed_but_its_pcr_reads_are(device: Device) -> None:
    assert rc(device.execute(frames.startup())) == TPM_RC.SUCCESS
    rec = Recorder(device)
    device.interpose(rec)
    answer = device.execute(vendor.command(b"\x01", [], [4]))
    rec.join()
    assert vendor.parse_response(answer) == b"evidence"  # the quote the device was built with
    assert [c[1][6:10] for c in rec.calls] == [b"\x00\x00\x01\x7e"]  # only its TPM2_PCR_Read


def test_close_ends_the_interposer_before_the_engine_goes() -> None:
    dev = Device(TpmVersion.TPM20, MemoryStore())
    dev.power_on()
    assert rc(dev.execute(frames.startup())) == TPM_RC.SUCCESS
    rec = Recorder(dev)
    dev.interpose(rec)
    dev.close()
    assert rec.calls == [("end", b"", None), ("end-shutdown", b"\x00\x00\x00\x00", None)]


def test_without_a_manager_the_deep_quote_is_an_unknown_command() -> None:
    dev = Device(TpmVersion.TPM20, MemoryStore())
    try:
        dev.power_on()
        assert rc(dev.execute(vendor.command(b"\x01", [], []))) == TPM_RC.COMMAND_CODE
    finally:
        dev.close()


@pytest.mark.parametrize("orderly", [True, False])
def test_power_off_orderly_or_not(device: Device, orderly: bool) -> None:
    assert rc(device.execute(frames.startup())) == TPM_RC.SUCCESS
    device.power_off(orderly=orderly)
    assert not device.running
    device.power_on()
    resumed = rc(device.execute(frames.startup(TPM_SU.STATE)))
    # only the orderly stop's Shutdown(STATE) lets the next start resume
    assert (resumed == TPM_RC.SUCCESS) is orderly
