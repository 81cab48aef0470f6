"""The instance side of the front door, without processes: `fd:N` endpoints (parsing, and the
checks that an inherited descriptor is a listening stream socket), the migration secret in
the transfer-blob key, its descriptor read, PCR bank names and the TPM2_PCR_Allocate frame."""

from __future__ import annotations

import os
import socket
import struct
import uuid
from pathlib import Path
from typing import Any

import pytest

from vtpm.endpoints import Endpoint, Frontend, FrontendKind
from vtpm.engine.engine import StateType
from vtpm.errors import ConfigError, RequestError, StateKeyError, TpmResponseError
from vtpm.instance import pcrbanks
from vtpm.instance.config import InstanceConfig
from vtpm.instance.statekey import StateKey, load_secret_fd
from vtpm.instance.transfer import MAX_SECRET, REFUSED, TransferBlob, TransferKey
from vtpm.listen import Server, SocketPolicy, bind
from vtpm.tpm import provcmds
from vtpm.tpm.constants import TPM_ALG, TPM_CC

KEY = StateKey(bytes(range(32)))
VTPM = uuid.UUID("0b9f2b8e-2c43-4bb4-9f4e-2b1c4e6e9a02")


# fd:N endpoints ------------------------------------------------------------------------------


def test_fd_endpoint_text_round_trips() -> None:
    ep = Endpoint.parse("fd:5")
    assert ep == Endpoint("fd", fd=5) and str(ep) == "fd:5"
    f = Frontend.parse("ctrl=fd:7")
    assert f.kind is FrontendKind.CTRL and f.endpoint.fd == 7 and str(f) == "ctrl=fd:7"


@pytest.mark.parametrize("text", ["fd:", "fd:x", "fd:-1", "fd:1.5", "fd:٣", "fd:99999999999"])
def test_bad_fd_endpoints_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        Endpoint.parse(text)


def test_mssim_cannot_run_on_an_inherited_socket() -> None:
    with pytest.raises(ConfigError, match="TCP only"):
        Frontend.parse("mssim=fd:5")


def test_an_inherited_listening_unix_socket_is_adopted_and_its_path_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "c")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(1)
    ep = Endpoint("fd", fd=os.dup(lsock.fileno()))
    lsock.close()
    got = bind(ep, SocketPolicy())
    assert got.family == socket.AF_UNIX and got.fileno() == ep.fd
    server = Server("t", got, lambda c, p: None, SocketPolicy(), endpoint=ep)
    server.start()
    server.close()
    assert os.path.exists(path), "closing the server unlinked a path it does not own"


@pytest.mark.parametrize("what", ["unlistened", "udp", "pipe", "closed"])
def test_an_inherited_descriptor_that_is_not_a_listening_stream_socket_is_refused(
    what: str,
) -> None:
    keep: list[object] = []
    if what == "unlistened":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        keep.append(s)
        fd = s.fileno()
    elif what == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        keep.append(s)
        fd = s.fileno()
    elif what == "pipe":
        r, w = os.pipe()
        keep += [r, w]
        fd = r
    else:
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        fd = r
    try:
        with pytest.raises(ConfigError, match=f"fd:{fd}: descriptor {fd} is not a"):
            bind(Endpoint("fd", fd=fd), SocketPolicy())
        if what != "closed":
            os.fstat(fd)  # a refused descriptor is left open (it is not ours to close)
    finally:
        for k in keep:
            if isinstance(k, socket.socket):
                k.close()
            else:
                assert isinstance(k, int)
                os.close(k)


# the migration secret -------------------------------------------------------------------------


def test_a_blob_sealed_with_a_secret_opens_only_with_that_secret() -> None:
    blob = TransferBlob(VTPM, StateType.PERMANENT, 3, b"state" * 100)
    x = TransferKey(KEY, b"secret X")
    raw = x.seal(blob)
    assert TransferKey(KEY, b"secret X").open(raw, VTPM, StateType.PERMANENT) == blob
    for other in (TransferKey(KEY, b"secret Y"), TransferKey(KEY), TransferKey(KEY, bytes(32))):
        with pytest.raises(RequestError) as e:
            other.open(raw, VTPM, StateType.PERMANENT)
        assert str(e.value) == REFUSED
    plain = TransferKey(KEY).seal(blob)
    for key in (TransferKey(KEY, bytes(32)), TransferKey(KEY, b"\0")):
        with pytest.raises(RequestError):  # no secret is the same as "none"
            key.open(plain, VTPM, StateType.PERMANENT)


