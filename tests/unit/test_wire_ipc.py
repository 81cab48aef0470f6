"""Manager IPC codec: hand-written layouts both ways, every split, remote and local errors."""

from __future__ import annotations

import uuid

import pytest

from tests.vectors_trace import splits
from vtpm.errors import LocalProtocolError, RemoteProtocolError
from vtpm.tpm.constants import TPM_ALG
from vtpm.wire import ipc as w
from vtpm.wire._common import CLOSED, NEED_DATA

MANAGER, PEER = w.Role.MANAGER, w.Role.PEER
OTHER = {MANAGER: PEER, PEER: MANAGER}
UUID = uuid.UUID("12345678-9abc-def0-1234-56789abcdef0")
KEY = bytes(range(32))
KEY_HEX = "000102030405060708090a0b0c0d0e0f 101112131415161718191a1b1c1d1e1f"
D_AA, D_BB, D_CC = b"\xaa" * 32, b"\xbb" * 32, b"\xcc" * 32
AA, BB, CC = "aa" * 32, "bb" * 32, "cc" * 32  # the same digests in hex


def drive(role: w.Role, chunks: list[bytes], max_frame: int = 65536) -> list[object]:
    """Feed chunks, then end of stream, to a `role` codec; return its events up to CLOSED."""
    conn = w.IpcConnection(role, max_frame=max_frame)
    events: list[object] = []
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while (ev := conn.next_event()) is not NEED_DATA:
            events.append(ev)
            if ev is CLOSED:
                return events
    return events


