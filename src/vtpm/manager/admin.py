"""The Manager's admin socket: one typed request (`vtpm.wire.admin`), one typed result.

Who may connect is settled by the socket (0600 to the Manager's user, or 0660 to the admin
group) and checked again per connection with SO_PEERCRED. A request that is not of the
protocol's form, or whose content is invalid, is answered with the reason; expected failures
come back as `{"ok": false, "error": "..."}`; anything else is logged and answered with a
generic error, never a traceback.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vtpm.errors import RemoteProtocolError, VtpmError
from vtpm.launchrecord import LaunchRecord
from vtpm.listen import peer_credentials
from vtpm.manager import launchfiles, lookup
from vtpm.manager.ca import GroupCa
from vtpm.manager.config import ManagerConfig
from vtpm.manager.groupops import GroupOps
from vtpm.manager.groups import GroupKeys
from vtpm.manager.hwtpm import HardwareTpm
from vtpm.manager.launch import Launches
from vtpm.manager.quotes import DeepQuotes
from vtpm.manager.store import GroupRecord, Store, VtpmRecord
from vtpm.manager.supervisor import Supervisor
from vtpm.manager.vtpms import VtpmRegistry
from vtpm.serving import ConnectionLostError, IdleTimeoutError, events
from vtpm.tpm.policy import check_pcrs
from vtpm.wire import admin as api
from vtpm.wire import ipc, typedjson

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Services:
    """What the admin operations act on (built by the Manager when it opens)."""

    config: ManagerConfig
    store: Store
    hw: HardwareTpm
    hw_note: Callable[[], str]  # why the "hardware" TPM is not one, or ""
    groups: GroupKeys
    group_ops: GroupOps
    ca: GroupCa
    vtpms: VtpmRegistry
    launches: Launches
    quotes: DeepQuotes
    supervisor: Supervisor
    started: float
    sweep: Callable[[], None] = lambda: None  # delete the vTPMs their orchestrator removed


class AdminService:
    def __init__(self, s: Services) -> None:
        self._s = s

    # views ------------------------------------------------------------------------------

    def group_view(self, g: GroupRecord) -> api.GroupView:
        st = self._s.groups.status(g.uuid)
        return api.GroupView(
            uuid=g.uuid,
            name=g.name,
            seq=g.seq,
            owner_pub=g.owner_pub.decode(),
            labels=tuple(g.labels),
            pcr_states=tuple(g.pcr_states),
            owner_approved=bool(g.approval),
            ak=g.ak_alg or None,
            vtpms=len(self._s.store.vtpms(g.uuid)),
            status=api.GroupStatusView(
                unlocked=st.unlocked,
                reason=st.reason,
                matched_state=st.matched,
                differing_pcrs={str(k): v for k, v in sorted(st.differing.items())},
            ),
            approval_epoch=self._s.groups.epoch(g),
        )

    def vtpm_view(self, v: VtpmRecord) -> api.VtpmView:
        s = self._s
        g = s.store.group(str(v.group_uuid))
        child = s.supervisor.status(v.uuid)
        run = (
            api.RunView("stopped", v.wanted_running)
            if child is None
            else api.RunView(
                child.state,
                v.wanted_running,
                child.pid,
                child.restarts,
                child.last_exit,
                child.failed,
                str(child.log_file),
                child.tpm_failed,
            )
        )
        loc = s.store.location(v.uuid)
        return api.VtpmView(
            uuid=v.uuid,
            group=g.name if g else str(v.group_uuid),
            label=v.label,
            tpm=v.tpm,
            owner_uid=v.owner_uid,
            owner_gid=v.owner_gid,
            frontends=s.vtpms.instance(v).frontends,
            state_dir=str(s.config.vtpm_dir(v.uuid)) if loc is None else loc.path,
            state_blobs={d.name: d.digest.hex() for d in s.store.state_digests(v.uuid)},
            run=run,
        )

    def _vtpm(self, ref: object) -> api.VtpmView:
        return self.vtpm_view(lookup.vtpm(self._s.store, str(ref)))

    def status(self) -> api.StatusView:
        s = self._s
        s.groups.refresh()  # a fresh PCR read: it notices (and may end) an outage
        health = s.hw.health
        return api.StatusView(
            pid=os.getpid(),
            data_dir=str(s.config.data_dir),
            uptime=round(time.time() - s.started, 1),
            hardware_tpm=api.HardwareTpmView(
                s.hw.description,
                bool(s.hw_note()),
                s.hw.tcti,
                s.hw_note(),
                health.state,
                health.error,
            ),
            groups=tuple(self.group_view(g) for g in s.store.groups()),
            vtpms=api.VtpmCounts(len(s.store.vtpms()), len(s.supervisor.running())),
            instance_pids=tuple(s.supervisor.pids()),
        )

    # dispatch ---------------------------------------------------------------------------

    def handle(self, req: api.Request[Any], actor: str) -> object:
        """The result of one request (a value of `type(req).result`)."""
        s = self._s
        match req:
            case api.Status():
                return self.status()
            case api.PcrsRead(pcrs=pcrs):
                values = s.hw.read_pcrs(check_pcrs(list(pcrs or api.PCRS_DEFAULT)))
                return {str(i): v.hex() for i, v in values.items()}
            case api.GroupNew(name=name, owner_pub=pub, pcrs=pcrs, labels=labels, ak=ak):
                g = s.group_ops.new(name, pub.encode(), pcrs or api.PCRS_DEFAULT, labels, actor, ak)
                return self.group_view(g)
            case api.GroupList():
                s.groups.refresh()
                return tuple(self.group_view(g) for g in s.store.groups())
            case api.GroupShow(group=ref):
                s.groups.refresh()
                return self.group_view(lookup.group(s.store, ref))
            case api.GroupUpdate(group=ref, request=request):
                return self.group_view(s.group_ops.update(ref, request.encode(), actor))
            case api.GroupDel(group=ref):
                s.group_ops.delete(ref, actor)
                return None
            case api.GroupProvision(group=ref):
                return s.group_ops.provision(ref)
            case api.GroupActivate(group=ref, credential_blob=blob, encrypted_secret=secret):
                return api.ActivateResult(
                    s.group_ops.activate_credential(ref, blob, secret, actor=actor)
                )
            case api.VtpmNew():
                return self._new(req, actor)
            case api.VtpmList(group=ref):
                s.sweep()
                group_uuid = lookup.group(s.store, ref).uuid if ref else None
                return tuple(self.vtpm_view(v) for v in s.store.vtpms(group_uuid))
            case api.VtpmShow(uuid=u):
                s.sweep()
                return self._vtpm(u)
            case api.VtpmAcceptState(uuid=u):
                s.vtpms.accept_state(lookup.vtpm(s.store, u).uuid, actor=actor)
                return self._vtpm(u)
            case api.VtpmStart(uuid=u):
                s.vtpms.start(lookup.vtpm(s.store, u).uuid, actor=actor)
                return self._vtpm(u)
            case api.VtpmStop(uuid=u):
                s.vtpms.stop(lookup.vtpm(s.store, u).uuid, actor=actor)
                return self._vtpm(u)
            case api.VtpmDel(uuid=u):
                s.vtpms.delete(lookup.vtpm(s.store, u).uuid, actor=actor)
                return None
            case api.VtpmCerts(uuid=u):
                return s.ca.view(lookup.vtpm(s.store, u))
            case api.VtpmEkProvision(uuid=u, eks=eks):
                s.vtpms.provision_eks(lookup.vtpm(s.store, u).uuid, eks, actor=actor)
                return self._vtpm(u)
            case api.VtpmLaunch(uuid=u, record=raw, label=label):
                rec = lookup.vtpm(s.store, u)
                placed = s.launches.launch(
                    rec.uuid, LaunchRecord.from_json(raw), label=label, actor=actor
                )
                return api.LaunchResult(
                    self._vtpm(u),
                    str(launchfiles.record_path(s.config, rec.uuid)),
                    typedjson.encode(placed),
                )
            case api.VtpmLaunchCancel(uuid=u):
                s.launches.cancel(lookup.vtpm(s.store, u).uuid, actor=actor)
                return self._vtpm(u)
            case api.QuoteDeep(uuid=u, nonce=nonce, pcrs=host, vtpm_pcrs=mine):
                rec = lookup.vtpm(s.store, u)
                host = tuple(check_pcrs(list(host))) if host else ()
                mine = tuple(check_pcrs(list(mine))) if mine else ()
                return s.quotes.on_host(rec.uuid, nonce, host, mine)
            case api.Audit(limit=limit):
                return tuple(
                    api.AuditView(e.id, e.ts, e.actor, e.action, e.target, e.outcome, e.detail)
                    for e in s.store.audit_log(limit)
                )
        raise RemoteProtocolError(f"no handler for {req.op}")

    def _new(self, req: api.VtpmNew, actor: str) -> api.VtpmView:
        s = self._s
        owner = None
        if req.owner_uid is not None:
            owner = (req.owner_uid, req.owner_gid if req.owner_gid is not None else req.owner_uid)
        rec = s.vtpms.new(
            req.group,
            req.label,
            tpm=req.tpm,
            vtpm_uuid=req.uuid,
            owner=owner,
            frontends=req.frontends,
            eks=req.eks,
            actor=actor,
        )
        if req.start:
            s.vtpms.start(rec.uuid, actor=actor)
        return self._vtpm(rec.uuid)

    def answer(self, frame: ipc.AdminRequest, actor: str) -> ipc.AdminReply:
        """The reply to one admin frame: the result, or an error the peer may see."""
        try:
            req = api.parse_request(frame)
            return api.reply_frame(req, self.handle(req, actor))
        except VtpmError as e:
            return ipc.AdminReply(False, error=str(e))
        except Exception:
            log.exception("admin operation %s failed", frame.op)
            return ipc.AdminReply(
                False, error=f"internal error in {frame.op}; see the Manager's log"
            )


IDLE_TIMEOUT = 60.0  # seconds an admin client may stay silent between requests


class AdminHandler:
    """Serves one admin connection (a `listen.Handler`).

    A client silent for `idle_timeout` between requests is dropped, so idle connections cannot
    hold the socket's slots; a request in progress (a deep quote waiting for its batch) is
    not reading and is not cut short."""

    def __init__(self, service: AdminService, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._service = service
        self._idle_timeout = idle_timeout

    def __call__(self, conn: socket.socket, peer: str) -> None:
        creds = peer_credentials(conn)
        actor = f"uid={creds.uid} pid={creds.pid}" if creds else peer
        codec = ipc.IpcConnection(ipc.Role.MANAGER)
        try:
            for ev in events(conn, codec, idle_timeout=self._idle_timeout):
                if not isinstance(ev, ipc.AdminRequest):
                    raise RemoteProtocolError(f"{type(ev).__name__} on the admin socket")
                conn.sendall(codec.send(self._service.answer(ev, actor)))
        except RemoteProtocolError as e:
            log.warning("admin peer %s dropped: %s", actor, e)
        except IdleTimeoutError:
            log.debug("admin peer %s dropped: idle for %g s", actor, self._idle_timeout)
        except (ConnectionLostError, OSError):
            return

    @staticmethod
    def refuse(conn: socket.socket, reason: str) -> None:
        """Tell a peer the socket refused why, as the reply to the request it is sending (a
        `listen.Refuse`): the CLI shows it instead of a broken pipe."""
        reply = ipc.AdminReply(False, error=f"the Manager refused this user: {reason}")
        conn.send(ipc.IpcConnection(ipc.Role.MANAGER).send(reply))
