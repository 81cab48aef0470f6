"""Manager IPC codec properties: valid event streams split anywhere decode to the same events;
garbage (random, framed, or a mutated valid stream) raises only RemoteProtocolError."""

from __future__ import annotations

import contextlib
import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.test_wire_ipc import drive
from vtpm.errors import RemoteProtocolError
from vtpm.wire import ipc as w
from vtpm.wire._common import CLOSED

MANAGER, PEER = w.Role.MANAGER, w.Role.PEER


def depth(value: w.JSONValue) -> int:
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    return 0


names = st.from_regex(r"[a-z0-9_]{1,32}", fullmatch=True)
digests = st.binary(min_size=32, max_size=32)
u64 = st.integers(0, 2**64 - 1)
json_values: st.SearchStrategy[w.JSONValue] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(w.MIN_JSON_INT, w.MAX_JSON_INT)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
).filter(lambda v: depth(v) <= w.MAX_JSON_DEPTH - 1)
json_objects = st.dictionaries(st.text(max_size=6), json_values, max_size=4)

peer_events: st.SearchStrategy[w.PeerEvent] = st.one_of(
    st.builds(w.Hello, st.uuids()),
    st.builds(w.StateWritten, names, u64, digests),
    st.builds(w.StateDeleted, names),
    st.builds(w.Goodbye),
    st.builds(w.Ready),
    st.builds(w.AdminRequest, st.text(min_size=1, max_size=12), json_objects),
)
manager_events: st.SearchStrategy[w.ManagerEvent] = st.one_of(
    st.builds(
        w.KeyGrant,
        st.binary(min_size=32, max_size=32),
        st.lists(st.tuples(names, digests), max_size=8, unique_by=lambda t: t[0]).map(tuple),
    ),
    st.builds(w.Refused, st.text(max_size=256)),  # at most 4 bytes a character
    st.builds(w.Ack),
    st.builds(w.AdminReply, st.just(True), json_values),
    st.builds(lambda e: w.AdminReply(False, error=e), st.text(max_size=40)),
)
cut_points = st.lists(st.integers(0, 10**6), max_size=12)


def split(blob: bytes, cuts: list[int]) -> list[bytes]:
    """`blob` cut at the given points (modulo its length), without empty chunks."""
    points = sorted({c % (len(blob) + 1) for c in cuts} | {0, len(blob)})
    return [blob[a:b] for a, b in itertools.pairwise(points) if b > a]


@settings(max_examples=200, deadline=None)
@given(st.lists(peer_events, max_size=10), cut_points)
def test_peer_streams_survive_any_split(events: list[w.PeerEvent], cuts: list[int]) -> None:
    sender = w.IpcConnection(PEER)
    blob = b"".join(sender.send(ev) for ev in events)
    assert drive(MANAGER, split(blob, cuts)) == [*events, CLOSED]


@settings(max_examples=200, deadline=None)
@given(st.lists(manager_events, max_size=10), cut_points)
def test_manager_streams_survive_any_split(events: list[w.ManagerEvent], cuts: list[int]) -> None:
    sender = w.IpcConnection(MANAGER)
    blob = b"".join(sender.send(ev) for ev in events)
    assert drive(PEER, split(blob, cuts)) == [*events, CLOSED]


roles = st.sampled_from([MANAGER, PEER])
max_frames = st.sampled_from([w.MIN_MAX_FRAME, w.DEFAULT_MAX_FRAME])


@settings(max_examples=400, deadline=None)
@given(roles, max_frames, st.binary(max_size=300), st.lists(st.integers(0, 10**6), max_size=5))
def test_random_garbage_gives_only_remote_errors(
    role: w.Role, max_frame: int, blob: bytes, cuts: list[int]
) -> None:
    with contextlib.suppress(RemoteProtocolError):
        drive(role, split(blob, cuts), max_frame=max_frame)


json_ish = st.one_of(
    st.binary(max_size=80),
    st.text(alphabet='{}[]":,0123456789.eE+-truefalsnNIiy \\u"', max_size=80).map(str.encode),
)
framed_garbage = st.builds(
    lambda kind, body: (len(body) + 1).to_bytes(4, "big") + bytes([kind]) + body,
    st.integers(0, 0x30) | st.sampled_from(list(w.MessageType)),
    st.one_of(st.binary(max_size=120), json_ish),
)


@settings(max_examples=400, deadline=None)
@given(roles, st.lists(framed_garbage, min_size=1, max_size=4), cut_points)
def test_well_framed_garbage_gives_only_remote_errors(
    role: w.Role, frames: list[bytes], cuts: list[int]
) -> None:
    with contextlib.suppress(RemoteProtocolError):
        drive(role, split(b"".join(frames), cuts))


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.tuples(st.just(PEER), st.lists(peer_events, min_size=1, max_size=4)),
        st.tuples(st.just(MANAGER), st.lists(manager_events, min_size=1, max_size=4)),
    ),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255), st.integers(0, 2)), max_size=4),
    cut_points,
)
def test_mutated_streams_give_events_or_remote_errors(
    stream: tuple[w.Role, list[w.PeerEvent] | list[w.ManagerEvent]],
    edits: list[tuple[int, int, int]],
    cuts: list[int],
) -> None:
    sender_role, events = stream
    sender = w.IpcConnection(sender_role)
    blob = bytearray(b"".join(sender.send(ev) for ev in events))
    for pos, value, how in edits:  # overwrite, insert or delete one byte
        i = pos % (len(blob) + 1)
        if how == 0 and i < len(blob):
            blob[i] = value
        elif how == 1:
            blob.insert(i, value)
        elif i < len(blob):
            del blob[i]
    receiver = MANAGER if sender_role is PEER else PEER
    with contextlib.suppress(RemoteProtocolError):
        drive(receiver, split(bytes(blob), cuts))
