"""TPM frame and mssim codecs: captured data-channel bytes, hand-written layouts, errors."""

from __future__ import annotations

import pytest

from tests.vectors_trace import select
from vtpm.errors import LocalProtocolError, RemoteProtocolError
from vtpm.wire import mssim as m
from vtpm.wire._common import CLOSED, NEED_DATA
from vtpm.wire.tpmframe import (
    FrameClientConnection,
    FrameServerConnection,
    TpmCommand,
    TpmResponse,
)

STARTUP = bytes.fromhex("8001 0000000c 00000144 0000".replace(" ", ""))
STARTUP12 = bytes.fromhex("00c1 0000000c 00000099 0001".replace(" ", ""))


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


# mssim --------------------------------------------------------------------------------------


def mssim_events(chunks: list[bytes]) -> list[object]:
    conn = m.MssimServerConnection()
    out: list[object] = []
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while (ev := conn.next_event()) is not NEED_DATA:
            out.append(ev)
            if ev is CLOSED or isinstance(ev, m.SessionEnd | m.Stop):
                if ev is CLOSED:
                    return out
                continue
            reply: m.TpmPortResponse
            if isinstance(ev, m.SendCommand):
                reply = m.CommandResponse(b"\x80\x01\x00\x00\x00\x0a\x00\x00\x00\x00")
            elif isinstance(ev, m.RemoteHandshake):
                reply = m.HandshakeResponse(1, 9)
            else:
                reply = m.Ack()
            conn.send(reply)
    return out


SEND_STARTUP = bytes.fromhex("00000008000000000c") + STARTUP


def test_send_command_both_ways() -> None:
    conn = m.MssimServerConnection()
    conn.receive_data(SEND_STARTUP)
    assert conn.next_event() == m.SendCommand(0, STARTUP)
    resp = bytes.fromhex("80010000000a00000000")
    assert conn.send(m.CommandResponse(resp)) == bytes.fromhex("0000000a") + resp + bytes(4)
    client = m.MssimClientConnection()
    assert client.send(m.SendCommand(0, STARTUP)) == SEND_STARTUP
    client.receive_data(bytes.fromhex("0000000a") + resp + bytes(4))
    assert client.next_event() == m.CommandResponse(resp)


def test_other_command_port_layouts() -> None:
    raw = bytes.fromhex(
        "0000000f"
        "00000001"  # handshake, client version 1
        "00000005"  # hash start
        "00000006"
        "00000002"
        "abcd"  # hash data
        "00000007"  # hash end
        "00000014"  # session end
    )
    events = mssim_events([raw])
    assert events == [
        m.RemoteHandshake(1),
        m.HashStart(),
        m.HashData(b"\xab\xcd"),
        m.HashEnd(),
        m.SessionEnd(),
        CLOSED,
    ]
    assert mssim_events([raw[i : i + 1] for i in range(len(raw))]) == events
    conn = m.MssimServerConnection()
    conn.receive_data(raw[:8])
    conn.next_event()
    assert conn.send(m.HandshakeResponse(1, 9)) == bytes.fromhex("000000010000000900000000")


def test_platform_port_as_tcti_mssim_uses_it() -> None:
    conn = m.PlatformServerConnection()
    conn.receive_data(bytes.fromhex("000000010000000b00000019"))
    assert conn.next_event() == m.PlatformSignal(m.PlatformCode.POWER_ON)
    assert conn.send(m.PlatformAck()) == bytes(4)
    assert conn.next_event() == m.PlatformSignal(m.PlatformCode.NV_ON)
    assert conn.send(m.PlatformAck()) == bytes(4)
    assert conn.next_event() == m.GetCommandResponseSizes()
    assert conn.send(m.SizesResponse(4096, 4096)) == bytes.fromhex("000010000000100000000000")
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (bytes.fromhex("00000063"), "unknown simulator command 99"),
        (bytes.fromhex("000000080000100000"), "exceeds"),
        (SEND_STARTUP[:12], "closed inside SEND_COMMAND"),
        (bytes.fromhex("0000001400000001"), "after the end of the session"),
    ],
)
def test_mssim_bad_input(raw: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        mssim_events([raw])


def test_platform_unknown_code() -> None:
    conn = m.PlatformServerConnection()
    conn.receive_data(bytes.fromhex("00000063"))
    with pytest.raises(RemoteProtocolError, match="unknown platform command 99"):
        conn.next_event()
