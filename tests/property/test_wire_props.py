"""Property tests: random valid streams split anywhere decode alike; garbage yields only the
remote protocol error."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_wire_ctrl import drive
from tests.unit.test_wire_frames import server_events
from tests.unit.test_wire_mssim import mssim_events
from vtpm.errors import RemoteProtocolError
from vtpm.wire import ctrl as w
from vtpm.wire import mssim as m
from vtpm.wire._common import CLOSED, NEED_DATA

u32 = st.integers(0, 0xFFFFFFFF)
ctrl_requests = st.one_of(
    st.builds(w.GetCapability),
    st.builds(w.Init, u32),
    st.builds(w.GetTpmEstablished),
    st.builds(w.SetLocality, st.integers(0, 4)),
    st.builds(w.HashStart),
    st.builds(w.HashData, st.binary(max_size=64)),
    st.builds(w.HashEnd),
    st.builds(w.CancelTpmCmd),
    st.builds(w.StoreVolatile),
    st.builds(w.ResetTpmEstablished, st.integers(0, 4)),
    st.builds(w.GetStateBlob, u32, u32, u32),
    st.builds(w.SetStateBlob, u32, u32, st.binary(max_size=64)),
    st.builds(w.Stop),
    st.builds(w.GetConfig),
    st.builds(w.SetDataFd),
    st.builds(w.SetBufferSize, u32),
    st.builds(w.GetInfo, st.integers(0, 2**64 - 1), u32),
    st.builds(w.LockStorage, u32),
)


def split(blob: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(blob) + 1) for c in cuts})
    out, last = [], 0
    for p in [*points, len(blob)]:
        out.append(blob[last:p])
        last = p
    return [c for c in out if c]


@settings(max_examples=150, deadline=None)
@given(st.lists(ctrl_requests, max_size=12), st.booleans(), st.lists(st.integers(0, 10**6)))
def test_ctrl_requests_survive_any_split(
    reqs: list[w.Request], short: bool, cuts: list[int]
) -> None:
    blob = b"".join(w.encode_request(r, short_locality=short) for r in reqs)
    events = drive(split(blob, cuts))
    assert events[:-1] == reqs


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 10**6), max_size=5))
def test_ctrl_garbage_gives_only_remote_errors(blob: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        drive(split(blob, cuts))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 10**6), max_size=5))
def test_frame_and_mssim_garbage_gives_only_remote_errors(blob: bytes, cuts: list[int]) -> None:
    for decode in (server_events, mssim_events):
        with contextlib.suppress(RemoteProtocolError):
            decode(split(blob, cuts))


frames = st.builds(
    lambda tag, code, body: (
        tag.to_bytes(2, "big")
        + (10 + len(body)).to_bytes(4, "big")
        + code.to_bytes(4, "big")
        + body
    ),
    st.sampled_from([0x8001, 0x8002, 0x00C1]),
    u32,
    st.binary(max_size=100),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(frames, max_size=8), st.lists(st.integers(0, 10**6)))
def test_frames_and_mssim_survive_any_split(cmds: list[bytes], cuts: list[int]) -> None:
    blob = b"".join(cmds)
    assert [e.data for e in server_events(split(blob, cuts))[:-1]] == cmds  # type: ignore[attr-defined]
    client = m.MssimClientConnection()
    wire = b""
    for i, c in enumerate(cmds):
        wire += client.send(m.SendCommand(i % 5, c))
        client = m.MssimClientConnection()
    got = mssim_events(split(wire, cuts))
    assert got[:-1] == [m.SendCommand(i % 5, c) for i, c in enumerate(cmds)]


def client_events(
    conn: w.ControlClientConnection | m.MssimClientConnection | m.PlatformClientConnection,
    requests: list[object],
    chunks: list[bytes],
) -> list[object]:
    """Send each request in turn and decode its answer from `chunks` (then end of stream)."""
    out: list[object] = []
    pending = list(requests)
    feed = [*chunks, b""]
    conn.send(pending.pop(0))  # type: ignore[arg-type]
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            if not feed:
                return out
            conn.receive_data(feed.pop(0))
            continue
        out.append(ev)
        if ev is CLOSED:
            return out
        if pending:
            conn.send(pending.pop(0))  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(ctrl_requests, min_size=1, max_size=4),
    st.binary(max_size=200),
    st.lists(st.integers(0, 10**6), max_size=5),
)
def test_ctrl_client_garbage_gives_only_remote_errors(
    reqs: list[w.Request], blob: bytes, cuts: list[int]
) -> None:
    with contextlib.suppress(RemoteProtocolError):
        client_events(w.ControlClientConnection(max_message=64), list(reqs), split(blob, cuts))


ctrl_answers = st.sampled_from(
    [
        (w.GetCapability(), w.CapabilityResult(0, 0xFFFF)),
        (w.Init(0), w.Result(0)),
        (w.GetTpmEstablished(), w.EstablishedResult(0, True)),
        (w.GetStateBlob(1, 1, 0), w.StateBlobResult(0, 2, 9, b"abc")),
        (w.GetStateBlob(1, 2, 0), w.Result(9)),
        (w.GetConfig(), w.ConfigResult(0, 3)),
        (w.SetBufferSize(0), w.BufferSizeResult(0, 4096, 2808, 4096)),
        (w.GetInfo(1, 0), w.InfoResult(0, 2, b"{}")),
    ]
)


@settings(max_examples=150, deadline=None)
@given(st.lists(ctrl_answers, min_size=1, max_size=8), st.lists(st.integers(0, 10**6)))
def test_ctrl_answers_survive_any_split(
    pairs: list[tuple[w.Request, w.Response]], cuts: list[int]
) -> None:
    blob = b"".join(w.encode_response(rsp, type(req)) for req, rsp in pairs)
    got = client_events(w.ControlClientConnection(), [r for r, _ in pairs], split(blob, cuts))
    assert len(got) == len(pairs) + 1 and got[-1] is CLOSED
    for (_, want), have in zip(pairs, got, strict=False):
        assert getattr(have, "result", None) == want.result
        if not isinstance(want, w.Result):
            assert have == want


mssim_requests = st.one_of(
    st.builds(m.SendCommand, st.integers(0, 255), st.binary(max_size=40)),
    st.builds(m.HashStart),
    st.builds(m.HashData, st.binary(max_size=40)),
    st.builds(m.HashEnd),
    st.builds(m.RemoteHandshake, u32),
)
platform_requests = st.one_of(
    st.builds(m.PlatformSignal, st.sampled_from([c for c in m.PlatformCode if c < 20])),
    st.builds(m.GetCommandResponseSizes),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(mssim_requests, min_size=1, max_size=4),
    st.lists(platform_requests, min_size=1, max_size=4),
    st.binary(max_size=200),
    st.lists(st.integers(0, 10**6), max_size=5),
)
def test_mssim_clients_garbage_gives_only_remote_errors(
    reqs: list[m.TpmPortRequest],
    signals: list[m.PlatformRequest],
    blob: bytes,
    cuts: list[int],
) -> None:
    with contextlib.suppress(RemoteProtocolError):
        client_events(m.MssimClientConnection(max_response=64), list(reqs), split(blob, cuts))
    with contextlib.suppress(RemoteProtocolError):
        client_events(m.PlatformClientConnection(), list(signals), split(blob, cuts))


def platform_events(chunks: list[bytes]) -> list[object]:
    conn = m.PlatformServerConnection()
    out: list[object] = []
    for chunk in [*chunks, b""]:
        conn.receive_data(chunk)
        while (ev := conn.next_event()) is not NEED_DATA:
            out.append(ev)
            if ev is CLOSED:
                return out
            if isinstance(ev, m.GetCommandResponseSizes):
                conn.send(m.SizesResponse(4096, 4096))
            elif isinstance(ev, m.PlatformSignal):
                conn.send(m.PlatformAck())
    return out


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 10**6), max_size=5))
def test_platform_garbage_gives_only_remote_errors(blob: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        platform_events(split(blob, cuts))


@settings(max_examples=150, deadline=None)
@given(st.lists(platform_requests, max_size=10), st.lists(st.integers(0, 10**6)))
def test_platform_requests_survive_any_split(
    reqs: list[m.PlatformRequest], cuts: list[int]
) -> None:
    blob = b"".join(m.PlatformClientConnection().send(r) for r in reqs)
    assert platform_events(split(blob, cuts)) == [*reqs, CLOSED]
