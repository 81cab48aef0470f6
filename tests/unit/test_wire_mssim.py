"""mssim codec (command port and platform port, both sides): (code, exact bytes, event)
tables both ways and split every way, the length bound on complete and split frames, errors.

The bytes are written by hand from PROTOCOLS.md / tpm2-tss tcti-mssim's layouts, with TPM
commands and responses taken from the captured QEMU session in vectors/; never from our
encoder."""

from __future__ import annotations

import struct

import pytest

from tests.vectors_trace import select, splits
from vtpm.errors import LocalProtocolError, RemoteProtocolError
from vtpm.wire import mssim as m
from vtpm.wire._common import CLOSED, NEED_DATA, ReceiveBuffer
from vtpm.wire._layout import Layout

STARTUP = bytes.fromhex("8001 0000000c 00000144 0000".replace(" ", ""))
PROBE, PROBE_ANSWER = select("data", "cmd")[0], select("data", "rsp")[0]  # QEMU's ReadClock
OK = bytes.fromhex("80010000000a00000000")


def mssim_events(chunks: list[bytes], conn: m.MssimServerConnection | None = None) -> list[object]:
    """Feed chunks then end of stream to a command-port server, answering each request."""
    conn = conn or m.MssimServerConnection()
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


# command port ---------------------------------------------------------------------------------

# (code, exact bytes, request)
TPM_REQUESTS: list[tuple[int, bytes, m.TpmPortRequest]] = [
    (8, bytes.fromhex("00000008 00 0000000a") + PROBE, m.SendCommand(0, PROBE)),
    (8, bytes.fromhex("00000008 03 0000000c") + STARTUP, m.SendCommand(3, STARTUP)),
    (5, bytes.fromhex("00000005"), m.HashStart()),
    (6, bytes.fromhex("00000006 00000002 abcd"), m.HashData(b"\xab\xcd")),
    (6, bytes.fromhex("00000006 00000000"), m.HashData(b"")),
    (7, bytes.fromhex("00000007"), m.HashEnd()),
    (15, bytes.fromhex("0000000f 00000001"), m.RemoteHandshake(1)),
    (20, bytes.fromhex("00000014"), m.SessionEnd()),
    (21, bytes.fromhex("00000015"), m.Stop()),
]
# (code, the request answered, exact bytes, answer)
TPM_ANSWERS: list[tuple[int, m.TpmPortRequest, bytes, m.TpmPortResponse]] = [
    (
        8,
        m.SendCommand(0, PROBE),
        bytes.fromhex("0000000a") + PROBE_ANSWER + bytes.fromhex("00000000"),
        m.CommandResponse(PROBE_ANSWER),
    ),
    (
        15,
        m.RemoteHandshake(1),
        bytes.fromhex("00000001 00000009 00000000"),
        m.HandshakeResponse(1, 9),
    ),
    (5, m.HashStart(), bytes.fromhex("00000000"), m.Ack()),
    (6, m.HashData(b"x"), bytes.fromhex("00000000"), m.Ack()),
    (7, m.HashEnd(), bytes.fromhex("00000000"), m.Ack()),
]


def server_decodes(
    chunks: list[bytes], conn: m.MssimServerConnection | m.PlatformServerConnection
) -> object:
    """The one event `chunks` give, NEED_DATA before the last chunk."""
    for chunk in chunks[:-1]:
        conn.receive_data(chunk)
        assert conn.next_event() is NEED_DATA
    conn.receive_data(chunks[-1])
    return conn.next_event()


@pytest.mark.parametrize(("code", "raw", "event"), TPM_REQUESTS)
def test_command_port_requests_both_ways(code: int, raw: bytes, event: m.TpmPortRequest) -> None:
    assert struct.unpack_from(">I", raw)[0] == code == m.TpmPortCode(code)
    assert m.MssimClientConnection().send(event) == raw
    for chunks in [[raw], *splits(raw)]:
        assert server_decodes(chunks, m.MssimServerConnection()) == event
    ends = isinstance(event, m.SessionEnd | m.Stop)
    assert mssim_events([raw]) == [event, CLOSED]
    conn = m.MssimServerConnection()
    conn.receive_data(raw)
    conn.next_event()
    assert conn.next_event() is NEED_DATA
    if ends:
        with pytest.raises(LocalProtocolError):
            conn.send(m.Ack())  # nothing answers the end of a session