@pytest.mark.parametrize("size", [0, MAX_SECRET + 1])
def test_a_secret_of_the_wrong_size_is_refused(size: int) -> None:
    with pytest.raises(RequestError):
        TransferKey(KEY, b"s" * size)


def _pipe_with(data: bytes) -> int:
    r, w = os.pipe()
    os.write(w, data)
    os.close(w)
    return r


def test_the_secret_is_read_to_end_of_file_and_its_descriptor_closed() -> None:
    secret = os.urandom(MAX_SECRET)
    fd = _pipe_with(secret)
    assert load_secret_fd(fd, MAX_SECRET, "migration secret") == secret
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("data", [b"", b"x" * (MAX_SECRET + 1)])
def test_an_empty_or_oversized_secret_is_refused_without_its_bytes(data: bytes) -> None:
    fd = _pipe_with(data)
    with pytest.raises(StateKeyError) as e:
        load_secret_fd(fd, MAX_SECRET, "migration secret")
    assert "x" * 10 not in str(e.value) and f"descriptor {fd}" in str(e.value)


# PCR banks ------------------------------------------------------------------------------------


def test_bank_names() -> None:
    assert pcrbanks.parse("sha256") == (TPM_ALG.SHA256,)
    assert pcrbanks.parse("sha1, SHA256") == (TPM_ALG.SHA1, TPM_ALG.SHA256)
    assert pcrbanks.parse("") == ()
    for bad in ("sha3", "sha256,sha256", "sha256,", "md5"):
        with pytest.raises(ConfigError, match="--pcr-banks"):
            pcrbanks.parse(bad)


def test_pcr_allocate_frame_and_answer() -> None:
    frame = provcmds.pcr_allocate({TPM_ALG.SHA1: False, TPM_ALG.SHA256: True})
    tag, size, code, handle = struct.unpack_from(">HIII", frame)
    assert (tag, size, code, handle) == (0x8002, len(frame), TPM_CC.PCR_Allocate, 0x4000000C)
    auth_size = struct.unpack_from(">I", frame, 14)[0]
    assert frame[18 : 18 + auth_size] == struct.pack(">IHBH", 0x40000009, 0, 1, 0)
    assert frame[18 + auth_size :] == struct.pack(">I", 2) + bytes.fromhex(
        "000403000000000b03ffffff"
    )
    params = struct.pack(">BIII", 1, 24, 1000, 2000)
    answer = struct.pack(">HII", 0x8002, 10 + 4 + len(params) + 5, 0) + struct.pack(
        ">I", len(params)
    )
    answer += params + bytes.fromhex("0000010000")
    assert provcmds.parse_pcr_allocate(answer) == provcmds.PcrAllocation(True, 24, 1000, 2000)
    with pytest.raises(TpmResponseError, match="0x9a2"):
        provcmds.parse_pcr_allocate(struct.pack(">HII", 0x8001, 10, 0x9A2))
    with pytest.raises(TpmResponseError, match="truncated"):
        provcmds.parse_pcr_allocate(answer[:20])


@pytest.mark.parametrize(
    "kw",
    [
        {"key_fd": 5, "ctrl": (Endpoint("fd", fd=5),)},
        {"key_fd": 4, "ctrl": (Endpoint("fd", fd=5),), "server": (Endpoint("fd", fd=5),)},
        {"key_fd": 4, "server": (Endpoint("fd", fd=6),), "migration_secret_fd": 6},
    ],
)
def test_a_descriptor_named_twice_is_refused(kw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="is named twice"):
        InstanceConfig(state_dir=Path("/nonexistent"), **kw)


def test_distinct_descriptors_are_accepted() -> None:
    cfg = InstanceConfig(
        state_dir=Path("/nonexistent"),
        key_fd=3,
        ctrl=(Endpoint("fd", fd=4),),
        server=(Endpoint("fd", fd=5),),
        migration_secret_fd=6,
        terminate=True,
    )
    assert cfg.terminate and [e.fd for e in cfg.ctrl + cfg.server] == [4, 5]
