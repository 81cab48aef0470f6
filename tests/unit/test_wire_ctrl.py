"""swtpm control channel codec: captured QEMU bytes, hand-written layouts, splits, errors."""

from __future__ import annotations

import pytest

from tests.vectors_trace import select
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


HAND_WRITTEN = [
    ("00000001", w.GetCapability()),
    ("0000000200000001", w.Init(1)),
    ("00000004", w.GetTpmEstablished()),
    ("00000006", w.HashStart()),
    ("0000000700000003616263", w.HashData(b"abc")),
    ("00000008", w.HashEnd()),
    ("00000009", w.CancelTpmCmd()),
    ("0000000a", w.StoreVolatile()),
    ("0000000c000000010000000200000010", w.GetStateBlob(1, 2, 16)),
    ("0000000d00000000000000010000000278 79".replace(" ", ""), w.SetStateBlob(0, 1, b"xy")),
    ("0000000e", w.Stop()),
    ("0000000f", w.GetConfig()),
    ("00000010", w.SetDataFd()),
    ("0000001100000b00", w.SetBufferSize(0xB00)),
    ("00000012" + "0000000000000001" + "00000004" + "00000000", w.GetInfo(1, 4)),
    ("0000001300000005", w.LockStorage(5)),
]


@pytest.mark.parametrize(("hexbytes", "event"), HAND_WRITTEN)
def test_request_layouts_both_ways(hexbytes: str, event: w.Request) -> None:
    raw = bytes.fromhex(hexbytes)
    assert drive([raw]) == [event, CLOSED]
    assert w.encode_request(event) == raw


@pytest.mark.parametrize(
    ("pending", "answer", "hexbytes"),
    [
        (w.GetCapability(), w.CapabilityResult(0, 0x1FFFF), "000000000001ffff"),
        (w.GetTpmEstablished(), w.EstablishedResult(0, True), "0000000001000000"),
        (w.GetConfig(), w.ConfigResult(0, 1), "0000000000000001"),
        (
            w.GetStateBlob(1, 1, 0),
            w.StateBlobResult(0, 0, 5, b"ab"),
            "000000000000000000000005000000026162",
        ),
        (w.GetInfo(1, 0), w.InfoResult(0, 2, b"{}"), "0000000000000002000000027b7d"),
        # errors keep the fixed layout, zero-filled: QEMU reads fixed sizes
        (w.GetStateBlob(1, 1, 0), w.Result(9), "00000009" + "00" * 12),
        (w.SetBufferSize(0), w.Result(3), "00000003" + "00" * 12),
        (w.GetTpmEstablished(), w.Result(9), "0000000900000000"),
        (w.Init(0), w.Result(9), "00000009"),
    ],
)
def test_response_layouts(pending: w.Request, answer: w.Response, hexbytes: str) -> None:
    conn = w.ControlServerConnection()
    conn.receive_data(w.encode_request(pending))
    assert conn.next_event() == pending
    assert conn.send(answer) == bytes.fromhex(hexbytes)
    client = w.ControlClientConnection()
    client.send(pending)
    client.receive_data(bytes.fromhex(hexbytes))
    got = client.next_event()
    if isinstance(answer, w.Result) and not isinstance(pending, w.Init):
        assert getattr(got, "result", None) == answer.result
    else:
        assert got == answer


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
