"""Assemble and run one vTPM instance: state store, device, frontends.

Start-up order matters: the state directory (or file) is locked and the TPM started (its state
loaded and checked) before any socket exists, so a bad blob or a second copy of the same vTPM
stops the instance before any client could talk to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from vtpm import labels as lbl
from vtpm.endpoints import Endpoint
from vtpm.engine.engine import TpmVersion
from vtpm.errors import LabelError, TpmError
from vtpm.instance import ekprov, identity, pcrbanks, vendor
from vtpm.instance.config import InstanceConfig
from vtpm.instance.custody import ManagerLink
from vtpm.instance.device import Device
from vtpm.instance.frontends.ctrl import ControlHandler
from vtpm.instance.frontends.mssim import CommandPortHandler, PlatformPortHandler
from vtpm.instance.frontends.raw import serve_frames
from vtpm.instance.launch import Launch
from vtpm.instance.stateblob import BlobStore
from vtpm.instance.statefile import StateFile
from vtpm.instance.statekey import StateKey
from vtpm.instance.statestore import StateStore
from vtpm.instance.transfer import Transfer, TransferKey
from vtpm.labelpolicy import LabelMap, check_vtpm_peer, resolve_peer
from vtpm.listen import Handler, PeerCheck, Server, bind
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_RC, TPM_STARTUP12, TPM_SU

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _started(device: Device) -> Iterator[None]:
    """A TPM started with Startup(CLEAR) for provisioning, then shut down with Shutdown(CLEAR)
    and powered on again (off, as a guest expects to find it)."""
    rc = frames.response_code(device.process(frames.startup()))
    if rc != TPM_RC.SUCCESS:
        raise TpmError(f"TPM2_Startup(CLEAR) for provisioning failed with TPM_RC {rc:#x}")
    yield
    rc = frames.response_code(device.process(frames.shutdown(TPM_SU.CLEAR)))
    if rc != TPM_RC.SUCCESS:
        raise TpmError(f"TPM2_Shutdown(CLEAR) after provisioning failed with TPM_RC {rc:#x}")
    device.power_off(orderly=False)  # a Shutdown(STATE) would undo the CLEAR
    device.power_on()


@dataclass
class Instance:
    """A running vTPM. `start()`, then `wait()` until stopped, then `close()`."""

    config: InstanceConfig
    key: StateKey
    link: ManagerLink | None = None  # the Manager's key custody, when it spawned us
    stopped: threading.Event = field(default_factory=threading.Event)
    servers: list[Server] = field(default_factory=list)
    store: BlobStore | None = None
    device: Device | None = None
    # mixed into the transfer-blob key (--migration-secret-fd); dropped once the key is made
    migration_secret: bytes | None = field(default=None, repr=False)
    _check: PeerCheck | None = None

    def start(self) -> identity.Identity:
        cfg = self.config
        self.store, ident = self._open_store()
        try:
            quote = None if self.link is None else self.link.deep_quote
            secret, self.migration_secret = self.migration_secret, None
            transfer = Transfer(
                TransferKey(self.key, secret),
                ident.vtpm_uuid,
                self.store,
                cfg.export_plaintext_state,
            )
            del secret
            self.device = Device(
                cfg.tpm_version, self.store, cfg.buffer_size, deep_quote=quote, transfer=transfer
            )
            self.device.power_on()
            if cfg.ek or cfg.pcr_banks:  # before a launch: that makes the TPM fresh after
                self._provision(self.device)  # its rehearsal
            if cfg.launch is not None:  # measured launch: fresh TPM, extends after Startup
                Launch(self.device, cfg.launch).arm()
            if cfg.startup_clear:
                self._startup_clear()
            self._listen()
            if self.link is not None:
                self._serve_manager(self.link, self.device)
                self.link.watch(on_lost=self.stop)
        except BaseException:
            self.close()
            raise
        log.info(
            "vTPM %s (TPM %s, libtpms %s) serving %s",
            ident.vtpm_uuid,
            cfg.tpm_version.value,
            self.device.library_version,
            ", ".join(f"{s.name} {s.endpoint}" for s in self.servers),
        )
        return ident

    def _open_store(self) -> tuple[BlobStore, identity.Identity]:
        """The state store, open and locked: a directory (its identity file says which vTPM)
        or one file (its header does)."""
        cfg = self.config
        health = None if self.link is None else self.link.tpm_health
        store: BlobStore
        if cfg.state_file is not None:
            store = StateFile(
                cfg.state_file,
                cfg.vtpm_uuid,
                cfg.tpm_version,
                self.key,
                journal=self.link,
                health=health,
                accept_state=cfg.accept_state,
            )
            store.open()
            return store, identity.Identity(store.vtpm_uuid, cfg.tpm_version)
        assert cfg.state_dir is not None
        cfg.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ident = identity.resolve(cfg.state_dir, cfg.vtpm_uuid, cfg.tpm_version)
        store = StateStore(
            cfg.state_dir,
            ident.vtpm_uuid,
            self.key,
            journal=self.link,
            health=health,
            accept_state=cfg.accept_state,
        )
        store.open()
        return store, ident

    @staticmethod
    def _serve_manager(link: ManagerLink, device: Device) -> None:
        """Deep quotes: the guest's vendor command goes to the Manager (the device was built
        with `link.deep_quote`); the Manager's requests for this vTPM's PCR values are read
        through the device."""

        def pcrs(bank: int, indices: Sequence[int]) -> tuple[tuple[int, bytes], ...]:
            if bank != vendor.SHA256:
                raise TpmError("only the SHA-256 bank is read for deep quotes")
            return vendor.read_pcrs(device.execute, indices)

        link.serve_pcrs(pcrs)

    def _provision(self, device: Device) -> None:
        """EKs and certificates (`ekprov`), then PCR banks (`pcrbanks`): in a TPM started for
        it, shut down with Shutdown(CLEAR) and powered on again, so the guest's first Startup
        finds it off. A bank allocation takes effect at that reset; a second such session
        checks the banks then active."""
        cfg = self.config
        started = time.monotonic()
        with _started(device):
            if cfg.ek:
                certify = None if self.link is None else self.link.certificate
                if certify is None:
                    log.warning(
                        "--ek without a Manager: EKs are persisted, no certificate is written"
                    )
                done = ekprov.Provisioner(device.process, certify).run(cfg.ek)
                log.info("provisioned EKs: %s", ekprov.summary(done))
            if cfg.pcr_banks:
                pcrbanks.allocate(device.process, cfg.pcr_banks)
        if cfg.pcr_banks:
            with _started(device):
                active = pcrbanks.check(device.process, cfg.pcr_banks)
            log.info("PCR banks allocated, active: %s", pcrbanks.names(active))
        ms = (time.monotonic() - started) * 1000
        log.info("provisioned in %.0f ms", ms)

    def _startup_clear(self) -> None:
        assert self.device is not None
        if self.config.tpm_version is TpmVersion.TPM20:
            rc = frames.response_code(self.device.execute(frames.startup()))
        else:
            rc = frames.response_code(self.device.execute(frames.startup12(TPM_STARTUP12.CLEAR)))
        if rc != TPM_RC.SUCCESS:
            raise TpmError(f"TPM Startup(CLEAR) failed with response code {rc:#x}")

    def _peer_check(self) -> PeerCheck | None:
        """With a label, UNIX peers must pass the vTPM label rule (type guest_t or hwdom_t,
        same user); their label comes from SO_PEERSEC, else the uid/gid map."""
        cfg = self.config
        if cfg.label is None:
            return None
        mine = lbl.Label.parse(cfg.label)
        labels = LabelMap.load(cfg.labels_file) if cfg.labels_file else LabelMap.empty()

        def check(conn: socket.socket) -> str | None:
            if conn.family != socket.AF_UNIX:
                return None  # no peer identity on TCP: loopback and the port are the boundary
            try:
                check_vtpm_peer(resolve_peer(conn, labels), mine, labels)
            except LabelError as e:
                return str(e)
            return None

        return check

    def _server(self, name: str, ep: Endpoint, handler: Handler) -> Server:
        sock = bind(ep, self.config.sockets)
        srv = Server(
            name,
            sock,
            handler,
            self.config.sockets,
            self.config.max_clients,
            endpoint=ep,
            peer_check=self._check,
        )
        self.servers.append(srv)
        return srv

    def _listen(self) -> None:
        cfg = self.config
        self._check = self._peer_check()
        dev = self.device
        assert dev is not None
        max_frame = max(cfg.buffer_size or 4096, 4096)
        idle = cfg.idle_timeout

        on_end = self._client_left if cfg.terminate else None

        def raw(conn: socket.socket, peer: str) -> None:
            try:
                serve_frames(dev, conn, peer, max_frame, idle_timeout=idle)
            finally:
                if on_end is not None:
                    on_end(peer)

        data_server: Server | None = None
        for ep in cfg.server:
            data_server = self._server("raw", ep, raw)
        if data_server is None and cfg.ctrl:
            data_server = Server.detached("data", raw, cfg.sockets)
            self.servers.append(data_server)
        for ep in cfg.ctrl:
            assert data_server is not None
            ctrl = ControlHandler(
                dev, data_server.spawn, self.stopped.set, idle_timeout=idle, on_end=on_end
            )
            self._server("ctrl", ep, ctrl)
        for ep in cfg.mssim:
            self._server("mssim", ep, CommandPortHandler(dev, max_frame, idle_timeout=idle))
            platform = PlatformPortHandler(dev, idle_timeout=idle)
            self._server("mssim-platform", ep.with_port_offset(1), platform)
        for s in self.servers:
            s.start()

    def _client_left(self, peer: str) -> None:
        """--terminate: a UNIX control channel's or a data channel's client is gone, so the
        vTPM stops."""
        if not self.stopped.is_set():
            log.info("%s disconnected: stopping (--terminate)", peer)
        self.stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.stopped.wait(timeout)

    def stop(self) -> None:
        self.stopped.set()

    def close(self) -> None:
        """Stop serving, store state with an orderly TPM shutdown, unlock the directory."""
        for s in self.servers:
            s.close()
        self.servers.clear()
        try:
            if self.device is not None:
                self.device.close()
                self.device = None
        finally:
            if self.store is not None:
                self.store.close()
                self.store = None
            if self.link is not None:
                self.link.goodbye()
                self.link.close()
                self.link = None
        log.info("vTPM stopped, state stored (pid %d)", os.getpid())