# (sender, message type, bytes on the wire, event); the receiver is the other role. The bytes
# are written by hand from the layouts in the module docstring, never by our encoder.
TABLE: list[tuple[w.Role, int, str, w.Event]] = [
    (PEER, 0x01, "00000012 01 01 123456789abcdef0123456789abcdef0", w.Hello(UUID)),
    (
        MANAGER,
        0x02,
        # key | n = 2 | 9 "permanent" digest | 8 "volatile" digest
        f"00000075 02 {KEY_HEX} 02 09 7065726d616e656e74 {AA} 08 766f6c6174696c65 {BB}",
        w.KeyGrant(KEY, (("permanent", D_AA), ("volatile", D_BB))),
    ),
    (MANAGER, 0x02, "00000022 02" + "11" * 32 + "00", w.KeyGrant(b"\x11" * 32, ())),
    (MANAGER, 0x03, "0000000d 03 756e6b6e6f776e207654504d", w.Refused("unknown vTPM")),
    (MANAGER, 0x03, "00000001 03", w.Refused("")),
    (MANAGER, 0x03, "00000006 03 636166c3a9", w.Refused("café")),
    (
        PEER,
        0x04,
        "00000033 04 09 7065726d616e656e74 0000000000000007" + CC,
        w.StateWritten("permanent", 7, D_CC),
    ),
    (
        PEER,
        0x04,
        "0000002b 04 01 78 ffffffffffffffff" + AA,
        w.StateWritten("x", 2**64 - 1, D_AA),
    ),
    (PEER, 0x05, "0000000a 05 08 766f6c6174696c65", w.StateDeleted("volatile")),
    (MANAGER, 0x06, "00000001 06", w.Ack()),
    (PEER, 0x07, "00000001 07", w.Goodbye()),
    (PEER, 0x08, "00000001 08", w.Ready()),
    (PEER, 0x09, "00000002 09 00", w.TpmHealth(False)),
    (PEER, 0x09, "00000002 09 01", w.TpmHealth(True)),
    (PEER, 0x09, "00000009 09 01 64697369e280a6", w.TpmHealth(True, "disi…")),
    # CertRequest: u8 kind length | "ek-rsa2048" | TPM2B_PUBLIC (here 2 bytes of content)
    (
        PEER,
        0x0A,
        "00000010 0a 0a 656b2d727361323034380002 abcd",
        w.CertRequest("ek-rsa2048", bytes.fromhex("0002abcd")),
    ),
    (
        PEER,
        0x0A,
        "0000000d 0a 08 706c6174666f726d 000101",
        w.CertRequest("platform", bytes.fromhex("000101")),
    ),
    (MANAGER, 0x0B, "00000004 0b 308201", w.CertReply(b"\x30\x82\x01")),
    (
        PEER,
        0x20,
        "0000000c 20 0002 aabb 00000081 000b 00",
        w.QuoteRequest(b"\xaa\xbb", (0, 7), 0x0B, ()),
    ),
    (MANAGER, 0x21, "00000004 21 010203", w.QuoteReply(b"\x01\x02\x03")),
    (MANAGER, 0x22, "00000007 22 000b 00000003", w.PcrRequest(0x0B, (0, 1))),
    (PEER, 0x23, "00000019 23 0004 01 05" + " 11" * 20, w.PcrReply(0x04, ((5, b"\x11" * 20),))),
    # {"args":{},"op":"list"}
    (
        PEER,
        0x10,
        "00000018 10 7b2261726773223a7b7d2c226f70223a226c697374227d",
        w.AdminRequest("list", {}),
    ),
    (
        PEER,
        0x10,
        # {"args":{"b":true,"name":"vm1","opt":null,"size":2,"tags":["a","b"],"x":1.5},
        #  "op":"create"}
        "0000005c 10 7b2261726773223a7b2262223a747275652c226e616d65223a22766d31222c226f70"
        "74223a6e756c6c2c2273697a65223a322c2274616773223a5b2261222c2262225d2c2278223a312e"
        "357d2c226f70223a22637265617465227d",
        w.AdminRequest(
            "create",
            {"x": 1.5, "tags": ["a", "b"], "size": 2, "opt": None, "name": "vm1", "b": True},
        ),
    ),
    (
        PEER,
        0x10,
        # {"args":{"to":"é"},"op":"rename"}: UTF-8 on the wire, not a \u escape
        "00000023 10 7b2261726773223a7b22746f223a22c3a9227d2c226f70223a2272656e616d65227d",
        w.AdminRequest("rename", {"to": "é"}),
    ),
    (
        MANAGER,
        0x11,
        # {"ok":true,"result":{"vtpms":["a"]}}
        "00000025 11 7b226f6b223a747275652c22726573756c74223a7b227674706d73223a5b2261225d7d7d",
        w.AdminReply(True, {"vtpms": ["a"]}),
    ),
    # {"ok":true,"result":null}
    (
        MANAGER,
        0x11,
        "0000001a 11 7b226f6b223a747275652c22726573756c74223a6e756c6c7d",
        w.AdminReply(True),
    ),
    (
        MANAGER,
        0x11,
        # {"error":"no such vTPM","ok":false}
        "00000024 11 7b226572726f72223a226e6f2073756368207654504d222c226f6b223a66616c73657d",
        w.AdminReply(False, error="no such vTPM"),
    ),
    # {"error":"","ok":false}
    (
        MANAGER,
        0x11,
        "00000018 11 7b226572726f72223a22222c226f6b223a66616c73657d",
        w.AdminReply(False),
    ),
]


@pytest.mark.parametrize(("sender", "code", "hexbytes", "event"), TABLE)
def test_layouts_both_ways(sender: w.Role, code: int, hexbytes: str, event: w.Event) -> None:
    raw = bytes.fromhex(hexbytes)
    assert raw[4] == code == w.MessageType(code)
    assert drive(OTHER[sender], [raw]) == [event, CLOSED]
    assert w.IpcConnection(sender).send(event) == raw
    for chunks in splits(raw):
        assert drive(OTHER[sender], chunks) == [event, CLOSED]


def stream_to(receiver: w.Role) -> tuple[bytes, list[object]]:
    rows = [(bytes.fromhex(h), ev) for sender, _, h, ev in TABLE if OTHER[sender] is receiver]
    return b"".join(raw for raw, _ in rows), [ev for _, ev in rows]


