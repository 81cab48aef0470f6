"""The vTPM Manager: the one user of the hardware TPM, custodian of every vTPM's state key.

This module only wires the Manager together; what it does is in the services it builds:
key custody (`custody`), the vTPMs and their processes (`vtpms`, `supervisor`), groups
(`groupops`, with the keys and seals of `groups` and the group CAs of `ca`), measured
launches (`launch`), deep quotes (`quotes`, batched by `deepquote`), the admin protocol
(`admin`) and, when `compat.json` configures it, the front door for the swtpm-compatible
executables (`frontdoor`).

Lifecycle: `open()` (data directory; a lost database refused; hardware TPM — a swtpm simulator
when none is configured and /dev/tpmrm0 is absent —; store; the floor checked (`floor`); then
the groups are checked against the host PCRs and the services built), `listen()` (the admin
socket, and the front door's), `autostart()` (vTPMs that were running),
`run()` until `request_stop()`, then `close()`: instances are stopped first (their last state
writes are still recorded), then the sockets, the floor advanced, the hardware TPM and the
store closed.
"""

from __future__ import annotations

import logging
import threading
import time

from vtpm.endpoints import Endpoint
from vtpm.errors import ManagerError, VtpmError
from vtpm.labelpolicy import LabelMap
from vtpm.listen import Server, SocketPolicy, bind
from vtpm.manager import floor
from vtpm.manager.admin import AdminHandler, AdminService, Services
from vtpm.manager.ca import GroupCa
from vtpm.manager.compatconfig import CompatConfig
from vtpm.manager.config import HW_DEVICE, ManagerConfig
from vtpm.manager.custody import Issue, KeyCustody
from vtpm.manager.deepquote import DeepQuoter
from vtpm.manager.forkserver import ForkServer
from vtpm.manager.frontdoor import FrontDoor
from vtpm.manager.groupops import GroupOps
from vtpm.manager.groups import GroupKeys
from vtpm.manager.hwtpm import HardwareTpm
from vtpm.manager.launch import Launches
from vtpm.manager.links import Links
from vtpm.manager.quotes import DeepQuotes
from vtpm.manager.simulator import Simulator
from vtpm.manager.statesecret import Secrets
from vtpm.manager.store import Store, database_present
from vtpm.manager.supervisor import Supervisor
from vtpm.manager.vtpms import VtpmRegistry

log = logging.getLogger(__name__)

ADMIN_CLIENTS = 256  # admin connections served at once (deep quotes wait for their batch)
ADMIN_PER_UID = 64  # of which one non-root administrator may hold (root may hold them all)
SWEEP_EVERY = 2.0  # seconds between checks for front-door vTPMs their orchestrator removed