@pytest.mark.parametrize(("code", "request_", "raw", "answer"), TPM_ANSWERS)
def test_command_port_answers_both_ways(
    code: int, request_: m.TpmPortRequest, raw: bytes, answer: m.TpmPortResponse
) -> None:
    server = m.MssimServerConnection()
    server.receive_data(m.MssimClientConnection().send(request_))
    assert server.next_event() == request_
    assert server.send(answer) == raw
    for chunks in [[raw], *splits(raw)]:
        client = m.MssimClientConnection()
        assert client.send(request_)[:4] == code.to_bytes(4, "big")
        for chunk in chunks:
            assert client.next_event() is NEED_DATA
            client.receive_data(chunk)
        assert client.next_event() == answer
        client.receive_data(b"")
        assert client.next_event() is CLOSED


def test_the_whole_command_port_table_as_one_stream() -> None:
    blob = b"".join(raw for _, raw, ev in TPM_REQUESTS if not isinstance(ev, m.SessionEnd | m.Stop))
    blob += bytes.fromhex("00000014")
    expected: list[object] = [
        ev for _, _, ev in TPM_REQUESTS if not isinstance(ev, m.SessionEnd | m.Stop)
    ]
    expected += [m.SessionEnd(), CLOSED]
    assert mssim_events([blob]) == expected
    for chunks in splits(blob):
        assert mssim_events(chunks) == expected


# the length bound: a complete frame and a split one are refused alike ---------------------------

MAX = 4096


def oversized(code: int, n: int) -> bytes:
    if code == m.TpmPortCode.HASH_DATA:
        return struct.pack(">II", code, n) + bytes(n)
    return struct.pack(">IBI", code, 0, n) + bytes(n)


@pytest.mark.parametrize("code", [m.TpmPortCode.HASH_DATA, m.TpmPortCode.SEND_COMMAND])
@pytest.mark.parametrize("n", [MAX + 1, MAX + 50])
def test_an_oversized_frame_is_refused_whole(code: int, n: int) -> None:
    conn = m.MssimServerConnection(max_command=MAX)
    conn.receive_data(oversized(code, n))  # the whole frame in one read
    with pytest.raises(RemoteProtocolError, match=f"of {n} bytes exceeds {MAX}"):
        conn.next_event()


@pytest.mark.parametrize("code", [m.TpmPortCode.HASH_DATA, m.TpmPortCode.SEND_COMMAND])
def test_an_oversized_frame_is_refused_split(code: int) -> None:
    raw = oversized(code, MAX + 1)
    head = 8 if code == m.TpmPortCode.HASH_DATA else 9
    conn = m.MssimServerConnection(max_command=MAX)
    conn.receive_data(raw[: head - 1])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(raw[head - 1 : head])
    with pytest.raises(RemoteProtocolError, match="exceeds"):
        conn.next_event()  # as soon as the length is in, before the data
    for cut in (head + 1, len(raw) - 1):
        conn = m.MssimServerConnection(max_command=MAX)
        with pytest.raises(RemoteProtocolError, match="exceeds"):
            mssim_events([raw[:cut], raw[cut:]], conn)


@pytest.mark.parametrize("code", [m.TpmPortCode.HASH_DATA, m.TpmPortCode.SEND_COMMAND])
def test_the_bound_is_inclusive(code: int) -> None:
    raw = oversized(code, MAX)
    want = (
        m.HashData(bytes(MAX)) if code == m.TpmPortCode.HASH_DATA else m.SendCommand(0, bytes(MAX))
    )
    assert server_decodes([raw], m.MssimServerConnection(max_command=MAX)) == want


def test_an_oversized_answer_is_refused_by_the_client() -> None:
    client = m.MssimClientConnection(max_response=100)
    client.send(m.SendCommand(0, STARTUP))
    client.receive_data(bytes.fromhex("00000065"))
    with pytest.raises(RemoteProtocolError, match="response of 101 bytes exceeds 100"):
        client.next_event()


def test_an_answer_must_end_with_the_acknowledgement() -> None:
    client = m.MssimClientConnection()
    client.send(m.HashStart())
    client.receive_data(bytes.fromhex("00000001"))
    with pytest.raises(RemoteProtocolError, match="not the 0 acknowledgement"):
        client.next_event()


# platform port ----------------------------------------------------------------------------------

