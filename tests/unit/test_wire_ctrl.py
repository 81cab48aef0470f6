"""swtpm control channel codec: captured QEMU bytes, hand-written layouts, splits, errors."""

from __future__ import annotations

import pytest

from tests.vectors_trace import select, splits
from vtpm.errors import LocalProtocolError, RemoteProtocolError
from vtpm.wire import ctrl as w
from vtpm.wire._common import CLOSED, NEED_DATA

CAPTURED_EVENTS: list[w.Request] = [
    w.SetDataFd(),
    w.GetCapability(),
    w.Stop(),
    w.SetBufferSize(0),
    w.Stop(),
    w.SetBufferSize(4096),
    w.Init(0),
    w.GetTpmEstablished(),
    w.SetLocality(0),
    w.Shutdown(),
]
# answers built from the captured values, in order
CAPTURED_ANSWERS: list[w.Response] = [
    w.Result(0),
    w.CapabilityResult(0, 0xFFFF),
    w.Result(0),
    w.BufferSizeResult(0, 4096, 2808, 4096),
    w.Result(0),
    w.BufferSizeResult(0, 4096, 2808, 4096),
    w.Result(0),
    w.EstablishedResult(0, False),
    w.Result(0),
    w.Result(0),
]


def drive(chunks: list[bytes], answers: list[w.Response] | None = None) -> list[object]:
    """Feed chunks to a server codec, answering each request; return events then CLOSED."""
    conn = w.ControlServerConnection()
    events: list[object] = []
    pending = list(answers or [])
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while True:
            ev = conn.next_event()
            if ev is NEED_DATA:
                break
            events.append(ev)
            if ev is CLOSED:
                return events
            conn.send(pending.pop(0) if pending else fitting(ev))
    return events


def fitting(ev: object) -> w.Response:
    match ev:
        case w.GetCapability():
            return w.CapabilityResult(0, 1)
        case w.GetTpmEstablished():
            return w.EstablishedResult(0, True)
        case w.GetStateBlob():
            return w.StateBlobResult(0, 0, 3, b"abc")
        case w.GetConfig():
            return w.ConfigResult(0, 1)
        case w.SetBufferSize():
            return w.BufferSizeResult(0, 4096, 2808, 4096)
        case w.GetInfo():
            return w.InfoResult(0, 2, b"{}")
    return w.Result(0)


def test_captured_qemu_requests_decode_to_the_expected_events() -> None:
    commands = select("ctrl", "cmd")
    assert len(commands) == len(CAPTURED_EVENTS)
    events = drive(commands, CAPTURED_ANSWERS)
    assert events == [*CAPTURED_EVENTS, CLOSED]


def test_captured_responses_are_encoded_byte_for_byte() -> None:
    conn = w.ControlServerConnection()
    for cmd, answer, expected in zip(
        select("ctrl", "cmd"), CAPTURED_ANSWERS, select("ctrl", "rsp"), strict=True
    ):
        conn.receive_data(cmd)
        ev = conn.next_event()
        assert ev is not NEED_DATA
        assert conn.send(answer) == expected


def test_client_decodes_captured_responses() -> None:
    client = w.ControlClientConnection()
    for req, rsp, expected in zip(
        CAPTURED_EVENTS, select("ctrl", "rsp"), CAPTURED_ANSWERS, strict=True
    ):
        client.send(req)
        client.receive_data(rsp)
        assert client.next_event() == expected


@pytest.mark.parametrize("how", ["whole", "bytewise", "odd"])
def test_every_split_gives_the_same_events(how: str) -> None:
    blob = b"".join(select("ctrl", "cmd"))
    if how == "whole":
        chunks = [blob]
    elif how == "bytewise":
        chunks = [blob[i : i + 1] for i in range(len(blob))]
    else:
        chunks = [blob[i : i + 3] for i in range(0, len(blob), 3)]
    assert drive(chunks, list(CAPTURED_ANSWERS)) == [*CAPTURED_EVENTS, CLOSED]