class Manager:
    def __init__(
        self,
        config: ManagerConfig,
        *,
        accept_rollback: bool = False,
        issue: Issue | None = None,
        forkserver: bool = False,
    ) -> None:
        self.config = config
        self.issue = issue  # the certificate issuer; None: the group CA (tests inject theirs)
        self.accept_rollback = accept_rollback  # start once on an older data directory
        # fork instances from a template: for the service process only (`vtpm manager run`),
        # as it makes the whole process a child subreaper (see forkserver)
        self.use_forkserver = forkserver
        self.store = Store(config.db_path)
        self.floor: floor.Floor | None = None
        self.simulator: Simulator | None = None
        self.hw: HardwareTpm | None = None
        self.admin_server: Server | None = None
        self.started = time.time()
        self._stop = threading.Event()
        self._services: Services | None = None
        self._quoter: DeepQuoter | None = None
        self._supervisor: Supervisor | None = None
        self._frontdoor: FrontDoor | None = None
        self._forkserver: ForkServer | None = None

    @property
    def services(self) -> Services:
        if self._services is None:
            raise ManagerError("the Manager is not open")
        return self._services

    @property
    def groups(self) -> GroupKeys:
        return self.services.groups

    # lifecycle ------------------------------------------------------------------------------

    def open(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (cfg.run_dir, cfg.log_dir, cfg.data_dir / "vtpms"):
            d.mkdir(mode=0o700, exist_ok=True)
        if cfg.labels_file is not None:
            LabelMap.load(cfg.labels_file)  # a policy file that does not parse stops the start
        compat = CompatConfig.load(cfg.data_dir)  # so does a front door's configuration
        present = database_present(cfg.db_path)
        floor.refuse_lost_database(cfg, present)
        try:
            tcti = self._tcti()  # its simulator (if any) comes back through `revive`
            revive = None if self.simulator is None else self.simulator.revive
            self.hw = HardwareTpm(tcti, revive=revive)
            self.hw.open()
            if not present:
                floor.refuse_floored_tpm(self.hw, cfg.db_path)
            self.store.open()
            checked = floor.Floor(self.store, self.hw)
            value = checked.open(accept_rollback=self.accept_rollback)
            self.floor = checked  # only a floor that passed its check advances at close
            self.store.audit_listener = checked.note
            log.info("floor: NV 0x%08x at %d", checked.handle, value)
            groups = GroupKeys(self.store, self.hw)
            groups.refresh()
            self._services = self._build(groups, self.hw, compat)
        except BaseException:
            self.close()
            raise
        for g in self.store.groups():
            st = groups.status(g.uuid)
            if st.unlocked:
                log.info("group %s (%s): unlocked", g.name, g.uuid)
            else:
                log.warning("group %s (%s): LOCKED: %s", g.name, g.uuid, st.reason)
        log.info("Manager open: data %s, hardware TPM %s", cfg.data_dir, self.hw.description)

    def _tcti(self) -> str:
        """The configured TCTI, else /dev/tpmrm0, else a simulator started (or adopted) here."""
        cfg = self.config
        if cfg.tcti is not None:
            return cfg.tcti
        if HW_DEVICE.exists():
            return f"device:{HW_DEVICE}"
        self.simulator = Simulator(cfg.simulator_dir)
        tcti = self.simulator.start()
        log.warning(
            "no hardware TPM configured and %s is absent: using a swtpm simulator as "
            "the hardware TPM (%s, state in %s); it protects nothing on a real host",
            HW_DEVICE,
            "adopted a running one" if self.simulator.reused else "started",
            cfg.simulator_dir,
        )
        return tcti

    def _build(self, groups: GroupKeys, hw: HardwareTpm, compat: CompatConfig | None) -> Services:
        """The services, each given what it acts on (no service knows the Manager)."""
        cfg, store = self.config, self.store
        links = Links()
        secrets = Secrets()
        ca = GroupCa(store, groups, vtpms_dir=cfg.data_dir / "vtpms")
        group_ops = GroupOps(store, groups, ca)
        self._quoter = DeepQuoter(group_ops.host_quote, cfg.quote_window)
        quotes = DeepQuotes(store, groups, self._quoter, links)
        issue = self.issue or ca.issue_for
        custody = KeyCustody(store, groups, links, quotes.for_guest, issue, secrets)
        if self.use_forkserver:
            self._forkserver = ForkServer(cfg.log_dir / "template.log")
            self._forkserver.start()
        self._supervisor = Supervisor(custody.serve, self._forkserver)
        vtpms = VtpmRegistry(cfg, store, groups, self._supervisor)
        if compat is not None:
            try:
                self._frontdoor = FrontDoor(
                    compat, cfg, store, groups, vtpms, self._supervisor, secrets
                )
            except VtpmError as e:  # the rest of the Manager serves; the front door waits
                log.error("front door not opened: %s (fix it: vtpm compat enable)", e)
        return Services(
            config=cfg,
            store=store,
            hw=hw,
            hw_note=self._hw_note,
            groups=groups,
            group_ops=group_ops,
            ca=ca,
            vtpms=vtpms,
            launches=Launches(cfg, store, groups, vtpms, self._supervisor),
            quotes=quotes,
            supervisor=self._supervisor,
            started=self.started,
            sweep=self._sweep,
        )

    def _sweep(self) -> None:
        if self._frontdoor is not None:
            self._frontdoor.sweep()

    def _hw_note(self) -> str:
        if self.simulator is None:
            return ""
        return (
            f"no hardware TPM configured: a swtpm simulator stands in for it "
            f"(pid {self.simulator.pid}, state in {self.config.simulator_dir}); it protects nothing"
        )

    def listen(self) -> None:
        """Serve the front door (if configured), then the admin protocol on the admin socket:
        an admin socket that accepts means every socket of the Manager does."""
        cfg = self.config
        if self._frontdoor is not None:
            self._frontdoor.listen()
        policy = SocketPolicy(0o660 if cfg.admin_gid is not None else 0o600, None, cfg.admin_gid)
        ep = Endpoint("unix", path=str(cfg.admin_socket))
        handler = AdminHandler(AdminService(self.services))
        self.admin_server = Server(
            "admin",
            bind(ep, policy),
            handler,
            policy,
            ADMIN_CLIENTS,
            ep,
            max_per_uid=ADMIN_PER_UID,
            refuse=AdminHandler.refuse,
        )
        self.admin_server.start()
        log.info("admin socket %s", cfg.admin_socket)

    def autostart(self) -> None:
        self.services.vtpms.autostart()

    def run(self) -> None:
        swept = time.monotonic()
        while not self._stop.wait(0.2):
            self.services.supervisor.poll()
            if self.floor is not None:
                self.floor.tick()
            if time.monotonic() - swept >= SWEEP_EVERY:
                swept = time.monotonic()
                try:
                    self._sweep()
                except Exception:
                    log.exception("the check for removed front-door vTPMs failed")

    def request_stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self._frontdoor is not None:
            self._frontdoor.close()  # no new attach while the instances stop
            self._frontdoor = None
        if self._supervisor is not None:
            self._supervisor.stop_all()
        if self._forkserver is not None:
            self._forkserver.close()
            self._forkserver = None
        if self._quoter is not None:
            self._quoter.close()
            self._quoter = None
        if self.admin_server is not None:
            self.admin_server.close()
            self.admin_server = None
        if self.floor is not None:
            self.store.audit_listener = None
            self.floor.close()
            self.floor = None
        if self.hw is not None:
            self.hw.close()
            self.hw = None
        if self.simulator is not None:
            self.simulator.stop()
            self.simulator = None
        self.store.close()
        log.info("Manager stopped")
