"""Property tests: random valid streams split anywhere decode alike; garbage yields only the
remote protocol error."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_wire_ctrl import drive
from tests.unit.test_wire_frames import mssim_events, server_events
from vtpm.errors import RemoteProtocolError
from vtpm.wire import ctrl as w
from vtpm.wire import mssim as m

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
