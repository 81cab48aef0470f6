"""The fork server's spawn protocol, both directions, and what a peer may not send."""

from __future__ import annotations

from pathlib import Path

import pytest

from vtpm.errors import RemoteProtocolError
from vtpm.wire import spawn


def test_a_spawn_request_both_ways() -> None:
    argv = ["--uuid", "0c3e1a7e-7d0f-4b8e-9c51-5a2b1f0d9e11", "--tpm", "2.0"]
    data = spawn.encode_spawn(argv, Path("/var/log/x.log"))
    assert spawn.decode_spawn(data) == (argv, Path("/var/log/x.log"), ())
    with_fds = spawn.encode_spawn(argv, Path("/l"), (9, 7, 12))
    assert spawn.decode_spawn(with_fds) == (argv, Path("/l"), (9, 7, 12))
    assert spawn.decode_pid(spawn.encode_pid(4242)) == 4242
    assert spawn.encode_pid(4242) == bytes.fromhex("00001092")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"argv": "x", "log_file": "/l"}',
        b'{"argv": [1], "log_file": "/l"}',
        b'{"argv": [], "log_file": ""}',
        b'{"argv": []}',
        b'{"argv": [], "log_file": "/l", "inherit": 5}',
        b'{"argv": [], "log_file": "/l", "inherit": [2]}',
        b'{"argv": [], "log_file": "/l", "inherit": [65536]}',
        b'{"argv": [], "log_file": "/l", "inherit": [7, 7]}',
        b'{"argv": [], "log_file": "/l", "inherit": [true]}',
        b'{"argv": [], "log_file": "/l", "inherit": [3, 4, 5, 6, 7, 8, 9, 10, 11]}',
    ],
)
def test_a_bad_spawn_request_is_a_remote_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        spawn.decode_spawn(data)


@pytest.mark.parametrize("data", [b"", b"\x00\x00\x10", b"\x00" * 5])
def test_a_bad_pid_answer_is_a_remote_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        spawn.decode_pid(data)
