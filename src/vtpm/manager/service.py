"""The vTPM Manager: the one user of the hardware TPM, custodian of every vTPM's state key.

Lifecycle: `open()` (data directory, store, hardware TPM — a swtpm simulator when none is
configured and /dev/tpmrm0 is absent — then the groups are checked against the host PCRs),
`listen()` (the admin socket), `autostart()` (vTPMs that were running), `run()` until
`request_stop()`, then `close()`: instances are stopped first (their last state writes are still
recorded), then the sockets, the hardware TPM and the store.

Key custody, per instance link (see `vtpm.wire.ipc`): the Manager knows which vTPM is on each
link because it made the socketpair. It releases the state key only if the vTPM's label is of
a type the Manager serves, the group permits the label, the group is unlocked in the current
host state, and the vTPM is not open elsewhere. Every state write is recorded before it is
acknowledged; the recorded digests decide, at the next start, which blob is current.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Sequence

from vtpm import labels as lbl
from vtpm.errors import (
    ConfigError,
    LabelError,
    ManagerError,
    RemoteProtocolError,
    VtpmError,
)
from vtpm.listen import Endpoint, Handler, Server, SocketPolicy, bind
from vtpm.manager import launch, provision
from vtpm.manager.config import HW_DEVICE, ManagerConfig
from vtpm.manager.deepquote import DeepQuoter
from vtpm.manager.groups import GroupKeys
from vtpm.manager.hwtpm import HardwareTpm
from vtpm.manager.simulator import Simulator
from vtpm.manager.store import GroupRecord, Store, VtpmRecord
from vtpm.manager.supervisor import Supervisor, last_log_line
from vtpm.wire import ipc
from vtpm.wire._common import CLOSED, NEED_DATA
from vtpm.wire.deepquote import DeepQuoteInfo
from vtpm.wire.evidence import Bundle, Evidence, SignedQuote, encode_evidence

log = logging.getLogger(__name__)

TPM_VERSIONS = ("2.0", "1.2")
FRONTEND_KINDS = ("ctrl", "server", "mssim")
READY_TIMEOUT = 30.0
ADMIN_CLIENTS = 256  # admin connections served at once (deep quotes wait for their batch)
PCR_TIMEOUT = 10.0
SHA256 = 0x000B
ALL_PCRS = tuple(range(24))


def parse_frontend(spec: str) -> tuple[str, Endpoint]:
    """`ctrl=unix:/path`, `server=tcp:PORT`, `mssim=tcp:HOST:PORT`."""
    kind, sep, where = spec.partition("=")
    if not sep or kind not in FRONTEND_KINDS:
        raise ConfigError(
            f"frontend {spec!r}: expected KIND=SOCKET with KIND one of {', '.join(FRONTEND_KINDS)}"
        )
    ep = Endpoint.parse(where)
    if kind == "mssim" and ep.kind != "tcp":
        raise ConfigError(f"frontend {spec!r}: the simulator protocol runs on TCP only")
    return kind, ep


class InstanceLink:
    """The Manager's end of one instance's key-custody link. The link thread reads; any thread
    may write (one at a time), and PCR values the instance sends back are queued here."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.codec = ipc.IpcConnection(ipc.Role.MANAGER)
        self._write = threading.Lock()
        self._pcr_lock = threading.Lock()  # one PCR request in flight
        self.pcr_replies: queue.Queue[ipc.PcrReply | None] = queue.Queue()

    def send(self, event: ipc.ManagerEvent) -> None:
        with self._write:
            self.sock.sendall(self.codec.send(event))

    def read_pcrs(self, pcrs: tuple[int, ...]) -> tuple[tuple[int, bytes], ...]:
        with self._pcr_lock:
            try:
                self.send(ipc.PcrRequest(SHA256, pcrs))
                reply = self.pcr_replies.get(timeout=PCR_TIMEOUT)
            except (OSError, queue.Empty):
                reply = None
            if reply is None or tuple(i for i, _ in reply.pcrs) != pcrs:
                raise ManagerError(
                    "the vTPM could not report its PCR values (has its TPM been started?)"
                )
            return reply.pcrs


