"""TPM frame codec: captured data-channel bytes both ways, every split, errors."""

from __future__ import annotations

import pytest

from tests.vectors_trace import select, splits
from vtpm.errors import LocalProtocolError, RemoteProtocolError
from vtpm.wire._common import CLOSED, NEED_DATA
from vtpm.wire.tpmframe import (
    FrameClientConnection,
    FrameServerConnection,
    TpmCommand,
    TpmResponse,
)

STARTUP = bytes.fromhex("8001 0000000c 00000144 0000".replace(" ", ""))
STARTUP12 = bytes.fromhex("00c1 0000000c 00000099 0001".replace(" ", ""))
OK = bytes.fromhex("80010000000a00000000")


def server_events(chunks: list[bytes], max_size: int = 4096) -> list[object]:
    conn = FrameServerConnection(max_size=max_size)
    out: list[object] = []
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while (ev := conn.next_event()) is not NEED_DATA:
            out.append(ev)
            if ev is CLOSED:
                return out
            conn.send(TpmResponse(bytes.fromhex("80010000000a00000000")))
    return out


# (command code, exact bytes, frame): QEMU/SeaBIOS commands and swtpm's answers as captured
CAPTURED = list(zip(select("data", "cmd"), select("data", "rsp"), strict=True))
COMMANDS: list[tuple[int, bytes, TpmCommand]] = [
    (0x181, CAPTURED[0][0], TpmCommand(bytes.fromhex("80010000000a00000181"))),  # ReadClock probe
    (0x144, CAPTURED[1][0], TpmCommand(bytes.fromhex("80010000000c000001440000"))),  # Startup
    (0x143, CAPTURED[2][0], TpmCommand(bytes.fromhex("80010000000b0000014301"))),  # SelfTest
    (0x17A, CAPTURED[3][0], TpmCommand(CAPTURED[3][0])),  # GetCapability
    (0x182, CAPTURED[4][0], TpmCommand(CAPTURED[4][0])),  # PCR_Extend, with sessions
    (0x99, STARTUP12, TpmCommand(STARTUP12)),  # TPM 1.2 TPM_Startup, written by hand
]
RESPONSES: list[tuple[int, bytes, TpmResponse]] = [
    (0x101, CAPTURED[0][1], TpmResponse(bytes.fromhex("80010000000a00000101"))),  # FAILURE
    (0x000, CAPTURED[1][1], TpmResponse(bytes.fromhex("80010000000a00000000"))),
    (0x000, CAPTURED[3][1], TpmResponse(CAPTURED[3][1])),
    (0x000, CAPTURED[4][1], TpmResponse(CAPTURED[4][1])),
]


@pytest.mark.parametrize(("code", "raw", "event"), COMMANDS)
def test_command_table_both_ways(code: int, raw: bytes, event: TpmCommand) -> None:
    assert event.code == code and event.data == raw
    assert FrameClientConnection().send(event) == raw
    for chunks in [[raw], *splits(raw)]:
        assert server_events(chunks) == [event, CLOSED]
    conn = FrameServerConnection()
    assert conn.whole_command(raw) == raw  # the fast path takes the same bytes
    assert conn.respond(OK) == OK


@pytest.mark.parametrize(("code", "raw", "event"), RESPONSES)
def test_response_table_both_ways(code: int, raw: bytes, event: TpmResponse) -> None:
    assert event.code == code and event.data == raw
    server = FrameServerConnection()
    server.receive_data(STARTUP)
    server.next_event()
    assert server.send(event) == raw
    for chunks in [[raw], *splits(raw)]:
        client = FrameClientConnection()
        client.send(TpmCommand(STARTUP))
        for chunk in chunks:
            assert client.next_event() is NEED_DATA
            client.receive_data(chunk)
        assert client.next_event() == event
        client.receive_data(b"")
        assert client.next_event() is CLOSED


def test_captured_data_channel_commands_decode() -> None:
    cmds = select("data", "cmd")
    events = server_events(cmds)
    codes = [e.code for e in events if isinstance(e, TpmCommand)]
    assert len(codes) == len(cmds)
    assert codes[0] == 0x181  # QEMU's TPM2_ReadClock probe
    assert 0x144 in codes  # the firmware's TPM2_Startup
    assert codes.count(0x182) >= 3  # PCR_Extend
    assert [e.data for e in events if isinstance(e, TpmCommand)] == cmds


def test_captured_responses_decode_on_the_client() -> None:
    client = FrameClientConnection()
    for cmd, rsp in zip(select("data", "cmd"), select("data", "rsp"), strict=True):
        client.send(TpmCommand(cmd))
        for i in range(len(rsp)):
            client.receive_data(rsp[i : i + 1])
        assert client.next_event() == TpmResponse(rsp)


def test_split_invariance_on_the_captured_stream() -> None:
    blob = b"".join(select("data", "cmd"))
    whole = server_events([blob])
    assert server_events([blob[i : i + 1] for i in range(len(blob))]) == whole
    assert server_events([blob[i : i + 7] for i in range(0, len(blob), 7)]) == whole


def test_tpm12_frame() -> None:
    (ev, closed) = server_events([STARTUP12])
    assert isinstance(ev, TpmCommand) and ev.tag == 0x00C1 and ev.code == 0x99
    assert closed is CLOSED


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (bytes.fromhex("1234 0000000a 00000000".replace(" ", "")), "tag 0x1234"),
        (bytes.fromhex("8001 00000009 00000000".replace(" ", "")), "smaller than the header"),
        (bytes.fromhex("8001 000f4240 00000000".replace(" ", "")), "exceeds the limit"),
        (STARTUP[:11], "middle of a frame"),
        (STARTUP[:4], "middle of a frame header"),
    ],
)
def test_bad_frames(raw: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        server_events([raw])


def test_frame_events_validate() -> None:
    with pytest.raises(LocalProtocolError):
        TpmResponse(b"\x80\x01\x00")
    with pytest.raises(LocalProtocolError):
        TpmResponse(bytes.fromhex("80010000000b00000000"))  # size field says 11


def test_whole_command_fast_path() -> None:
    ok = bytes.fromhex("80010000000a00000000")
    conn = FrameServerConnection(max_size=4096)
    assert conn.whole_command(STARTUP) == STARTUP
    assert conn.whole_command(STARTUP) is None  # one command in flight
    assert conn.respond(ok) == ok
    with pytest.raises(LocalProtocolError):
        conn.respond(ok)  # nothing in flight
    # anything but exactly one valid frame goes the ordinary way, with the ordinary errors
    for data in (STARTUP[:5], STARTUP[:11], STARTUP + STARTUP, b"\x12\x34" + STARTUP[2:]):
        assert FrameServerConnection().whole_command(data) is None
    assert FrameServerConnection(max_size=11).whole_command(STARTUP) is None
    conn = FrameServerConnection()
    conn.receive_data(STARTUP[:4])
    assert conn.whole_command(STARTUP) is None  # bytes are buffered: order must hold
    bad = FrameServerConnection()
    assert bad.whole_command(b"\x12\x34" + STARTUP[2:]) is None
    bad.receive_data(b"\x12\x34" + STARTUP[2:])
    with pytest.raises(RemoteProtocolError, match="tag"):
        bad.next_event()
