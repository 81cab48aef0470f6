"""The typed admin protocol: one table of (operation, JSON arguments, request) run in both
directions, the bounds and forms a peer's request must keep, and results back to types."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from vtpm.endpoints import Endpoint, Frontend, FrontendKind
from vtpm.errors import RemoteProtocolError, RequestError
from vtpm.tpm.policy import PcrState
from vtpm.wire import admin as api
from vtpm.wire import ipc, typedjson

U = uuid.UUID("0c3e1a7e-7d0f-4b8e-9c51-5a2b1f0d9e11")
CTRL = Frontend(FrontendKind.CTRL, Endpoint("unix", path="/run/vtpm/g1.ctrl"))
SERVER = Frontend(FrontendKind.SERVER, Endpoint("tcp", host="127.0.0.1", port=2321))

TABLE: list[tuple[str, dict[str, Any], api.Request[Any]]] = [
    ("status", {}, api.Status()),
    ("pcrs.read", {"pcrs": [0, 7, 23]}, api.PcrsRead((0, 7, 23))),
    (
        "group.new",
        {"name": "g", "owner_pub": "PEM", "pcrs": [0, 1], "labels": ["*:vm_r:vtpm_t"], "ak": "rsa"},
        api.GroupNew("g", "PEM", (0, 1), ("*:vm_r:vtpm_t",), "rsa"),
    ),
    ("group.list", {}, api.GroupList()),
    ("group.show", {"group": "g"}, api.GroupShow("g")),
    ("group.update", {"group": "g", "request": "{}"}, api.GroupUpdate("g", "{}")),
    ("group.del", {"group": "g"}, api.GroupDel("g")),
    ("group.provision", {"group": "g"}, api.GroupProvision("g")),
    (
        "group.activate",
        {"group": "g", "credential_blob": "00ff", "encrypted_secret": "abcd"},
        api.GroupActivate("g", b"\x00\xff", b"\xab\xcd"),
    ),
    (
        "vtpm.new",
        {
            "group": "g",
            "label": "guest1_u:vm_r:vtpm_t",
            "tpm": "1.2",
            "uuid": str(U),
            "owner_uid": 107,
            "owner_gid": 108,
            "frontends": ["ctrl=unix:/run/vtpm/g1.ctrl", "server=tcp:127.0.0.1:2321"],
            "start": True,
        },
        api.VtpmNew("g", "guest1_u:vm_r:vtpm_t", "1.2", U, 107, 108, (CTRL, SERVER), True),
    ),
    ("vtpm.list", {"group": "g"}, api.VtpmList("g")),
    ("vtpm.show", {"uuid": str(U)}, api.VtpmShow(U)),
    ("vtpm.start", {"uuid": str(U)}, api.VtpmStart(U)),
    ("vtpm.stop", {"uuid": str(U)}, api.VtpmStop(U)),
    ("vtpm.del", {"uuid": str(U)}, api.VtpmDel(U)),
    ("vtpm.accept-state", {"uuid": str(U)}, api.VtpmAcceptState(U)),
    ("vtpm.certs", {"uuid": str(U)}, api.VtpmCerts(U)),
    (
        "vtpm.launch",
        {"uuid": str(U), "record": {"measurements": []}, "label": "a_u:vm_r:vtpm_t"},
        api.VtpmLaunch(U, {"measurements": []}, "a_u:vm_r:vtpm_t"),
    ),
    ("vtpm.launch.cancel", {"uuid": str(U)}, api.VtpmLaunchCancel(U)),
    ("vtpm.ek.provision", {"uuid": str(U), "eks": ["ecc384"]}, api.VtpmEkProvision(U, ("ecc384",))),
    (
        "quote.deep",
        {"uuid": str(U), "nonce": "0a1b", "pcrs": [0], "vtpm_pcrs": [4, 5]},
        api.QuoteDeep(U, b"\x0a\x1b", (0,), (4, 5)),
    ),
    ("audit", {"limit": 7}, api.Audit(7)),
]


def test_the_table_covers_every_operation() -> None:
    assert sorted(op for op, _, _ in TABLE) == sorted(api.REQUESTS)


@pytest.mark.parametrize(("op", "args", "req"), TABLE, ids=[t[0] for t in TABLE])
def test_request_both_directions(op: str, args: dict[str, Any], req: api.Request[Any]) -> None:
    assert api.parse_request(ipc.AdminRequest(op, args)) == req
    frame = api.request_frame(req)
    assert frame.op == op
    # defaults may travel too; what was given travels as given
    assert {k: v for k, v in frame.args.items() if k in args} == args
    assert api.parse_request(frame) == req
    # through the real framing, in bytes, both roles
    peer, mgr = ipc.IpcConnection(ipc.Role.PEER), ipc.IpcConnection(ipc.Role.MANAGER)
    mgr.receive_data(peer.send(frame))
    got = mgr.next_event()
    assert isinstance(got, ipc.AdminRequest)
    assert api.parse_request(got) == req


BAD = [
    ("nope", {}, "unknown operation"),
    ("vtpm.show", {}, "missing field uuid"),
    ("vtpm.show", {"uuid": "not-a-uuid"}, "is not a uuid"),
    ("vtpm.show", {"uuid": str(U), "extra": 1}, "unknown field(s) extra"),
    ("vtpm.new", {"group": "g", "label": "l", "owner_uid": 4294967296}, "outside 0..4294967294"),
    ("vtpm.new", {"group": "g", "label": "l", "owner_uid": -1}, "outside"),
    ("vtpm.new", {"group": "g", "label": "l", "owner_uid": True}, "expected int"),
    ("vtpm.new", {"group": "g", "label": "l", "frontends": ["ftp=x"]}, "frontends[0]"),
    ("vtpm.new", {"group": "g", "label": "l", "frontends": ["mssim=unix:/x"]}, "TCP only"),
    ("audit", {"limit": 2**63}, "outside 1..100000"),
    ("audit", {"limit": 0}, "outside 1..100000"),
    ("pcrs.read", {"pcrs": [24]}, "outside 0..23"),
    ("pcrs.read", {"pcrs": "0-7"}, "expected a list"),
    ("quote.deep", {"uuid": str(U), "nonce": "xyz"}, "expected hex"),
    ("group.show", {"group": 5}, "expected str"),
]


@pytest.mark.parametrize(("op", "args", "why"), BAD)
def test_bad_requests_are_request_errors(op: str, args: dict[str, Any], why: str) -> None:
    with pytest.raises(RequestError) as e:
        api.parse_request(ipc.AdminRequest(op, args))
    assert why in str(e.value)


def _view() -> api.VtpmView:
    run = api.RunView("running", True, 4242, 1, None, "", "/var/log/x.log")
    return api.VtpmView(U, "g", "guest1_u:vm_r:vtpm_t", "2.0", None, None, (CTRL,), "/d", {}, run)


def test_results_come_back_as_their_types() -> None:
    view = _view()
    reply = api.reply_frame(api.VtpmShow(U), view)
    assert reply.result == {
        "uuid": str(U),
        "group": "g",
        "label": "guest1_u:vm_r:vtpm_t",
        "tpm": "2.0",
        "owner_uid": None,
        "owner_gid": None,
        "frontends": ["ctrl=unix:/run/vtpm/g1.ctrl"],
        "state_dir": "/d",
        "state_blobs": {},
        "run": {
            "state": "running",
            "wanted_running": True,
            "pid": 4242,
            "restarts": 1,
            "last_exit": None,
            "failed": "",
            "log": "/var/log/x.log",
            "tpm_failed": "",
        },
    }
    assert api.parse_result(api.VtpmShow(U), reply) == view
    listed = api.parse_result(api.VtpmList(), api.reply_frame(api.VtpmList(), (view, view)))
    assert listed == (view, view)
    assert api.parse_result(api.VtpmDel(U), api.reply_frame(api.VtpmDel(U), None)) is None
    state = PcrState((0, 7), (bytes(32), b"\x01" * 32))
    group = api.GroupView(
        U, "g", 3, "PEM", ("a",), (state,), True, "ecc", 2, api.GroupStatusView(False, "x", None)
    )
    assert api.parse_result(api.GroupShow("g"), api.reply_frame(api.GroupShow("g"), group)) == group


def test_a_result_outside_the_protocol_is_a_remote_error() -> None:
    reply = ipc.AdminReply(True, {"uuid": str(U)})
    with pytest.raises(RemoteProtocolError, match="outside the protocol"):
        api.parse_result(api.VtpmShow(U), reply)
    with pytest.raises(RemoteProtocolError):
        api.parse_result(api.Audit(), ipc.AdminReply(True, [{"id": "one"}]))


def test_json_of_a_value_needs_no_protocol() -> None:
    assert typedjson.encode((U, b"\x01", CTRL, None)) == [str(U), "01", str(CTRL), None]