P = m.PlatformCode
PLATFORM_REQUESTS: list[tuple[int, bytes, m.PlatformRequest]] = [
    (1, bytes.fromhex("00000001"), m.PlatformSignal(P.POWER_ON)),  # tcti-mssim at init
    (11, bytes.fromhex("0000000b"), m.PlatformSignal(P.NV_ON)),  # then this
    (2, bytes.fromhex("00000002"), m.PlatformSignal(P.POWER_OFF)),
    (3, bytes.fromhex("00000003"), m.PlatformSignal(P.PHYS_PRES_ON)),
    (4, bytes.fromhex("00000004"), m.PlatformSignal(P.PHYS_PRES_OFF)),
    (9, bytes.fromhex("00000009"), m.PlatformSignal(P.CANCEL_ON)),
    (10, bytes.fromhex("0000000a"), m.PlatformSignal(P.CANCEL_OFF)),
    (12, bytes.fromhex("0000000c"), m.PlatformSignal(P.NV_OFF)),
    (17, bytes.fromhex("00000011"), m.PlatformSignal(P.RESET)),
    (18, bytes.fromhex("00000012"), m.PlatformSignal(P.RESTART)),
    (25, bytes.fromhex("00000019"), m.GetCommandResponseSizes()),
    (20, bytes.fromhex("00000014"), m.PlatformSessionEnd()),
]
PLATFORM_ANSWERS: list[tuple[int, m.PlatformRequest, bytes, m.PlatformResponse]] = [
    (1, m.PlatformSignal(P.POWER_ON), bytes(4), m.PlatformAck()),
    (11, m.PlatformSignal(P.NV_ON), bytes(4), m.PlatformAck()),
    (
        25,
        m.GetCommandResponseSizes(),
        bytes.fromhex("00001000 00001000 00000000"),
        m.SizesResponse(4096, 4096),
    ),
]


@pytest.mark.parametrize(("code", "raw", "event"), PLATFORM_REQUESTS)
def test_platform_requests_both_ways(code: int, raw: bytes, event: m.PlatformRequest) -> None:
    assert struct.unpack_from(">I", raw)[0] == code == m.PlatformCode(code)
    assert m.PlatformClientConnection().send(event) == raw
    for chunks in [[raw], *splits(raw)]:
        assert server_decodes(chunks, m.PlatformServerConnection()) == event


def test_platform_stop_ends_the_session_like_session_end() -> None:
    assert server_decodes([bytes.fromhex("00000015")], m.PlatformServerConnection()) == (
        m.PlatformSessionEnd()
    )


@pytest.mark.parametrize(("code", "request_", "raw", "answer"), PLATFORM_ANSWERS)
def test_platform_answers_both_ways(
    code: int, request_: m.PlatformRequest, raw: bytes, answer: m.PlatformResponse
) -> None:
    server = m.PlatformServerConnection()
    server.receive_data(code.to_bytes(4, "big"))
    assert server.next_event() == request_
    assert server.send(answer) == raw
    for chunks in [[raw], *splits(raw)]:
        client = m.PlatformClientConnection()
        client.send(request_)
        for chunk in chunks:
            assert client.next_event() is NEED_DATA
            client.receive_data(chunk)
        assert client.next_event() == answer


def test_a_failed_platform_command_is_a_remote_error() -> None:
    client = m.PlatformClientConnection()
    client.send(m.PlatformSignal(P.POWER_ON))
    client.receive_data(bytes.fromhex("00000001"))
    with pytest.raises(RemoteProtocolError, match="00000001"):
        client.next_event()


def test_events_check_their_fields() -> None:
    for build in (
        lambda: m.SendCommand(256, b""),
        lambda: m.RemoteHandshake(-1),
        lambda: m.HandshakeResponse(1, 2**32),
        lambda: m.SizesResponse(2**32, 0),
        lambda: m.PlatformSignal(P.STOP),
    ):
        with pytest.raises(LocalProtocolError):
            build()


def test_an_events_own_error_on_peer_bytes_is_a_remote_error() -> None:
    """The one conversion point: a layout whose event refuses the decoded values."""

    def refuse(**_: object) -> object:
        raise LocalProtocolError("no")

    buf = ReceiveBuffer(16)
    buf.feed(bytes(4))
    with pytest.raises(RemoteProtocolError, match="bad refuse: no"):
        Layout(refuse, prefix=bytes(4)).decode(buf, 0)