@pytest.mark.parametrize("receiver", [MANAGER, PEER])
def test_every_split_gives_the_same_events(receiver: w.Role) -> None:
    blob, events = stream_to(receiver)
    expected = [*events, CLOSED]
    assert drive(receiver, [blob]) == expected
    for size in range(1, 40):
        assert drive(receiver, [blob[i : i + size] for i in range(0, len(blob), size)]) == expected
    for cut in range(1, len(blob)):  # b"" would be end of stream
        assert drive(receiver, [blob[:cut], blob[cut:]]) == expected


def test_one_byte_at_a_time_needs_data_until_the_frame_is_complete() -> None:
    raw = bytes.fromhex("0000000a 05 08 766f6c6174696c65")
    conn = w.IpcConnection(MANAGER)
    for byte in raw[:-1]:
        conn.receive_data(bytes([byte]))
        assert conn.next_event() is NEED_DATA
    conn.receive_data(raw[-1:])
    assert conn.next_event() == w.StateDeleted("volatile")
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    assert conn.next_event() is CLOSED
    assert conn.next_event() is CLOSED


def test_json_layout_is_read_leniently() -> None:
    text = b'{ "op" : "list",\n  "args" : { "all" : true } }'
    raw = bytes.fromhex("0000002f 10") + text
    assert len(text) + 1 == 0x2F
    assert drive(MANAGER, [raw]) == [w.AdminRequest("list", {"all": True}), CLOSED]


def test_max_frame_is_inclusive() -> None:
    reason = "r" * 1024
    raw = bytes.fromhex("00000401 03") + reason.encode()
    assert drive(PEER, [raw], max_frame=1025) == [w.Refused(reason), CLOSED]
    assert w.IpcConnection(MANAGER, max_frame=1025).send(w.Refused(reason)) == raw


# remote errors ---------------------------------------------------------------------------------

NAME_33 = "21" + "61" * 33  # length 33, "a" * 33
SW = "0000000000000007" + CC  # a StateWritten counter and digest


def frame(kind: str, body: str) -> str:
    """A frame around a hand-written body: for the cases where the length is not the point."""
    raw = bytes.fromhex(body)
    return (len(raw) + 1).to_bytes(4, "big").hex() + kind + raw.hex()