# (command code, exact bytes, event): the first rows are QEMU's requests as captured in
# vectors/ (tests/vectors_trace.py), the rest are written by hand from tpm_ioctl.h's layouts
# (PROTOCOLS.md), never by our encoder
REQUESTS: list[tuple[int, str, w.Request]] = [
    (0x10, "00000010", w.SetDataFd()),
    (0x01, "00000001", w.GetCapability()),
    (0x0E, "0000000e", w.Stop()),
    (0x11, "00000011 00000000", w.SetBufferSize(0)),
    (0x0E, "0000000e", w.Stop()),
    (0x11, "00000011 00001000", w.SetBufferSize(4096)),
    (0x02, "00000002 00000000", w.Init(0)),
    (0x04, "00000004", w.GetTpmEstablished()),
    (0x05, "00000005 00 000000", w.SetLocality(0)),  # QEMU pads the locality to 4 bytes
    (0x03, "00000003", w.Shutdown()),
    (0x02, "00000002 00000001", w.Init(1)),
    (0x05, "00000005 03 000000", w.SetLocality(3)),
    (0x06, "00000006", w.HashStart()),
    (0x07, "00000007 00000003 616263", w.HashData(b"abc")),
    (0x08, "00000008", w.HashEnd()),
    (0x09, "00000009", w.CancelTpmCmd()),
    (0x0A, "0000000a", w.StoreVolatile()),
    (0x0B, "0000000b 04 000000", w.ResetTpmEstablished(4)),
    (0x0C, "0000000c 00000001 00000002 00000010", w.GetStateBlob(1, 2, 16)),
    (0x0D, "0000000d 00000000 00000001 00000002 7879", w.SetStateBlob(0, 1, b"xy")),
    (0x0E, "0000000e", w.Stop()),
    (0x0F, "0000000f", w.GetConfig()),
    (0x10, "00000010", w.SetDataFd()),
    (0x11, "00000011 00000b00", w.SetBufferSize(0xB00)),
    (0x12, "00000012 0000000000000001 00000004 00000000", w.GetInfo(1, 4)),
    (0x13, "00000013 00000005", w.LockStorage(5)),
]
CAPTURED_ROWS = 10


def test_the_table_starts_with_the_captured_requests() -> None:
    captured = select("ctrl", "cmd")
    assert [bytes.fromhex(h) for _, h, _ in REQUESTS[:CAPTURED_ROWS]] == captured
    assert [ev for _, _, ev in REQUESTS[:CAPTURED_ROWS]] == CAPTURED_EVENTS
    assert captured[0] == bytes.fromhex("00000010")  # SET_DATAFD, sent with the fd


@pytest.mark.parametrize(("code", "hexbytes", "event"), REQUESTS)
def test_request_layouts_both_ways(code: int, hexbytes: str, event: w.Request) -> None:
    raw = bytes.fromhex(hexbytes)
    assert int.from_bytes(raw[:4], "big") == code == w.CtrlCommand(code)
    assert drive([raw]) == [event, CLOSED]
    assert w.encode_request(event) == raw
    assert w.ControlClientConnection().send(event) == raw
    for chunks in splits(raw):
        assert drive(chunks) == [event, CLOSED]


def test_short_locality_encoding_as_tcti_swtpm_sends_it() -> None:
    assert w.encode_request(w.SetLocality(3), short_locality=True) == bytes.fromhex("0000000503")
    client = w.ControlClientConnection(short_locality=True)
    assert client.send(w.ResetTpmEstablished(3)) == bytes.fromhex("0000000b03")


# (command code, the request answered, exact bytes, response): the first rows are swtpm's
# answers as captured, the rest from tpm_ioctl.h. Error answers keep the fixed layout,
# zero-filled (a client reading a fixed size is never left waiting).
RESPONSES: list[tuple[int, w.Request, str, w.Response]] = [
    (0x10, w.SetDataFd(), "00000000", w.Result(0)),
    (0x01, w.GetCapability(), "00000000 0000ffff", w.CapabilityResult(0, 0xFFFF)),
    (0x0E, w.Stop(), "00000000", w.Result(0)),
    (
        0x11,
        w.SetBufferSize(0),
        "00000000 00001000 00000af8 00001000",
        w.BufferSizeResult(0, 4096, 2808, 4096),
    ),
    (0x02, w.Init(0), "00000000", w.Result(0)),
    (0x04, w.GetTpmEstablished(), "00000000 00 000000", w.EstablishedResult(0, False)),
    (0x05, w.SetLocality(0), "00000000", w.Result(0)),
    (0x03, w.Shutdown(), "00000000", w.Result(0)),
    (0x01, w.GetCapability(), "00000000 0001ffff", w.CapabilityResult(0, 0x1FFFF)),
    (0x04, w.GetTpmEstablished(), "00000000 01 000000", w.EstablishedResult(0, True)),
    (0x0F, w.GetConfig(), "00000000 00000001", w.ConfigResult(0, 1)),
    (
        0x0C,
        w.GetStateBlob(1, 1, 0),
        "00000000 00000000 00000005 00000002 6162",
        w.StateBlobResult(0, 0, 5, b"ab"),
    ),
    (0x12, w.GetInfo(1, 0), "00000000 00000002 00000002 7b7d", w.InfoResult(0, 2, b"{}")),
    (0x0C, w.GetStateBlob(1, 2, 0), "00000009" + "00" * 12, w.StateBlobResult(9, 0, 0, b"")),
    (0x11, w.SetBufferSize(0), "00000003" + "00" * 12, w.BufferSizeResult(3, 0, 0, 0)),
    (0x02, w.Init(0), "00000009", w.Result(9)),
    (0x0D, w.SetStateBlob(1, 1, b"x"), "0000001f", w.Result(0x1F)),
]


