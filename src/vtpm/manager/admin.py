"""The Manager's admin socket: one request, one reply, JSON over the IPC framing.

Who may connect is settled by the socket (0600 to the Manager's user, or 0660 to the admin
group) and checked again per connection with SO_PEERCRED. Each operation validates its own
arguments; expected failures come back as `{"ok": false, "error": "..."}`, anything else is
logged and answered with a generic error, never a traceback.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

from vtpm.errors import ConfigError, RemoteProtocolError, VtpmError
from vtpm.launchrecord import LaunchRecord
from vtpm.listen import peer_credentials
from vtpm.manager import launch
from vtpm.manager.store import GroupRecord, VtpmRecord
from vtpm.tpm.policy import check_pcrs
from vtpm.wire import ipc
from vtpm.wire._common import CLOSED, NEED_DATA

if TYPE_CHECKING:
    from vtpm.manager.service import Manager

log = logging.getLogger(__name__)

Args = dict[str, ipc.JSONValue]
Op = Callable[["Manager", Args, str], ipc.JSONValue]


# argument helpers --------------------------------------------------------------------------


def _str(args: Args, key: str, default: str | None = None) -> str:
    v = args.get(key, default)
    if not isinstance(v, str) or not v:
        raise ConfigError(f"argument {key!r} must be a non-empty string")
    return v


def _opt_int(args: Args, key: str) -> int | None:
    v = args.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise ConfigError(f"argument {key!r} must be a non-negative integer")
    return v


def _str_list(args: Args, key: str) -> list[str]:
    v = args.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"argument {key!r} must be a list of strings")
    return [str(x) for x in v]


def _int_list(args: Args, key: str) -> list[int]:
    v = args.get(key, [])
    if not isinstance(v, list) or not all(
        isinstance(x, int) and not isinstance(x, bool) for x in v
    ):
        raise ConfigError(f"argument {key!r} must be a list of integers")
    return [int(x) for x in v]  # type: ignore[arg-type]


# views -------------------------------------------------------------------------------------


def group_view(m: Manager, g: GroupRecord) -> dict[str, ipc.JSONValue]:
    st = m.groups.status(g.uuid)
    return {
        "uuid": str(g.uuid),
        "name": g.name,
        "seq": g.seq,
        "owner_pub": g.owner_pub.decode(),
        "labels": list(g.labels),
        "pcr_states": [s.to_json() for s in g.pcr_states],  # type: ignore[misc]
        "owner_approved": bool(g.approval),
        "ak": g.ak_alg or None,
        "vtpms": len(m.store.vtpms(g.uuid)),
        "status": st.to_json(),  # type: ignore[dict-item]
    }


def vtpm_view(m: Manager, v: VtpmRecord) -> dict[str, ipc.JSONValue]:
    g = m.store.group(str(v.group_uuid))
    return {
        "uuid": str(v.uuid),
        "group": g.name if g else str(v.group_uuid),
        "label": v.label,
        "tpm": v.tpm,
        "owner_uid": v.owner_uid,
        "owner_gid": v.owner_gid,
        "frontends": list(v.frontends),
        "state_dir": str(m.config.vtpm_dir(v.uuid)),
        "state_blobs": {d.name: d.digest.hex() for d in m.store.state_digests(v.uuid)},
        "run": m.vtpm_state(v),  # type: ignore[dict-item]
    }


# operations --------------------------------------------------------------------------------


def op_status(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    m.groups.refresh()
    hw: dict[str, ipc.JSONValue] = {
        "description": m.hw.description if m.hw else "",
        "simulated": m.simulator is not None,
        "tcti": m.hw.tcti if m.hw else "",
    }
    if m.simulator is not None:
        hw["note"] = (
            f"no hardware TPM configured: a swtpm simulator stands in for it "
            f"(pid {m.simulator.pid}, state in {m.config.simulator_dir}); it protects nothing"
        )
    vtpms = m.store.vtpms()
    return {
        "pid": os.getpid(),
        "data_dir": str(m.config.data_dir),
        "uptime": round(time.time() - m.started, 1),
        "hardware_tpm": hw,
        "groups": [group_view(m, g) for g in m.store.groups()],
        "vtpms": {
            "total": len(vtpms),
            "running": len(m.supervisor.running()),
        },
        "instance_pids": list(m.supervisor.pids()),
    }


def op_pcrs(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    assert m.hw is not None
    pcrs = check_pcrs(_int_list(args, "pcrs") or list(range(8)))
    return {str(i): v.hex() for i, v in m.hw.read_pcrs(pcrs).items()}


def op_group_new(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    g = m.new_group(
        _str(args, "name"),
        _str(args, "owner_pub").encode(),
        _int_list(args, "pcrs") or list(range(8)),
        _str_list(args, "labels"),
        actor,
        _str(args, "ak", "ecc"),
    )
    return group_view(m, g)


def _hex(args: Args, key: str) -> bytes:
    try:
        return bytes.fromhex(_str(args, key))
    except ValueError:
        raise ConfigError(f"argument {key!r} must be hex") from None


def op_group_provision(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    return m.provision(_str(args, "group")).to_json()


def op_group_activate(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    secret = m.activate_credential(
        _str(args, "group"),
        _hex(args, "credential_blob"),
        _hex(args, "encrypted_secret"),
        actor=actor,
    )
    return {"secret": secret.hex()}


def op_group_list(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    m.groups.refresh()
    return [group_view(m, g) for g in m.store.groups()]


def op_group_show(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    m.groups.refresh()
    return group_view(m, m.group(_str(args, "group")))


def op_group_update(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    g = m.update_group(_str(args, "group"), _str(args, "request").encode(), actor)
    return group_view(m, g)


def op_group_del(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    m.delete_group(_str(args, "group"), actor)
    return None


def op_vtpm_new(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    uid, gid = _opt_int(args, "owner_uid"), _opt_int(args, "owner_gid")
    raw_uuid = args.get("uuid")
    try:
        u = uuid.UUID(raw_uuid) if isinstance(raw_uuid, str) else None
    except ValueError:
        raise ConfigError(f"{raw_uuid!r} is not a uuid") from None
    rec = m.new_vtpm(
        _str(args, "group"),
        _str(args, "label"),
        tpm=_str(args, "tpm", "2.0"),
        vtpm_uuid=u,
        owner=None if uid is None else (uid, gid if gid is not None else uid),
        frontends=_str_list(args, "frontends"),
        actor=actor,
    )
    if args.get("start"):
        m.start_vtpm(rec.uuid, actor=actor)
    return vtpm_view(m, m.vtpm(str(rec.uuid)))


def op_vtpm_list(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    group = args.get("group")
    g = m.group(str(group)).uuid if group else None
    return [vtpm_view(m, v) for v in m.store.vtpms(g)]


def op_vtpm_show(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    return vtpm_view(m, m.vtpm(_str(args, "uuid")))


def op_vtpm_start(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    rec = m.vtpm(_str(args, "uuid"))
    m.start_vtpm(rec.uuid, actor=actor)
    return vtpm_view(m, m.vtpm(str(rec.uuid)))


def op_vtpm_stop(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    rec = m.vtpm(_str(args, "uuid"))
    m.stop_vtpm(rec.uuid, actor=actor)
    return vtpm_view(m, m.vtpm(str(rec.uuid)))


def op_vtpm_del(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    m.delete_vtpm(m.vtpm(_str(args, "uuid")).uuid, actor=actor)
    return None


def op_vtpm_launch(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    rec = m.vtpm(_str(args, "uuid"))
    label = args.get("label")
    if label is not None and not isinstance(label, str):
        raise ConfigError("argument 'label' must be a string")
    record = LaunchRecord.from_json(args.get("record"))
    placed = launch.launch(m, rec.uuid, record, label=label, actor=actor)
    return {
        "vtpm": vtpm_view(m, m.vtpm(str(rec.uuid))),
        "launch_file": str(launch.record_path(m, rec.uuid)),
        "record": placed.to_json(),  # type: ignore[dict-item]
    }


def op_vtpm_launch_cancel(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    rec = m.vtpm(_str(args, "uuid"))
    launch.cancel(m, rec.uuid, actor=actor)
    return vtpm_view(m, m.vtpm(str(rec.uuid)))


def op_quote_deep(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    rec = m.vtpm(_str(args, "uuid"))
    try:
        nonce = bytes.fromhex(_str(args, "nonce"))
    except ValueError:
        raise ConfigError("argument 'nonce' must be hex") from None
    host = tuple(check_pcrs(_int_list(args, "pcrs"))) if args.get("pcrs") else ()
    mine = tuple(check_pcrs(_int_list(args, "vtpm_pcrs"))) if args.get("vtpm_pcrs") else ()
    ev = m.deep_quote_host(rec.uuid, nonce, host, mine)
    return ev.to_json()


def op_audit(m: Manager, args: Args, actor: str) -> ipc.JSONValue:
    limit = _opt_int(args, "limit") or 50
    return [
        {
            "id": e.id,
            "ts": e.ts,
            "actor": e.actor,
            "action": e.action,
            "target": e.target,
            "outcome": e.outcome,
            "detail": e.detail,
        }
        for e in m.store.audit_log(limit)
    ]


OPS: dict[str, Op] = {
    "status": op_status,
    "pcrs.read": op_pcrs,
    "group.new": op_group_new,
    "group.list": op_group_list,
    "group.show": op_group_show,
    "group.update": op_group_update,
    "group.del": op_group_del,
    "group.provision": op_group_provision,
    "group.activate": op_group_activate,
    "vtpm.new": op_vtpm_new,
    "vtpm.list": op_vtpm_list,
    "vtpm.show": op_vtpm_show,
    "vtpm.start": op_vtpm_start,
    "vtpm.stop": op_vtpm_stop,
    "vtpm.del": op_vtpm_del,
    "vtpm.launch": op_vtpm_launch,
    "vtpm.launch.cancel": op_vtpm_launch_cancel,
    "audit": op_audit,
    "quote.deep": op_quote_deep,
}


class AdminHandler:
    """Serves one admin connection (a `listen.Handler`)."""

    def __init__(self, manager: Manager) -> None:
        self._m = manager

    def __call__(self, conn: socket.socket, peer: str) -> None:
        creds = peer_credentials(conn)
        actor = f"uid={creds[1]} pid={creds[0]}" if creds else peer
        codec = ipc.IpcConnection(ipc.Role.MANAGER)
        try:
            while True:
                ev = codec.next_event()
                if ev is NEED_DATA:
                    codec.receive_data(conn.recv(65536))
                    continue
                if ev is CLOSED:
                    return
                if not isinstance(ev, ipc.AdminRequest):
                    raise RemoteProtocolError(f"{type(ev).__name__} on the admin socket")
                conn.sendall(codec.send(self._dispatch(ev, actor)))
        except RemoteProtocolError as e:
            log.warning("admin peer %s dropped: %s", actor, e)
        except OSError:
            return

    def _dispatch(self, req: ipc.AdminRequest, actor: str) -> ipc.AdminReply:
        op = OPS.get(req.op)
        if op is None:
            return ipc.AdminReply(False, error=f"unknown operation {req.op!r}")
        try:
            return ipc.AdminReply(True, op(self._m, dict(req.args), actor))
        except VtpmError as e:
            return ipc.AdminReply(False, error=str(e))
        except Exception:
            log.exception("admin operation %s failed", req.op)
            return ipc.AdminReply(False, error=f"internal error in {req.op}; see the Manager's log")