@pytest.mark.parametrize(
    ("receiver", "hexbytes", "message"),
    [
        # framing
        (MANAGER, "00000000", r"frame length 0 is outside 1\.\.65536"),
        (PEER, "00010001", "frame length 65537"),
        (MANAGER, "ffffffff", "frame length 4294967295"),
        (MANAGER, "000000", "closed inside a frame length"),
        (MANAGER, "00000005", "closed inside a frame"),
        (MANAGER, "0000000507", "closed inside a frame"),
        (MANAGER, "00000012 01 01 1234", "closed inside a frame"),
        (MANAGER, "00000001 07 000000", "closed inside a frame length"),
        # types
        (MANAGER, "00000001 00", "unknown message type 0x00"),
        (MANAGER, "00000001 0c", "unknown message type 0x0c"),
        (PEER, "00000001 ff", "unknown message type 0xff"),
        (MANAGER, "00000001 24", "0x24 is reserved"),
        (PEER, "00000001 2f", "0x2f is reserved"),
        (MANAGER, "00000001 02", "manager does not receive KEY_GRANT"),
        (MANAGER, "00000001 03", "manager does not receive REFUSED"),
        (MANAGER, "00000001 06", "manager does not receive ACK"),
        (MANAGER, "00000001 11", "manager does not receive ADMIN_REPLY"),
        (PEER, "00000001 01", "peer does not receive HELLO"),
        (PEER, "00000001 04", "peer does not receive STATE_WRITTEN"),
        (PEER, "00000001 05", "peer does not receive STATE_DELETED"),
        (PEER, "00000001 07", "peer does not receive GOODBYE"),
        (PEER, "00000001 08", "peer does not receive READY"),
        (PEER, "00000001 10", "peer does not receive ADMIN_REQUEST"),
        # Hello
        (MANAGER, "00000011 01 01 123456789abcdef0123456789abcde", "Hello body is 16"),
        (MANAGER, "00000013 01 01 123456789abcdef0123456789abcdef0 00", "Hello body is 18"),
        (MANAGER, "00000001 01", "Hello body is 0"),
        (MANAGER, "00000012 01 02 123456789abcdef0123456789abcdef0", "version 2, not 1"),
        (MANAGER, "00000012 01 00 123456789abcdef0123456789abcdef0", "version 0, not 1"),
        # KeyGrant
        (PEER, "00000021 02" + KEY_HEX, "has no key and count"),
        (PEER, "00000001 02", "has no key and count"),
        (PEER, "00000022 02" + KEY_HEX + "09", "announces 9 digests, at most 8"),
        (PEER, "00000022 02" + KEY_HEX + "01", "ends before a name length"),
        (PEER, "00000024 02" + KEY_HEX + "01 05 61", "ends inside a name"),
        (PEER, frame("02", KEY_HEX + "01 01 61" + "aa" * 31), "ends inside a digest"),
        (PEER, frame("02", KEY_HEX + "01 01 61" + AA + "00"), "1 bytes too many"),
        (PEER, "00000023 02" + KEY_HEX + "00 00", "1 bytes too many"),
        (PEER, frame("02", KEY_HEX + "02 01 61" + AA + "00" + AA), "'' is not 1..32"),
        (PEER, frame("02", KEY_HEX + "01 01 41" + AA), "'A' is not 1..32"),
        (PEER, frame("02", KEY_HEX + "01 01 2d" + AA), "'-' is not 1..32"),
        (PEER, frame("02", KEY_HEX + "01 01 e9" + AA), "name is not ASCII"),
        (PEER, frame("02", KEY_HEX + "01" + NAME_33 + AA), "is not 1..32"),
        (PEER, frame("02", KEY_HEX + "02 01 61" + AA + "01 61" + BB), "names 'a' twice"),
        # Refused
        (PEER, "00000002 03 ff", "Refused reason is not UTF-8"),
        (PEER, "00000003 03 c328", "Refused reason is not UTF-8"),
        (PEER, "00000004 03 eda080", "Refused reason is not UTF-8"),  # an encoded surrogate
        (PEER, "00000402 03" + "61" * 1025, "1025 bytes exceeds 1024"),
        # StateWritten
        (MANAGER, "00000001 04", "ends before a name length"),
        (MANAGER, "00000003 04 05 61", "ends inside a name"),
        (MANAGER, frame("04", "01 61" + SW[:-2]), "body is 41 bytes, not 42"),
        (MANAGER, frame("04", "01 61" + SW + "00"), "body is 43 bytes, not 42"),
        (MANAGER, frame("04", "00" + SW), "'' is not 1..32"),
        (MANAGER, frame("04", "01 41" + SW), "'A' is not 1..32"),
        (MANAGER, frame("04", NAME_33 + SW), "is not 1..32"),
        # StateDeleted
        (MANAGER, "00000001 05", "ends before a name length"),
        (MANAGER, "00000004 05 01 61 61", "body is 3 bytes, not 2"),
        (MANAGER, "00000002 05 00", "'' is not 1..32"),
        (MANAGER, "00000023 05" + NAME_33, "is not 1..32"),
        (MANAGER, "00000003 05 01 80", "name is not ASCII"),
        # TpmHealth
        (MANAGER, "00000001 09", "does not start with 0 or 1"),
        (MANAGER, "00000002 09 02", "does not start with 0 or 1"),
        (MANAGER, "00000003 09 01 ff", "TpmHealth reason is not UTF-8"),
        (MANAGER, "00000003 09 00 61", "healthy TpmHealth carries no reason"),
        (MANAGER, "00000403 09 01" + "61" * 1025, "1025 bytes exceeds 1024"),
        (PEER, "00000002 09 00", "the peer does not receive TPM_HEALTH"),
        # CertRequest / CertReply
        (MANAGER, "00000001 0a", "CertRequest body ends before a name length"),
        (MANAGER, "00000004 0a 05 656b", "CertRequest body ends inside a name"),
        (MANAGER, "00000007 0a 02 656b 000101", "kind 'ek' is not one of"),
        (MANAGER, "0000000b 0a 08 706c6174666f726d 01", "must be 3..1024 bytes"),
        (MANAGER, "0000000d 0a 08 706c6174666f726d 000201", "is not one TPM2B_PUBLIC"),
        (MANAGER, "0000040b 0a 08 706c6174666f726d 03ff" + "00" * 1023, "must be 3..1024"),
        (PEER, "00000001 0b", "certificate must be 1..4096 bytes"),
        (PEER, "00001002 0b" + "30" * 4097, "certificate must be 1..4096 bytes"),
        (PEER, "00000003 0a 01 61", "the peer does not receive CERT_REQUEST"),
        (MANAGER, "00000002 0b 30", "the manager does not receive CERT_REPLY"),
        # empty bodies
        (PEER, "00000002 06 00", "Ack body is 1 bytes, not 0"),
        (MANAGER, "00000003 07 0000", "Goodbye body is 2 bytes, not 0"),
    ],
)
def test_bad_peer_bytes_are_remote_errors(receiver: w.Role, hexbytes: str, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        drive(receiver, [bytes.fromhex(hexbytes)])


def admin(receiver: w.Role, body: bytes) -> bytes:
    kind = b"\x10" if receiver is MANAGER else b"\x11"
    return (len(body) + 1).to_bytes(4, "big") + kind + body


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff", "not UTF-8 JSON"),
        (b'{"op":"x","args":{"a":"\xc3"}}', "not UTF-8 JSON"),
        (b"", "not UTF-8 JSON"),
        (b'{"op":"x",', "not UTF-8 JSON"),
        (b'{"op":"x","args":{}} {}', "not UTF-8 JSON"),
        (b'["op","args"]', "not a JSON object"),
        (b'"list"', "not a JSON object"),
        (b'{"args":{}}', "has keys"),
        (b'{"op":"x"}', "has keys"),
        (b'{"op":"x","args":{},"extra":1}', "has keys"),
        (b'{"op":"","args":{}}', "op is not a non-empty string"),
        (b'{"op":7,"args":{}}', "op is not a non-empty string"),
        (b'{"op":"x","args":[]}', "args is not an object"),
        (b'{"op":"x","args":null}', "args is not an object"),
        (b'{"op":"x","args":{"n":NaN}}', "NaN is not a JSON number"),
        (b'{"op":"x","args":{"n":-Infinity}}', "Infinity is not a JSON number"),
        (b'{"op":"x","args":{"n":1e999}}', "inf is not a JSON number"),
        (b'{"op":"x","args":{"n":18446744073709551616}}', "out of range"),
        (b'{"op":"x","args":{"a":1,"a":2}}', "names a key twice"),
        (b'{"op":"x","op":"y","args":{}}', "names a key twice"),
        (b'{"op":"x","args":{"s":"\\ud800"}}', "not valid Unicode"),
        (b'{"op":"x","args":{"d":' + b"[" * 32 + b"]" * 32 + b"}}", "nested more than 32"),
        (b'{"op":"x","args":' + b"[" * 40000 + b"}", "not UTF-8 JSON"),  # RecursionError
        (b'{"op":"x","args":{"n":' + b"1" * 5000 + b"}}", "not UTF-8 JSON"),
    ],
)
def test_bad_admin_request_json_is_a_remote_error(body: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        drive(MANAGER, [admin(MANAGER, body)])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xc3\xa9", "not UTF-8 JSON"),
        (b"[]", "not a JSON object"),
        (b'{"result":1}', "ok is not true or false"),
        (b'{"ok":1,"result":1}', "ok is not true or false"),
        (b'{"ok":"true","result":1}', "ok is not true or false"),
        (b'{"ok":true}', "has keys"),
        (b'{"ok":true,"result":1,"error":"e"}', "has keys"),
        (b'{"ok":false}', "has keys"),
        (b'{"ok":false,"error":"e","result":null}', "has keys"),
        (b'{"ok":false,"error":7}', "error is not a string"),
        (b'{"ok":true,"result":[NaN]}', "not a JSON number"),
        (b'{"ok":true,"result":' + b"[" * 33 + b"]" * 33 + b"}", "nested more than 32"),
    ],
)
def test_bad_admin_reply_json_is_a_remote_error(body: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        drive(PEER, [admin(PEER, body)])


def test_bad_length_is_refused_as_soon_as_its_four_bytes_arrive() -> None:
    for max_frame, head in [(65536, "00010001"), (2000, "000007d1"), (2000, "00000000")]:
        conn = w.IpcConnection(MANAGER, max_frame=max_frame)
        conn.receive_data(bytes.fromhex(head[:6]))
        assert conn.next_event() is NEED_DATA
        conn.receive_data(bytes.fromhex(head[6:]))
        with pytest.raises(RemoteProtocolError, match="frame length"):
            conn.next_event()


def test_unwanted_type_is_refused_before_its_body_arrives() -> None:
    conn = w.IpcConnection(PEER)
    conn.receive_data(bytes.fromhex("00000012 01"))  # Hello's header, no body yet
    with pytest.raises(RemoteProtocolError, match="peer does not receive HELLO"):
        conn.next_event()


def test_events_before_a_bad_frame_are_still_delivered() -> None:
    conn = w.IpcConnection(MANAGER)
    conn.receive_data(bytes.fromhex("00000001 07 00000000"))
    assert conn.next_event() == w.Goodbye()
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_bytes_after_end_of_stream_are_a_remote_error() -> None:
    conn = w.IpcConnection(MANAGER)
    conn.receive_data(b"")
    conn.receive_data(b"")  # repeated end of stream is harmless
    with pytest.raises(RemoteProtocolError, match="after end of stream"):
        conn.receive_data(bytes.fromhex("00000001 07"))


# local errors ----------------------------------------------------------------------------------

PEER_EVENTS: list[w.Event] = [
    w.Hello(UUID),
    w.StateWritten("a", 0, D_AA),
    w.StateDeleted("a"),
    w.Goodbye(),
    w.AdminRequest("list", {}),
    w.CertRequest("ek-ecc256", b"\x00\x01\x00"),
]
MANAGER_EVENTS: list[w.Event] = [
    w.KeyGrant(KEY, ()),
    w.Refused("no"),
    w.Ack(),
    w.AdminReply(True),
    w.CertReply(b"0"),
]


@pytest.mark.parametrize(
    ("role", "event"),
    [(MANAGER, ev) for ev in PEER_EVENTS] + [(PEER, ev) for ev in MANAGER_EVENTS],
)
def test_sending_the_other_roles_event_is_a_local_error(role: w.Role, event: w.Event) -> None:
    with pytest.raises(LocalProtocolError, match=f"the {role.value} does not send"):
        w.IpcConnection(role).send(event)


def test_sending_a_foreign_object_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="not a Manager IPC event"):
        w.IpcConnection(PEER).send(object())  # type: ignore[arg-type]