class Manager:
    def __init__(self, config: ManagerConfig) -> None:
        self.config = config
        self.store = Store(config.db_path)
        self.simulator: Simulator | None = None
        self.hw: HardwareTpm | None = None
        self._groups: GroupKeys | None = None
        self.labels = lbl.LabelMap.empty()
        self.supervisor = Supervisor(self._serve_link)
        self.admin_server: Server | None = None
        self.started = time.time()
        self._stop = threading.Event()
        self._open: set[uuid.UUID] = set()
        self._links: dict[uuid.UUID, InstanceLink] = {}
        self._quoter: DeepQuoter | None = None
        self._ready: dict[uuid.UUID, threading.Event] = {}
        self._lock = threading.RLock()

    # lifecycle ------------------------------------------------------------------------------

    @property
    def groups(self) -> GroupKeys:
        if self._groups is None:
            raise ManagerError("the Manager is not open")
        return self._groups

    def open(self) -> None:
        cfg = self.config
        os.umask(0o077)
        cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (cfg.run_dir, cfg.log_dir, cfg.data_dir / "vtpms"):
            d.mkdir(mode=0o700, exist_ok=True)
        if cfg.labels_file is not None:
            self.labels = lbl.LabelMap.load(cfg.labels_file)
        self.store.open()
        try:
            tcti = cfg.tcti
            if tcti is None and HW_DEVICE.exists():
                tcti = f"device:{HW_DEVICE}"
            if tcti is None:
                self.simulator = Simulator(cfg.simulator_dir)
                tcti = self.simulator.start()
                log.warning(
                    "no hardware TPM configured and %s is absent: using a swtpm simulator as "
                    "the hardware TPM (%s, state in %s); it protects nothing on a real host",
                    HW_DEVICE,
                    "adopted a running one" if self.simulator.reused else "started",
                    cfg.simulator_dir,
                )
            self.hw = HardwareTpm(tcti)
            self.hw.open()
            self._groups = GroupKeys(self.store, self.hw)
            self._groups.refresh()
            self._quoter = DeepQuoter(self.host_quote, self.config.quote_window)
        except BaseException:
            self.close()
            raise
        for g in self.store.groups():
            st = self._groups.status(g.uuid)
            if st.unlocked:
                log.info("group %s (%s): unlocked", g.name, g.uuid)
            else:
                log.warning("group %s (%s): LOCKED: %s", g.name, g.uuid, st.reason)
        log.info("Manager open: data %s, hardware TPM %s", cfg.data_dir, self.hw.description)

    def listen(self, admin: Handler) -> None:
        """Serve `admin` (the admin protocol handler) on the admin socket."""
        cfg = self.config
        policy = SocketPolicy(0o660 if cfg.admin_gid is not None else 0o600, None, cfg.admin_gid)
        ep = Endpoint("unix", path=str(cfg.admin_socket))
        self.admin_server = Server("admin", bind(ep, policy), admin, policy, ADMIN_CLIENTS, ep)
        self.admin_server.start()
        log.info("admin socket %s", cfg.admin_socket)

    def autostart(self) -> None:
        for v in self.store.vtpms():
            if v.wanted_running:
                try:
                    self.start_vtpm(v.uuid, wait=False, actor="manager")
                except VtpmError as e:
                    log.error("vTPM %s not started: %s", v.uuid, e)

    def run(self) -> None:
        while not self._stop.wait(0.2):
            self.supervisor.poll()

    def request_stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self.supervisor.stop_all()
        if self._quoter is not None:
            self._quoter.close()
            self._quoter = None
        if self.admin_server is not None:
            self.admin_server.close()
            self.admin_server = None
        if self.hw is not None:
            self.hw.close()
            self.hw = None
        if self.simulator is not None:
            self.simulator.stop()
            self.simulator = None
        self.store.close()
        log.info("Manager stopped")

    # key custody ----------------------------------------------------------------------------

    def _serve_link(self, vtpm_uuid: uuid.UUID, sock: socket.socket) -> None:
        link = InstanceLink(sock)
        codec = link.codec
        granted = False
        try:
            while True:
                ev = codec.next_event()
                if ev is NEED_DATA:
                    codec.receive_data(sock.recv(65536))
                    continue
                if ev is CLOSED:
                    return
                if isinstance(ev, ipc.Hello):
                    reply: ipc.ManagerEvent | None = self._grant(vtpm_uuid, ev, granted)
                    if isinstance(reply, ipc.KeyGrant):
                        granted = True
                        self._links[vtpm_uuid] = link
                elif not granted:
                    reply = ipc.Refused("say Hello first")
                else:
                    reply = self._on_link_event(vtpm_uuid, link, ev)
                if reply is None:
                    continue
                link.send(reply)
        except RemoteProtocolError as e:
            log.error("vTPM %s: key-custody link dropped: %s", vtpm_uuid, e)
        except OSError as e:
            log.info("vTPM %s: key-custody link closed: %s", vtpm_uuid, e.strerror)
        finally:
            link.pcr_replies.put(None)
            if granted:
                with self._lock:
                    self._open.discard(vtpm_uuid)
                    if self._links.get(vtpm_uuid) is link:
                        del self._links[vtpm_uuid]

    def _on_link_event(
        self, vtpm_uuid: uuid.UUID, link: InstanceLink, ev: ipc.Event
    ) -> ipc.ManagerEvent | None:
        """What an instance said after its Hello; the answer, if one is due now."""
        if isinstance(ev, ipc.StateWritten):
            self.store.record_state(vtpm_uuid, ev.name, ev.counter, ev.digest)
            return ipc.Ack()
        if isinstance(ev, ipc.StateDeleted):
            self.store.forget_state(vtpm_uuid, ev.name)
            return ipc.Ack()
        if isinstance(ev, ipc.QuoteRequest):  # answered from its own thread when quoted
            threading.Thread(
                target=self._guest_quote,
                args=(vtpm_uuid, link, ev),
                name=f"quote-{vtpm_uuid}",
                daemon=True,
            ).start()
        elif isinstance(ev, ipc.PcrReply):
            link.pcr_replies.put(ev)
        elif isinstance(ev, ipc.Ready):
            self.supervisor.mark_ready(vtpm_uuid)
            self._ready.setdefault(vtpm_uuid, threading.Event()).set()
        elif isinstance(ev, ipc.Goodbye):
            log.info("vTPM %s: instance stopped in order", vtpm_uuid)
        else:
            raise RemoteProtocolError(f"{type(ev).__name__} on a key-custody link")
        return None

    # deep quotes ----------------------------------------------------------------------------

    def _guest_quote(self, vtpm_uuid: uuid.UUID, link: InstanceLink, req: ipc.QuoteRequest) -> None:
        try:
            ev = self.deep_quote(vtpm_uuid, req.nonce, req.host_pcrs, req.bank, req.pcrs)
            reply: ipc.ManagerEvent = ipc.QuoteReply(encode_evidence(ev))
            self.store.audit("guest", "quote.deep", str(vtpm_uuid), "ok", {"batch": ev.batch_size})
        except VtpmError as e:
            log.warning("vTPM %s: deep quote for the guest refused: %s", vtpm_uuid, e)
            reply = ipc.Refused(str(e)[:1000])
        with contextlib.suppress(OSError):
            link.send(reply)

    def deep_quote(
        self,
        vtpm_uuid: uuid.UUID,
        nonce: bytes,
        host_pcrs: tuple[int, ...],
        bank: int,
        values: tuple[tuple[int, bytes], ...],
    ) -> Evidence:
        """One deep quote (batched with whatever else is asked at the same time)."""
        rec = self.vtpm(str(vtpm_uuid))
        g = self.group(str(rec.group_uuid))
        st = self.groups.status(g.uuid)
        if not st.unlocked:
            raise ManagerError(f"group {g.name} is locked: {st.reason}")
        if not host_pcrs:
            host_pcrs = g.pcr_states[0].pcrs
        try:
            info = DeepQuoteInfo(nonce, rec.uuid, g.uuid, rec.label, bank, values)
        except ValueError as e:
            raise ConfigError(f"deep quote: {e}") from None
        if self._quoter is None:
            raise ManagerError("the Manager is not open")
        return self._quoter.request(g.uuid, info, tuple(sorted(set(host_pcrs))))

    def deep_quote_host(
        self,
        vtpm_uuid: uuid.UUID,
        nonce: bytes,
        host_pcrs: tuple[int, ...],
        vtpm_pcrs: tuple[int, ...],
    ) -> Evidence:
        """A deep quote asked on the host: the running instance reports its PCR values."""
        link = self._links.get(vtpm_uuid)
        if link is None:
            raise ManagerError(f"vTPM {vtpm_uuid} is not running: start it to quote it")
        values = link.read_pcrs(vtpm_pcrs) if vtpm_pcrs else ()
        return self.deep_quote(vtpm_uuid, nonce, host_pcrs, SHA256, values)

    def _grant(self, vtpm_uuid: uuid.UUID, hello: ipc.Hello, granted: bool) -> ipc.ManagerEvent:
        why = self._refusal(vtpm_uuid, hello, granted)
        if isinstance(why, str):
            self.store.audit("instance", "key.release", str(vtpm_uuid), "refused", {"why": why})
            log.warning("vTPM %s: key not released: %s", vtpm_uuid, why)
            return ipc.Refused(why)
        digests = tuple((d.name, d.digest) for d in self.store.state_digests(vtpm_uuid))
        log.info("vTPM %s: state key released to its instance", vtpm_uuid)
        return ipc.KeyGrant(why, digests)

    def _refusal(self, vtpm_uuid: uuid.UUID, hello: ipc.Hello, granted: bool) -> str | bytes:
        """The state key to release, or the reason not to."""
        if granted or hello.vtpm_uuid != vtpm_uuid:
            return "this link belongs to another vTPM"
        rec = self.store.vtpm(vtpm_uuid)
        if rec is None:
            return "unknown vTPM"
        g = self.store.group(str(rec.group_uuid))
        if g is None:
            return "the vTPM's group does not exist"
        label = lbl.Label.parse(rec.label)
        if not lbl.manager_accepts(label):
            return f"the Manager serves only labels of type vtpm_t, not {label.type}"
        if not lbl.group_permits(label, [lbl.Label.parse(t).digest() for t in g.labels]):
            return f"group {g.name} does not permit label {label}"
        self.groups.refresh()
        try:
            key = (
                self.groups.unwrap_state_key(g.uuid, vtpm_uuid, rec.wrapped_key)
                if self.groups.status(g.uuid).unlocked
                else None
            )
        except VtpmError as e:
            return str(e)
        if key is None:
            return f"group {g.name} is locked: {self.groups.status(g.uuid).reason}"
        with self._lock:
            if vtpm_uuid in self._open:
                return "the vTPM is open already (a vTPM runs at most once)"
            self._open.add(vtpm_uuid)
        return key

    # vTPM operations ------------------------------------------------------------------------

    def group(self, ref: str) -> GroupRecord:
        g = self.store.group(ref)
        if g is None:
            raise ManagerError(f"no group {ref!r}")
        return g

    def vtpm(self, ref: str) -> VtpmRecord:
        try:
            u = uuid.UUID(ref)
        except ValueError:
            raise ConfigError(f"{ref!r} is not a vTPM uuid") from None
        rec = self.store.vtpm(u)
        if rec is None:
            raise ManagerError(f"no vTPM {u}")
        return rec

    def new_vtpm(
        self,
        group_ref: str,
        label: str,
        *,
        tpm: str = "2.0",
        vtpm_uuid: uuid.UUID | None = None,
        owner: tuple[int, int] | None = None,
        frontends: Sequence[str] = (),
        actor: str,
    ) -> VtpmRecord:
        g = self.group(group_ref)
        parsed = lbl.Label.parse(label)
        if parsed.is_wildcard:
            raise LabelError("a vTPM's label names its user; '*' is for group rules only")
        if not lbl.group_permits(parsed, [lbl.Label.parse(t).digest() for t in g.labels]):
            raise LabelError(f"group {g.name} does not permit label {parsed}")
        if tpm not in TPM_VERSIONS:
            raise ConfigError(f"TPM version {tpm!r}: use 2.0 or 1.2")
        u = vtpm_uuid or uuid.uuid4()
        if not frontends:
            frontends = (f"ctrl=unix:{self.config.run_dir / f'{u}.ctrl'}",)
        for f in frontends:
            parse_frontend(f)
        self.groups.refresh()
        wrapped = self.groups.wrap_state_key(g.uuid, u, secrets.token_bytes(32))
        rec = VtpmRecord(
            uuid=u,
            group_uuid=g.uuid,
            label=str(parsed),
            tpm=tpm,
            owner_uid=None if owner is None else owner[0],
            owner_gid=None if owner is None else owner[1],
            frontends=tuple(frontends),
            wrapped_key=wrapped,
            created=time.time(),
        )
        self.store.add_vtpm(rec)
        self.store.audit(actor, "vtpm.new", str(u), "ok", {"group": g.name, "label": rec.label})
        return rec

    def instance_args(self, rec: VtpmRecord) -> list[str]:
        args = ["--uuid", str(rec.uuid), "--tpm", rec.tpm]
        args += ["--state-dir", str(self.config.vtpm_dir(rec.uuid)), "--label", rec.label]
        for f in rec.frontends:
            kind, ep = parse_frontend(f)
            args += [f"--{kind}", str(ep)]
        if rec.owner_uid is not None:
            args += ["--socket-owner", str(rec.owner_uid)]
        if rec.owner_gid is not None:
            args += ["--socket-group", str(rec.owner_gid), "--socket-mode", "660"]
        if self.config.labels_file is not None:
            args += ["--labels-file", str(self.config.labels_file)]
        return args

    def start_vtpm(
        self, vtpm_uuid: uuid.UUID, *, wait: bool = True, actor: str, once: Sequence[str] = ()
    ) -> None:
        """Start the vTPM's instance; `once`: extra arguments for this process, not restarts."""
        rec = self.vtpm(str(vtpm_uuid))
        g = self.group(str(rec.group_uuid))
        self.groups.refresh()
        st = self.groups.status(g.uuid)
        if not st.unlocked:
            self.store.audit(actor, "vtpm.start", str(rec.uuid), "refused", {"why": st.reason})
            raise ManagerError(
                f"vTPM {rec.uuid} cannot start: group {g.name} is locked: {st.reason}"
            )
        ready = threading.Event()
        self._ready[rec.uuid] = ready
        log_file = self.config.log_dir / f"{rec.uuid}.log"
        child = self.supervisor.start(rec.uuid, self.instance_args(rec), log_file, once)
        self.store.set_wanted_running(rec.uuid, True)
        self.store.audit(actor, "vtpm.start", str(rec.uuid), "ok", {})
        if not wait:
            return
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.wait(0.05):
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                self.store.set_wanted_running(rec.uuid, False)
                child.wanted = False
                raise ManagerError(
                    f"vTPM {rec.uuid} did not start: {last_log_line(log_file) or proc.returncode}"
                )
            if time.monotonic() > deadline:
                raise ManagerError(f"vTPM {rec.uuid} did not come up within {READY_TIMEOUT:.0f} s")

    def stop_vtpm(self, vtpm_uuid: uuid.UUID, *, actor: str) -> bool:
        rec = self.vtpm(str(vtpm_uuid))
        self.store.set_wanted_running(rec.uuid, False)
        was = self.supervisor.stop(rec.uuid)
        self.store.audit(actor, "vtpm.stop", str(rec.uuid), "ok", {"was_running": was})
        return was

    def delete_vtpm(self, vtpm_uuid: uuid.UUID, *, actor: str) -> None:
        rec = self.vtpm(str(vtpm_uuid))
        self.supervisor.stop(rec.uuid)
        self.supervisor.forget(rec.uuid)
        state_dir = self.config.vtpm_dir(rec.uuid)
        shutil.rmtree(state_dir, ignore_errors=True)
        launch.forget(self, rec.uuid)
        self.store.delete_vtpm(rec.uuid)
        self.store.audit(actor, "vtpm.del", str(rec.uuid), "ok", {"group": str(rec.group_uuid)})

    # groups ---------------------------------------------------------------------------------

    def new_group(
        self,
        name: str,
        owner_pem: bytes,
        pcrs: Sequence[int],
        labels: Sequence[str],
        actor: str,
        ak_alg: str = "ecc",
    ) -> GroupRecord:
        g = self.groups.create(name, owner_pem, pcrs, labels, ak_alg)
        self.store.audit(
            actor,
            "group.new",
            str(g.uuid),
            "ok",
            {"name": name, "pcrs": list(pcrs), "labels": list(labels), "ak": ak_alg},
        )
        return g

    def update_group(self, ref: str, request: bytes, actor: str) -> GroupRecord:
        g = self.group(ref)
        try:
            new = self.groups.apply_owner_request(g, request)
        except VtpmError as e:
            self.store.audit(actor, "group.update", str(g.uuid), "refused", {"why": str(e)})
            raise
        self.store.audit(
            actor,
            "group.update",
            str(g.uuid),
            "ok",
            {"seq": new.seq, "states": len(new.pcr_states), "labels": list(new.labels)},
        )
        return new

    def delete_group(self, ref: str, actor: str) -> None:
        g = self.group(ref)
        self.store.delete_group(g.uuid)
        self.groups.forget(g.uuid)
        self.store.audit(actor, "group.del", str(g.uuid), "ok", {"name": g.name})

    # group attestation (vtpm.manager.attestation, vtpm.manager.provision) ----------------------

    def provision(self, group_ref: str) -> Bundle:
        """The group's provisioning bundle (its AK is made now if it has none yet)."""
        g = self.groups.ensure_ak(self.group(group_ref))
        manager_uuid = self.store.meta("manager_uuid") or ""
        return provision.build_bundle(g, self.groups.attestation, manager_uuid)

    def host_quote(
        self, group_uuid: uuid.UUID, qualifying_data: bytes, pcrs: Sequence[int]
    ) -> SignedQuote:
        """TPM2_Quote of the host `pcrs` by the group's AK (thread-safe)."""
        g = self.groups.ensure_ak(self.group(str(group_uuid)))
        return self.groups.attestation.quote(self.groups.ak(g), qualifying_data, pcrs)

    def activate_credential(
        self, group_ref: str, credential_blob: bytes, encrypted_secret: bytes, *, actor: str
    ) -> bytes:
        """The secret a verifier sealed to the EK and the group's AK name (MakeCredential);
        SealError, opaque, when the TPM refuses."""
        g = self.groups.ensure_ak(self.group(group_ref))
        try:
            secret = self.groups.attestation.activate_credential(
                self.groups.ak(g), credential_blob, encrypted_secret
            )
        except VtpmError as e:
            self.store.audit(actor, "group.activate", str(g.uuid), "refused", {"why": str(e)})
            raise
        self.store.audit(actor, "group.activate", str(g.uuid), "ok", {})
        return secret

    def vtpm_state(self, rec: VtpmRecord) -> dict[str, object]:
        child = self.supervisor.child(rec.uuid)
        out: dict[str, object] = {"state": "stopped"} if child is None else dict(child.to_json())
        out["wanted_running"] = rec.wanted_running
        return out