@pytest.mark.parametrize(("code", "request_", "hexbytes", "response"), RESPONSES)
def test_response_table_both_ways(
    code: int, request_: w.Request, hexbytes: str, response: w.Response
) -> None:
    raw = bytes.fromhex(hexbytes)
    assert w.encode_request(request_)[:4] == code.to_bytes(4, "big")
    assert w.encode_response(response, type(request_)) == raw
    server = w.ControlServerConnection()
    server.receive_data(w.encode_request(request_))
    assert server.next_event() == request_
    assert server.send(response) == raw
    for chunks in [[raw], *splits(raw)]:
        client = w.ControlClientConnection()
        client.send(request_)
        for chunk in chunks:
            assert client.next_event() is NEED_DATA
            client.receive_data(chunk)
        assert client.next_event() == response
        client.receive_data(b"")
        assert client.next_event() is CLOSED


def test_captured_answers_are_in_the_table() -> None:
    rows = {(type(req), bytes.fromhex(h)): rsp for _, req, h, rsp in RESPONSES}
    for req, raw, answer in zip(
        CAPTURED_EVENTS, select("ctrl", "rsp"), CAPTURED_ANSWERS, strict=True
    ):
        assert rows[type(req), raw] == answer


@pytest.mark.parametrize("pad", ["000000", "a5a5a5", "ffffff"])
def test_locality_padded_form_as_qemu_sends_it(pad: str) -> None:
    raw = bytes.fromhex("0000000502" + pad + "0000000b03" + pad + "00000001")
    assert drive([raw]) == [w.SetLocality(2), w.ResetTpmEstablished(3), w.GetCapability(), CLOSED]
    assert drive([raw[i : i + 1] for i in range(len(raw))]) == drive([raw])


def test_locality_short_form_as_tcti_swtpm_sends_it() -> None:
    raw = bytes.fromhex("0000000503" + "00000001" + "0000000501")
    assert drive([raw]) == [w.SetLocality(3), w.GetCapability(), w.SetLocality(1), CLOSED]


def test_pad_then_end_of_stream_is_a_clean_close() -> None:
    assert drive([bytes.fromhex("0000000501000000")]) == [w.SetLocality(1), CLOSED]


@pytest.mark.parametrize(
    ("hexbytes", "message"),
    [
        ("00000077", "unknown control command 0x77"),
        ("00000007" + "00001000", "HASH_DATA of 4096 bytes"),
        ("0000000d" + "00000000" + "00000001" + "7fffffff", "state blob of"),
        ("000000020000", "closed inside command 0x2"),
        ("0000", "closed inside a command code"),
    ],
)
def test_bad_input_is_a_remote_error(hexbytes: str, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        drive([bytes.fromhex(hexbytes)])


def test_unknown_command_answer() -> None:
    assert w.error_bytes_for_unknown() == bytes.fromhex("0000000a")


def test_data_after_shutdown_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="after SHUTDOWN"):
        drive([bytes.fromhex("0000000300000001")])


def test_answer_must_fit_the_request() -> None:
    conn = w.ControlServerConnection()
    conn.receive_data(bytes.fromhex("00000001"))
    conn.next_event()
    with pytest.raises(LocalProtocolError):
        conn.send(w.ConfigResult(0, 1))
    with pytest.raises(LocalProtocolError):
        conn.send(w.Result(0))  # success needs the capability word
    with pytest.raises(LocalProtocolError):
        w.ControlServerConnection().send(w.Result(0))


def test_one_request_in_flight() -> None:
    conn = w.ControlServerConnection()
    conn.receive_data(bytes.fromhex("0000000100000001"))
    assert conn.next_event() == w.GetCapability()
    assert conn.next_event() is NEED_DATA  # until answered
    conn.send(w.CapabilityResult(0, 1))
    assert conn.next_event() == w.GetCapability()