def test_a_frame_larger_than_max_frame_is_not_sent() -> None:
    big = w.AdminRequest("put", {"blob": "x" * 2000})
    with pytest.raises(LocalProtocolError, match="exceeds max_frame"):
        w.IpcConnection(PEER, max_frame=2000).send(big)
    assert len(w.IpcConnection(PEER).send(big)) > 2000


def test_args_mutated_after_construction_are_checked_again_on_send() -> None:
    req = w.AdminRequest("put", {})
    req.args["bad"] = (1, 2)  # type: ignore[assignment]
    with pytest.raises(LocalProtocolError, match="tuple is not JSON data"):
        w.IpcConnection(PEER).send(req)


@pytest.mark.parametrize("max_frame", [0, 1, 1024, 2**32])
def test_max_frame_bounds(max_frame: int) -> None:
    with pytest.raises(LocalProtocolError, match="max_frame"):
        w.IpcConnection(MANAGER, max_frame=max_frame)


def deep(n: int) -> w.JSONValue:
    value: w.JSONValue = []
    for _ in range(n - 1):
        value = [value]
    return value


INVALID: list[tuple[object, str]] = [
    (lambda: w.Hello(UUID, 2), "version 2 is not 1"),
    (lambda: w.Hello(UUID, True), "version True is not 1"),
    (lambda: w.Hello(str(UUID)), "must be a uuid.UUID"),  # type: ignore[arg-type]
    (lambda: w.KeyGrant(KEY[:31], ()), "key must be exactly 32 bytes"),
    (lambda: w.KeyGrant(KEY + b"\x00", ()), "key must be exactly 32 bytes"),
    (lambda: w.KeyGrant(bytearray(KEY), ()), "key must be exactly 32 bytes"),  # type: ignore[arg-type]
    (lambda: w.KeyGrant(KEY, [("a", D_AA)]), "must be a tuple"),  # type: ignore[arg-type]
    (lambda: w.KeyGrant(KEY, (("a", D_AA, 1),)), "entries must be"),  # type: ignore[arg-type]
    (lambda: w.KeyGrant(KEY, tuple((f"n{i}", D_AA) for i in range(9))), "more than 8"),
    (lambda: w.KeyGrant(KEY, (("a", D_AA), ("a", D_BB))), "names 'a' twice"),
    (lambda: w.KeyGrant(KEY, (("", D_AA),)), "is not 1..32"),
    (lambda: w.KeyGrant(KEY, (("a" * 33, D_AA),)), "is not 1..32"),
    (lambda: w.KeyGrant(KEY, (("Perm", D_AA),)), "is not 1..32"),
    (lambda: w.KeyGrant(KEY, (("a-b", D_AA),)), "is not 1..32"),
    (lambda: w.KeyGrant(KEY, (("a\n", D_AA),)), "is not 1..32"),
    (lambda: w.KeyGrant(KEY, (("é", D_AA),)), "is not 1..32"),
    (lambda: w.KeyGrant(KEY, (("a", D_AA[:31]),)), "digest of a must be exactly 32"),
    (lambda: w.Refused("x" * 1025), "longer than 1024 bytes"),
    (lambda: w.Refused("é" * 513), "longer than 1024 bytes"),
    (lambda: w.Refused("\ud800"), "not valid Unicode"),
    (lambda: w.Refused(b"no"), "must be a str"),  # type: ignore[arg-type]
    (lambda: w.StateWritten("a", -1, D_AA), "counter -1 is not a u64"),
    (lambda: w.StateWritten("a", 2**64, D_AA), "is not a u64"),
    (lambda: w.StateWritten("a", 1.0, D_AA), "is not a u64"),  # type: ignore[arg-type]
    (lambda: w.StateWritten("a", 0, D_AA + b"\x00"), "digest must be exactly 32"),
    (lambda: w.StateWritten("A", 0, D_AA), "is not 1..32"),
    (lambda: w.StateDeleted(""), "is not 1..32"),
    (lambda: w.TpmHealth(1), "failed must be a bool"),  # type: ignore[arg-type]
    (lambda: w.TpmHealth(False, "x"), "healthy TpmHealth carries no reason"),
    (lambda: w.TpmHealth(True, "x" * 1025), "longer than 1024 bytes"),
    (lambda: w.TpmHealth(True, "\ud800"), "not valid Unicode"),
    (lambda: w.StateDeleted(7), "is not 1..32"),  # type: ignore[arg-type]
    (lambda: w.CertRequest("ek-rsa4096", b"\x00\x01\x00"), "is not one of"),
    (lambda: w.CertRequest("platform", "x"), "must be 3..1024 bytes"),  # type: ignore[arg-type]
    (lambda: w.CertRequest("platform", b"\x00\x05\x00"), "is not one TPM2B_PUBLIC"),
    (lambda: w.CertReply(b""), "must be 1..4096 bytes"),
    (lambda: w.AdminRequest("", {}), "op must be a non-empty str"),
    (lambda: w.AdminRequest(None, {}), "op must be a non-empty str"),  # type: ignore[arg-type]
    (lambda: w.AdminRequest("\udc80", {}), "not valid Unicode"),
    (lambda: w.AdminRequest("x", []), "args must be a dict"),  # type: ignore[arg-type]
    (lambda: w.AdminRequest("x", {"t": (1,)}), "tuple is not JSON data"),  # type: ignore[dict-item]
    (lambda: w.AdminRequest("x", {"b": b"x"}), "bytes is not JSON data"),  # type: ignore[dict-item]
    (lambda: w.AdminRequest("x", {"n": float("nan")}), "nan is not a JSON number"),
    (lambda: w.AdminRequest("x", {"n": float("inf")}), "inf is not a JSON number"),
    (lambda: w.AdminRequest("x", {"n": 2**64}), "out of range"),
    (lambda: w.AdminRequest("x", {"n": -(2**63) - 1}), "out of range"),
    (lambda: w.AdminRequest("x", {"d": {1: 2}}), "key 1 is not a string"),  # type: ignore[dict-item]
    (lambda: w.AdminRequest("x", {"\ud800": 1}), "not valid Unicode"),
    (lambda: w.AdminRequest("x", {"d": deep(32)}), "nested more than 32"),
    (lambda: w.AdminReply(1), "ok must be a bool"),  # type: ignore[arg-type]
    (lambda: w.AdminReply(True, error="e"), "successful AdminReply carries no error"),
    (lambda: w.AdminReply(False, 1, "e"), "failed AdminReply carries no result"),
    (lambda: w.AdminReply(False, error=None), "error must be a str"),  # type: ignore[arg-type]
    (lambda: w.AdminReply(True, deep(33)), "nested more than 32"),
    (lambda: w.AdminReply(True, {"s": {"x"}}), "set is not JSON data"),  # type: ignore[dict-item]
]


