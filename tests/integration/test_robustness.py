"""Misbehaving clients are dropped while others keep working; TPM 1.2 over raw frames."""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import instance, raw_call
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_ALG

pytestmark = pytest.mark.integration


def dropped(sock: socket.socket) -> bool:
    sock.settimeout(10)
    try:
        while True:
            if not sock.recv(4096):
                return True
    except ConnectionResetError:
        return True


def test_bad_clients_are_dropped_and_good_ones_keep_working(tmp_path: Path) -> None:
    with instance(tmp_path / "state", tmp_path / "key", extra=["--startup-clear"]) as inst:
        assert inst.port is not None
        good = socket.create_connection(("127.0.0.1", inst.port))
        assert frames.response_code(raw_call(good, frames.get_random(8))) == 0
        bad_inputs = [
            (inst.port, b"\xde\xad\xbe\xef" * 8),  # garbage frame tag
            (inst.port, bytes.fromhex("8001000f424000000144")),  # claims 1,000,000 bytes
            (inst.port + 1, bytes.fromhex("000000ff")),  # unknown control command
            (inst.port + 2, bytes.fromhex("00000063")),  # unknown simulator command
        ]
        for port, raw in bad_inputs:
            with socket.create_connection(("127.0.0.1", port)) as bad:
                bad.sendall(raw)
                assert dropped(bad)
            assert frames.response_code(raw_call(good, frames.get_random(8))) == 0
        with socket.create_connection(("127.0.0.1", inst.port)) as half:
            half.sendall(frames.get_random(8)[:6])  # half a command, then gone
        assert frames.response_code(raw_call(good, frames.get_random(8))) == 0
        good.close()
        reasons = (
            "is not a TPM frame tag",
            "exceeds the limit",
            "unknown control command 0xff",
            "unknown simulator command 99",
            "middle of a frame",
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(r in inst.log() for r in reasons):
            time.sleep(0.05)  # the drop of the last client is logged by its own thread
        log = inst.log()
        for reason in reasons:
            assert reason in log, reason
        assert inst.proc.poll() is None


def test_parallel_clients_are_serialized_into_one_tpm(tmp_path: Path) -> None:
    with instance(
        tmp_path / "state", tmp_path / "key", mssim=False, extra=["--startup-clear"]
    ) as inst:
        assert inst.port is not None
        errors: list[str] = []
        digest = hashlib.sha256(b"x").digest()

        def worker() -> None:
            with socket.create_connection(("127.0.0.1", inst.port)) as s:
                for _ in range(200):
                    for cmd in (
                        frames.get_random(16),
                        frames.pcr_extend(16, {TPM_ALG.SHA256: digest}),
                    ):
                        rc = frames.response_code(raw_call(s, cmd))
                        if rc != 0:
                            errors.append(hex(rc))

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []
        with socket.create_connection(("127.0.0.1", inst.port)) as s:
            (value,) = frames.parse_pcr_read(raw_call(s, frames.pcr_read(TPM_ALG.SHA256, [16])))
        expect = bytes(32)
        for _ in range(8 * 200):
            expect = hashlib.sha256(expect + digest).digest()
        assert value == expect  # every one of the 1600 extends landed, none twice


def test_tpm12_instance_answers_startup_getrandom_extend(tmp_path: Path) -> None:
    state = tmp_path / "state"
    digest = hashlib.sha1(b"measured").digest()
    with instance(state, tmp_path / "key", tpm="1.2", mssim=False) as inst:
        assert inst.port is not None
        with socket.create_connection(("127.0.0.1", inst.port)) as s:
            assert frames.response_code(raw_call(s, frames.startup12())) == 0
            resp = raw_call(s, frames.get_random12(16))
            assert frames.response_code(resp) == 0
            assert struct.unpack_from(">I", resp, 10)[0] == 16 and len(resp) == 30
            resp = raw_call(s, frames.extend12(10, digest))
            assert frames.response_code(resp) == 0
            assert resp[10:30] == hashlib.sha1(bytes(20) + digest).digest()
    assert inst.proc.returncode == 0
    assert (state / "permall.blob").exists()
    with (
        pytest.raises(RuntimeError, match=r"holds a TPM 1\.2"),
        instance(state, tmp_path / "key", tpm="2.0", mssim=False),
    ):
        pass


def test_second_copy_of_a_running_vtpm_is_refused(tmp_path: Path) -> None:
    with (
        instance(tmp_path / "state", tmp_path / "key", mssim=False),
        pytest.raises(RuntimeError, match="already running"),
        instance(tmp_path / "state", tmp_path / "key", mssim=False),
    ):
        pass
