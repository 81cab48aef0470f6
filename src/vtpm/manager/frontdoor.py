"""The Manager's front door: the swtpm-compatible executables' socket (`vtpm.wire.compat`).

An orchestrator runs `swtpm_setup` and `swtpm socket` (vtpm's own) as its user; they connect
here, name the state location the orchestrator gave and pass descriptors: the location (a
directory or a file) and the listening sockets the orchestrator's process bound. The Manager
keeps every key: it makes and finds the vTPM by its location (`vtpm.manager.locations`),
spawns the instance itself with the descriptors passed on, and tells the front door when it
serves (`Attached`) and when it ended (`Ended`).

Who may connect: root and the configured uids (`vtpm.manager.compatconfig`), checked by
SO_PEERCRED on every connection, refusals audited. An attach is further limited to the uid
that set the vTPM up (or root). The instance's sockets get no label check: the orchestrator
made them, and their permissions decide who reaches the TPM.

Rules of a conversation:
- the request is the first frame, its descriptors ride on it; any more, or any later, are
  closed unread, and a request whose `fds` do not say what was passed is refused;
- setup answers once; an attach answers `Attached` when the instance serves, then `Ended`
  when it exits (`Detach` stops it first); the front door closing its connection (killed)
  stops the instance with its state stored;
- a vTPM runs once: a second attach while the first front door lives is refused; one whose
  front door just died waits (up to `REATTACH_WAIT`) for the old instance to stop;
- a wrong or missing secret is refused with one word ("refused"), its reason audited only.
Front-door instances are never restarted by the supervisor: their orchestrator decides.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vtpm import instanceargs
from vtpm import labels as lbl
from vtpm.endpoints import Endpoint, Frontend, FrontendKind
from vtpm.errors import (
    InstanceExitedError,
    ManagerError,
    RemoteProtocolError,
    RequestError,
    VtpmError,
)
from vtpm.instanceargs import ManagedInstance
from vtpm.listen import Server, SocketPolicy, bind, peer_credentials
from vtpm.manager import locations, lookup
from vtpm.manager.compatconfig import CompatConfig
from vtpm.manager.config import ManagerConfig
from vtpm.manager.custody import group_permits
from vtpm.manager.doorconn import Descriptors, Peer, Session
from vtpm.manager.groups import GroupKeys
from vtpm.manager.records import LocationRecord, VtpmRecord
from vtpm.manager.statesecret import Secrets, check_value, matches
from vtpm.manager.store import Store
from vtpm.manager.supervisor import Supervisor
from vtpm.manager.vtpms import VtpmRegistry, check_eks
from vtpm.serving import ConnectionLostError, IdleTimeoutError, events
from vtpm.tpm import ektemplates
from vtpm.wire import compat, ipc
from vtpm.wire.compat import FdRole, Overwrite, StateKind

log = logging.getLogger(__name__)

CLIENTS = 512  # front-door connections at once (one per running front-door vTPM, and setups)
PER_UID = 512  # of which one non-root uid may hold: the orchestrator runs every VM's vTPM
REQUEST_TIMEOUT = 30.0  # seconds a front door has to send its request
SETUP_TIMEOUT = 120.0  # seconds a setup's instance has to provision its EKs
READY_TIMEOUT = 30.0
REATTACH_WAIT = 10.0  # seconds an attach waits for the instance of a front door that died
ENDED_WAIT = 5.0  # seconds a stopped instance's exit has to reach its connection
REFUSED = "refused"  # all a front door learns of a failed secret check


class FrontDoor:
    def __init__(
        self,
        compat_config: CompatConfig,
        config: ManagerConfig,
        store: Store,
        groups: GroupKeys,
        vtpms: VtpmRegistry,
        supervisor: Supervisor,
        secrets: Secrets,
    ) -> None:
        self.compat = compat_config
        self._config = config
        self._store = store
        self._groups = groups
        self._vtpms = vtpms
        self._supervisor = supervisor
        self._secrets = secrets
        self._sessions: dict[uuid.UUID, Session] = {}
        self._lock = threading.Lock()
        self._server: Server | None = None
        self._sweeping = threading.Lock()  # the loop's and the admin requests' sweeps, in turn
        self.check_group()

    def check_group(self) -> None:
        """ConfigError-like ManagerError unless the configured group exists and admits the
        template's labels."""
        g = lookup.group(self._store, self.compat.group)
        probe = self.compat.label("probe")
        if not group_permits(g, lbl.Label.parse(probe)):
            raise ManagerError(
                f"the front door's group {g.name} does not permit labels like {probe} "
                f"(add {self.compat.wildcard()} to it, or choose another group: vtpm compat "
                "enable)"
            )

    # the socket ------------------------------------------------------------------------------

    def listen(self) -> None:
        cfg = self.compat
        mode = 0o660 if cfg.socket_gid is not None else 0o600
        policy = SocketPolicy(mode, None, cfg.socket_gid)
        cfg.socket.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        ep = Endpoint("unix", path=str(cfg.socket))
        self._server = Server(
            "compat",
            bind(ep, policy),
            self._serve,
            policy,
            CLIENTS,
            ep,
            self._admit,
            max_per_uid=PER_UID,
            refuse=self._refuse,
        )
        self._server.start()
        log.info("front door %s (group %s)", cfg.socket, cfg.group)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _admit(self, conn: socket.socket) -> str | None:
        creds = peer_credentials(conn)
        uid = None if creds is None else creds.uid
        if self.compat.uid_allowed(uid):
            return None
        why = f"uid {uid} is not allowed to use the front door"
        pid = None if creds is None else creds.pid
        self._store.audit(f"compat uid={uid} pid={pid}", "compat.connect", "", "refused", {})
        return why

    @staticmethod
    def _refuse(conn: socket.socket, reason: str) -> None:
        reply = ipc.AdminReply(False, error=f"the Manager refused this user: {reason}")
        conn.send(ipc.IpcConnection(ipc.Role.MANAGER).send(reply))

    def _serve(self, conn: socket.socket, peer_text: str) -> None:
        creds = peer_credentials(conn)
        if creds is None or creds.uid is None:
            return
        peer = Peer(creds, f"compat uid={creds.uid} pid={creds.pid}")
        codec = ipc.IpcConnection(ipc.Role.MANAGER)
        passed = Descriptors(conn)
        fds: list[int] = []
        try:
            first = next(events(conn, codec, idle_timeout=REQUEST_TIMEOUT, recv=passed.recv), None)
            fds = passed.take()
            if first is None:
                return
            conn.settimeout(None)
            reply = self._answer(first, fds, passed.truncated, peer, conn, codec, passed)
            if reply is not None:
                conn.sendall(codec.send(reply))
        except RemoteProtocolError as e:
            log.warning("front door: peer %s dropped: %s", peer.actor, e)
        except (ConnectionLostError, IdleTimeoutError, OSError) as e:
            log.info("front door: peer %s gone: %s", peer.actor, e)
        finally:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _answer(
        self,
        frame: object,
        fds: list[int],
        truncated: bool,
        peer: Peer,
        conn: socket.socket,
        codec: ipc.IpcConnection,
        passed: Descriptors,
    ) -> ipc.AdminReply | None:
        """The reply to the request (None: an attach answered on its own)."""
        if not isinstance(frame, ipc.AdminRequest):
            raise RemoteProtocolError(f"{type(frame).__name__} on the front door")
        try:
            req = compat.parse_request(frame)
            roles = self._check_fds(req, fds, truncated)
            if isinstance(req, compat.Setup):
                return compat.reply_frame(self.setup(req, fds[0], peer))
            if isinstance(req, compat.Attach):
                self._attach(req, dict(zip(roles, fds, strict=True)), peer, conn, codec, passed)
                return None
            raise RequestError(f"{frame.op} comes only after an attach")
        except VtpmError as e:
            return ipc.AdminReply(False, error=str(e))
        except Exception:
            log.exception("front door: %s failed", frame.op)
            return ipc.AdminReply(False, error=f"internal error in {frame.op}; see the log")

    @staticmethod
    def _check_fds(req: compat.Request[Any], fds: list[int], truncated: bool) -> list[FdRole]:
        roles = list(getattr(req, "fds", ()))
        if truncated or len(fds) > compat.FDS_MAX:
            raise RequestError(f"at most {compat.FDS_MAX} descriptors")
        if len(roles) != len(fds):
            raise RequestError(f"the request names {len(roles)} descriptors, {len(fds)} came")
        if len(set(roles)) != len(roles) or (roles and roles[0] is not FdRole.STATE):
            raise RequestError("descriptors: the state first, then each socket once")
        if isinstance(req, compat.Setup) and roles != [FdRole.STATE]:
            raise RequestError("setup takes the state descriptor only")
        if isinstance(req, compat.Attach) and len(roles) < 2:
            raise RequestError("attach takes the state and at least one listening socket")
        if isinstance(req, compat.Detach) and roles:
            raise RequestError("detach takes no descriptor")
        return roles

    # setup -------------------------------------------------------------------------------------

    def setup(self, req: compat.Setup, state_fd: int, peer: Peer) -> compat.SetupResult:
        ident = locations.identify(req.state, state_fd, peer.uid)
        held = self._store.location_at(req.state.path)
        if held is not None and not locations.same(held, req.state, ident):
            self._delete(held.vtpm_uuid, peer.actor, "its state location was replaced")
            held = None
        if held is not None:
            rec = lookup.vtpm(self._store, held.vtpm_uuid)
            self._owner_only(rec, peer, "compat.setup")
            if req.reconfigure or req.overwrite is Overwrite.KEEP:
                self._secret_ok(rec, held, req.secret, peer, "compat.setup")
                banks = req.pcr_banks if req.reconfigure else ()
                if banks:
                    self._run_once(rec, held, state_fd, instanceargs.pcr_banks(banks), req.secret)
                self._store.audit(
                    peer.actor, "compat.setup", str(rec.uuid), "ok", {"kept": req.state.path}
                )
                return compat.SetupResult(
                    rec.uuid, rec.label, self._group_name(rec), False, (), banks
                )
            if req.overwrite is Overwrite.FAIL:
                raise ManagerError(
                    f"a vTPM ({rec.uuid}) exists at {req.state.path} already: overwrite it or "
                    "keep it (--overwrite, --not-overwrite)"
                )
            self._delete(rec.uuid, peer.actor, "the orchestrator set up a new one there")
            try:
                locations.clear(req.state, state_fd)
            except OSError as e:
                raise ManagerError(
                    f"the old vTPM's state at {req.state.path} cannot be removed: {e.strerror}"
                ) from None
        elif req.reconfigure:
            raise ManagerError(f"no vTPM is set up at {req.state.path}: nothing to reconfigure")
        return self._create(req, state_fd, ident, peer)

    def _create(
        self, req: compat.Setup, state_fd: int, ident: locations.Identity, peer: Peer
    ) -> compat.SetupResult:
        u = req.vm_uuid or locations.uuid_in_path(req.state.path) or uuid.uuid4()
        other = self._store.vtpm(u)
        if other is not None:
            where = self._store.location(u)
            raise ManagerError(
                f"vTPM {u} exists already"
                + (f" with its state at {where.path}" if where else " (made by vtpm new)")
                + ": delete it first (vtpm del) or give the VM another uuid"
            )
        eks = check_eks((*req.eks, *((ektemplates.PLATFORM,) if req.platform_cert else ())))
        label = self.compat.label(req.vm_name or str(u))
        loc = LocationRecord(u, req.state.kind, req.state.path, ident.st_dev, ident.st_ino)
        fresh = not locations.has_state(req.state, state_fd)
        rec = self._vtpms.new(
            self.compat.group,
            label,
            vtpm_uuid=u,
            owner=(peer.uid, peer.gid),
            location=loc,
            actor=peer.actor,
        )
        try:
            if req.secret is not None:
                key = self._state_key(rec)
                loc = LocationRecord(
                    u, loc.kind, loc.path, loc.st_dev, loc.st_ino, check_value(key, req.secret)
                )
                self._store.set_secret_check(u, loc.secret_check)
            once = [*instanceargs.ek(eks), *instanceargs.pcr_banks(req.pcr_banks)]
            self._run_once(rec, loc, state_fd, once, req.secret)
        except BaseException:
            with contextlib.suppress(VtpmError):
                self._vtpms.delete(u, actor=peer.actor)
            if fresh:  # what the failed vTPM wrote would stop the next setup: it goes too
                with contextlib.suppress(OSError):
                    locations.clear(req.state, state_fd)
            raise
        self._store.audit(
            peer.actor, "compat.setup", str(u), "ok", {"path": loc.path, "label": label}
        )
        return compat.SetupResult(u, label, self._group_name(rec), True, eks, req.pcr_banks)

    def _run_once(
        self,
        rec: VtpmRecord,
        loc: LocationRecord,
        state_fd: int,
        once: list[str],
        secret: bytes | None,
    ) -> None:
        """Run the vTPM's instance on its state with `once` (EKs, PCR banks), then stop it."""
        self._vtpms.check_unlocked(rec, "compat.setup", "front door")
        # the instance needs a frontend: a control socket (0600, root's) beside the front door's,
        # whose directory has a short path (the data directory's may be too long for one)
        ctrl = Endpoint("unix", path=str(self.compat.socket.parent / f".setup-{rec.uuid.hex}"))
        inst = self._instance(rec, loc, state_fd, frontends=(Frontend(FrontendKind.CTRL, ctrl),))
        with self._claim(rec.uuid, None):
            if secret is not None:
                self._secrets.hold(rec.uuid, secret)
            try:
                self._supervisor.start(
                    rec.uuid,
                    inst.argv(),
                    self._log_file(rec),
                    once,
                    restart=False,
                    pass_fds=(state_fd,),
                )
                try:
                    self._supervisor.wait_ready(rec.uuid, SETUP_TIMEOUT)
                finally:
                    self._supervisor.stop(rec.uuid)
            finally:
                self._secrets.release(rec.uuid)

    # attach ------------------------------------------------------------------------------------

    def _attach(
        self,
        req: compat.Attach,
        fds: dict[FdRole, int],
        peer: Peer,
        conn: socket.socket,
        codec: ipc.IpcConnection,
        passed: Descriptors,
    ) -> None:
        state_fd = fds[FdRole.STATE]
        ident = locations.identify(req.state, state_fd, peer.uid)
        loc = self._store.location_at(req.state.path)
        if loc is None or not locations.same(loc, req.state, ident):
            raise ManagerError(
                f"no vTPM is set up at {req.state.path}: run swtpm_setup for it first"
            )
        rec = lookup.vtpm(self._store, loc.vtpm_uuid)
        self._owner_only(rec, peer, "compat.attach")
        self._secret_ok(rec, loc, req.secret, peer, "compat.attach")
        self._vtpms.check_unlocked(rec, "compat.attach", peer.actor)
        read_end = self._migration_pipe(req.migration_secret)
        inherited = [*fds.values()] + ([] if read_end is None else [read_end])
        socks = tuple((FrontendKind(r.value), fd) for r, fd in fds.items() if r is not FdRole.STATE)
        inst = self._instance(
            rec,
            loc,
            state_fd,
            fd_frontends=socks,
            terminate=req.terminate,
            startup_clear=req.startup_clear,
            migration_secret_fd=read_end,
        )
        with self._claim(rec.uuid, conn, incoming=req.incoming) as session:
            if req.secret is not None:
                self._secrets.hold(rec.uuid, req.secret)
            try:
                try:
                    child = self._supervisor.start(
                        rec.uuid,
                        inst.argv(),
                        self._log_file(rec),
                        self._vtpms.accept_once(rec),
                        restart=False,
                        pass_fds=inherited,
                        on_exit=session.exited,
                    )
                finally:
                    if read_end is not None:
                        os.close(read_end)
                self._store.audit(peer.actor, "compat.attach", str(rec.uuid), "ok", {})
                try:
                    self._supervisor.wait_ready(rec.uuid, READY_TIMEOUT)
                except InstanceExitedError as e:
                    self._store.audit(
                        peer.actor, "compat.attach", str(rec.uuid), "failed", {"why": str(e)}
                    )
                    raise
                except ManagerError:
                    self._supervisor.stop(rec.uuid)
                    raise
                if rec.accept_state:
                    self._store.set_accept_state(rec.uuid, False)
                assert child.proc is not None
                attached = compat.Attached(rec.uuid, rec.label, child.proc.pid)
                conn.sendall(codec.send(compat.reply_frame(attached)))
                log.info("vTPM %s: attached (pid %d) for %s", rec.uuid, child.proc.pid, peer.actor)
                self._attached(session, conn, codec, passed)
            finally:
                self._secrets.release(rec.uuid)

    def _attached(
        self, session: Session, conn: socket.socket, codec: ipc.IpcConnection, passed: Descriptors
    ) -> None:
        """Serve an attached connection until the instance ends or the front door leaves."""
        u = session.vtpm_uuid
        peer_gone = False
        try:
            for ev in events(conn, codec, recv=passed.recv):
                if not isinstance(ev, ipc.AdminRequest):
                    raise RemoteProtocolError(f"{type(ev).__name__} on an attached front door")
                req = compat.parse_request(ev)
                if not isinstance(req, compat.Detach):
                    raise RemoteProtocolError(f"{ev.op} on an attached front door")
                break
            else:
                peer_gone = not session.ended.is_set()
        except (RemoteProtocolError, RequestError, ConnectionLostError, OSError) as e:
            log.info("vTPM %s: its front door broke off: %s", u, e)
            peer_gone = not session.ended.is_set()
        if not session.ended.is_set():
            session.closing = True
            log.info("vTPM %s: stopping (%s)", u, "front door gone" if peer_gone else "detach")
            self._supervisor.stop(u)
            if not session.ended.wait(ENDED_WAIT):
                st = self._supervisor.status(u)
                code = 0 if st is None or st.last_exit is None else st.last_exit
                session.exited(code, "")
        if peer_gone:
            return
        code = max(-255, min(255, session.exit_code or 0))
        ended = compat.Ended(code, session.reason[:1000])
        with contextlib.suppress(OSError):
            conn.sendall(codec.send(compat.reply_frame(ended)))

    @contextlib.contextmanager
    def _claim(
        self, vtpm_uuid: uuid.UUID, conn: socket.socket | None, *, incoming: bool = False
    ) -> Iterator[Session]:
        """This vTPM's one run: refused while another front door has it; waits a little
        for the instance of a front door that is going (or an instance still stopping)."""
        deadline = time.monotonic() + REATTACH_WAIT
        while True:
            with self._lock:
                other = self._sessions.get(vtpm_uuid)
                if other is not None and not other.closing and other.front_door_alive():
                    if incoming:
                        raise ManagerError(
                            f"vTPM {vtpm_uuid} is running: an incoming migration into a vTPM "
                            "that runs on this host is not supported"
                        )
                    raise ManagerError(f"vTPM {vtpm_uuid} is running already")
                if other is None and not self._supervisor.active(vtpm_uuid):
                    session = Session(vtpm_uuid, conn)
                    self._sessions[vtpm_uuid] = session
                    break
            if time.monotonic() > deadline:
                raise ManagerError(f"vTPM {vtpm_uuid} is still stopping; try again")
            time.sleep(0.05)
        try:
            yield session
        finally:
            with self._lock:
                self._sessions.pop(vtpm_uuid, None)

    # shared --------------------------------------------------------------------------------------

    def _instance(
        self, rec: VtpmRecord, loc: LocationRecord, state_fd: int, **kw: Any
    ) -> ManagedInstance:
        return ManagedInstance(
            vtpm_uuid=rec.uuid,
            tpm=rec.tpm,
            state_dir=instanceargs.proc_fd(state_fd),
            label=None,
            frontends=kw.pop("frontends", ()),
            state_file=loc.kind == StateKind.FILE,
            **kw,
        )

    def _log_file(self, rec: VtpmRecord) -> Path:
        return self._config.log_dir / f"{rec.uuid}.log"

    def _group_name(self, rec: VtpmRecord) -> str:
        g = self._store.group(str(rec.group_uuid))
        return g.name if g is not None else str(rec.group_uuid)

    def _owner_only(self, rec: VtpmRecord, peer: Peer, action: str) -> None:
        if peer.uid in (0, rec.owner_uid):
            return
        self._store.audit(
            peer.actor, action, str(rec.uuid), "refused", {"why": "not the vTPM's owner"}
        )
        raise ManagerError(f"vTPM {rec.uuid} belongs to another user")

    def _state_key(self, rec: VtpmRecord) -> bytes:
        self._groups.refresh()
        return self._groups.unwrap_state_key(rec.group_uuid, rec.uuid, rec.wrapped_key)

    def _secret_ok(
        self,
        rec: VtpmRecord,
        loc: LocationRecord,
        secret: bytes | None,
        peer: Peer,
        action: str,
    ) -> None:
        """ManagerError(REFUSED), the reason audited, unless the secret is the vTPM's."""
        if not loc.secret_check and secret is None:
            return
        if not loc.secret_check:
            why = "a secret was given for a vTPM set up without one"
        elif secret is None:
            why = "the vTPM's secret is missing"
        elif not matches(self._state_key(rec), secret, loc.secret_check):
            why = "wrong secret"
        else:
            return
        self._store.audit(peer.actor, action, str(rec.uuid), "refused", {"why": why})
        log.debug("vTPM %s: %s refused: %s", rec.uuid, action, why)
        raise ManagerError(REFUSED)

    @staticmethod
    def _migration_pipe(secret: bytes | None) -> int | None:
        """The read end of a pipe holding the migration secret (it fits the pipe's buffer)."""
        if secret is None:
            return None
        r, w = os.pipe()
        try:
            os.write(w, secret)
        finally:
            os.close(w)
        return r

    def _delete(self, vtpm_uuid: uuid.UUID, actor: str, why: str) -> None:
        loc = self._store.location(vtpm_uuid)
        self._vtpms.delete(vtpm_uuid, actor=actor)
        self._store.audit(
            actor,
            "compat.removed",
            str(vtpm_uuid),
            "ok",
            {"why": why, "path": "" if loc is None else loc.path},
        )
        log.warning("vTPM %s deleted (key erased): %s", vtpm_uuid, why)

    # the orchestrator's deletions -----------------------------------------------------------

    def sweep(self) -> None:
        """Delete the front-door vTPMs whose state location was removed (and that are not
        running); keep those whose location's parent is missing (a disk not mounted now)."""
        with self._sweeping:
            self._sweep()

    def _sweep(self) -> None:
        for loc in self._store.locations():
            with self._lock:
                if loc.vtpm_uuid in self._sessions or self._supervisor.active(loc.vtpm_uuid):
                    continue
            if locations.removed(loc):
                try:
                    self._delete(
                        loc.vtpm_uuid, "orchestrator", f"its state location {loc.path} was removed"
                    )
                except VtpmError as e:
                    log.error("vTPM %s: not deleted: %s", loc.vtpm_uuid, e)