@pytest.mark.parametrize(("build", "message"), INVALID)
def test_invalid_events_are_local_errors(build: object, message: str) -> None:
    assert callable(build)
    with pytest.raises(LocalProtocolError, match=message):
        build()


def test_json_bounds_are_inclusive() -> None:
    args: dict[str, w.JSONValue] = {"lo": -(2**63), "hi": 2**64 - 1, "d": deep(31)}
    req = w.AdminRequest("x", args)
    raw = w.IpcConnection(PEER).send(req)
    assert drive(MANAGER, [raw]) == [req, CLOSED]


def test_key_grant_repr_hides_the_key() -> None:
    grant = w.KeyGrant(KEY, (("permanent", D_AA),))
    for text in (repr(grant), str(grant), f"{grant}"):
        assert "key" not in text
        assert KEY_HEX[:8] not in text
        assert repr(KEY) not in text and repr(KEY)[2:12] not in text
        assert "permanent" in text
    secret = w.KeyGrant(b"S3CRET" * 5 + b"!!", ())
    assert "S3CRET" not in repr(secret)


def test_a_bank_given_as_tpm_alg_is_the_same_as_its_number() -> None:
    """The instance and the Manager name banks by TPM_ALG (an IntEnum); the bytes are the same
    (a guest's deep quote was refused when this check asked for exactly `int`)."""
    peer = w.IpcConnection(w.Role.PEER)
    by_enum = peer.send(w.PcrReply(TPM_ALG.SHA256, ((0, bytes(32)),)))
    assert by_enum == peer.send(w.PcrReply(0x000B, ((0, bytes(32)),)))
    with pytest.raises(LocalProtocolError):
        w.PcrReply(True, ())
