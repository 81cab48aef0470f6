"""A standalone vTPM instance on one state file (`--state-file`): tpm2-tools' NV data survives a
restart, a kill -9 during NV writes never leaves a file that does not open (and never loses an
acknowledged write), and a block device (a loop device) works as the file does."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import VTPM, RunningInstance, free_port_pair, raw_call, tpm2, wait_connectable
from tests.nvframes import nv_define_space, nv_read, nv_write, parse_nv_read
from vtpm.tpm import frames

pytestmark = pytest.mark.integration

NV_INDEX = 0x01500020
NV_SIZE = 8
FOUR_MIB = 4 * 1024 * 1024


def start_file_instance(state: Path, key: Path, log: Path) -> RunningInstance:
    if not key.exists():
        subprocess.run([*VTPM, "instance", "keygen", str(key)], check=True, capture_output=True)
    port = free_port_pair()
    args = ["instance", "run", "--state-file", str(state), "--key-file", str(key)]
    args += ["--server", f"tcp:127.0.0.1:{port}", "--ctrl", f"tcp:127.0.0.1:{port + 1}"]
    args += ["--log-file", str(log), "--log-level", "debug"]
    proc = subprocess.Popen([*VTPM, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    inst = RunningInstance(proc, state, key, port, None, log, args)
    try:
        wait_connectable(("127.0.0.1", port), proc)
    except BaseException:
        with contextlib.suppress(Exception):
            inst.stop(signal.SIGKILL)
        raise
    return inst


@contextlib.contextmanager
def file_instance(state: Path, key: Path, log: Path) -> Iterator[RunningInstance]:
    inst = start_file_instance(state, key, log)
    try:
        yield inst
    finally:
        with contextlib.suppress(Exception):
            inst.stop()


def preallocated(path: Path, size: int = FOUR_MIB) -> Path:
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    return path


def nv_round_trip(state: Path, tmp: Path) -> None:
    key, log = tmp / "key", tmp / "inst.log"
    (tmp / "value").write_bytes(b"vtpm-nv!")
    with file_instance(state, key, log) as inst:
        tcti = inst.tcti_swtpm
        tpm2("startup", "-c", tcti=tcti)
        tpm2("nvdefine", hex(NV_INDEX), "-s", str(NV_SIZE), "-a", "ownerread|ownerwrite", tcti=tcti)
        tpm2("nvwrite", hex(NV_INDEX), "-C", "o", "-i", str(tmp / "value"), tcti=tcti)
        assert inst.stop() == 0
    with file_instance(state, key, log) as inst:
        tpm2("startup", "-c", tcti=inst.tcti_swtpm)
        out = tpm2("nvread", hex(NV_INDEX), "-C", "o", "-s", str(NV_SIZE), tcti=inst.tcti_swtpm)
        assert out.stdout == b"vtpm-nv!"
        assert inst.stop() == 0


def test_nv_data_survives_a_restart_in_a_preallocated_4_mib_file(tmp_path: Path) -> None:
    state = preallocated(tmp_path / "vm-100-disk-1.raw")
    nv_round_trip(state, tmp_path)
    assert state.stat().st_size == FOUR_MIB
    assert b"vtpm-nv!" not in state.read_bytes()


def _connect(inst: RunningInstance) -> socket.socket:
    assert inst.port is not None
    sock = socket.create_connection(("127.0.0.1", inst.port), timeout=30)
    return sock


def test_kill_9_during_nv_writes_never_leaves_an_unopenable_file(tmp_path: Path) -> None:
    state = preallocated(tmp_path / "tpm.raw")
    key, log = tmp_path / "key", tmp_path / "inst.log"
    rnd = random.Random(20261201)
    inst = start_file_instance(state, key, log)
    with _connect(inst) as sock:
        assert frames.response_code(raw_call(sock, frames.startup())) == 0
        assert frames.response_code(raw_call(sock, nv_define_space(NV_INDEX, NV_SIZE))) == 0
        assert frames.response_code(raw_call(sock, nv_write(NV_INDEX, bytes(8)))) == 0
    acked = 0
    try:
        for _trial in range(6):
            sock = _connect(inst)
            stop = threading.Event()
            written = [acked]

            def writer(
                sock: socket.socket = sock,
                written: list[int] = written,
                stop: threading.Event = stop,
            ) -> None:
                value = written[0]
                with contextlib.suppress(OSError, ConnectionError):
                    while not stop.is_set():
                        value += 1
                        rc = frames.response_code(
                            raw_call(sock, nv_write(NV_INDEX, value.to_bytes(8, "big")))
                        )
                        if rc == 0:
                            written[0] = value

            t = threading.Thread(target=writer, daemon=True)
            t.start()
            time.sleep(rnd.uniform(0.02, 0.3))
            inst.proc.send_signal(signal.SIGKILL)
            inst.proc.wait(10)
            stop.set()
            t.join(10)
            sock.close()
            with contextlib.suppress(Exception):
                inst.stop()
            inst = start_file_instance(state, key, log)  # raises if the file does not open
            with _connect(inst) as rsock:
                raw_call(rsock, frames.startup())  # after a kill: TPM_RC_SUCCESS or initialize
                got = int.from_bytes(parse_nv_read(raw_call(rsock, nv_read(NV_INDEX, NV_SIZE))))
            # the last acknowledged write or the one in flight, never older
            assert written[0] <= got <= written[0] + 1, (written[0], got)
            acked = got
        assert acked > 0
    finally:
        with contextlib.suppress(Exception):
            inst.stop()


def test_a_block_device_holds_the_state(tmp_path: Path) -> None:
    losetup = shutil.which("losetup")
    if losetup is None:
        pytest.skip("no losetup on this machine: no loop device to try a block device on")
    backing = preallocated(tmp_path / "backing.raw")
    made = subprocess.run(
        [losetup, "--find", "--show", str(backing)], capture_output=True, text=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device here: {made.stderr.strip()}")
    dev = Path(made.stdout.strip())
    try:
        nv_round_trip(dev, tmp_path)
        with open(backing, "rb") as f:
            assert f.read(8) == b"VTPMSTAT"
    finally:
        subprocess.run([losetup, "--detach", str(dev)], check=False)
