"""The vTPMs of the Manager and their life: create, start (through the supervisor), stop,
delete. Each change is recorded in the store and audited; whether a vTPM should be running
survives a restart of the Manager (`wanted_running`).
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from vtpm import files, instanceargs
from vtpm import labels as lbl
from vtpm.endpoints import Endpoint, Frontend, FrontendKind
from vtpm.errors import (
    ConfigError,
    InstanceExitedError,
    LabelError,
    ManagerError,
    RequestError,
    VtpmError,
)
from vtpm.instanceargs import ManagedInstance
from vtpm.manager import launchfiles, lookup
from vtpm.manager.ca import certs_dir
from vtpm.manager.config import ManagerConfig
from vtpm.manager.custody import group_permits
from vtpm.manager.groups import GroupKeys
from vtpm.manager.store import LocationRecord, Store, VtpmRecord, label_taken
from vtpm.manager.supervisor import Supervisor
from vtpm.tpm import ektemplates

log = logging.getLogger(__name__)

TPM_VERSIONS = ("2.0", "1.2")
READY_TIMEOUT = 30.0
DEFAULT_EKS = ektemplates.DEFAULT_PROVISION
TPM12_NO_EK = (
    "EKs and their certificates are provisioned in TPM 2.0 vTPMs only: a TPM 1.2 EK "
    "certificate (NV 0x1000F000) is not made by this version"
)


def check_eks(names: Sequence[str]) -> tuple[str, ...]:
    """`--ek` names (EKs and "platform"), each once, in order; RequestError for others."""
    known = (*ektemplates.EKS, ektemplates.PLATFORM)
    for n in names:
        if n not in known:
            raise RequestError(f"EK {n!r}: use any of {', '.join(known)}")
    return tuple(dict.fromkeys(names))


class VtpmRegistry:
    def __init__(
        self, config: ManagerConfig, store: Store, groups: GroupKeys, supervisor: Supervisor
    ) -> None:
        self._config = config
        self._store = store
        self._groups = groups
        self._supervisor = supervisor
        # creates one at a time: a label is checked free and taken in one step (the store's
        # unique index on vtpms.label is the last word)
        self._creating = threading.Lock()

    def new(
        self,
        group_ref: str,
        label: str,
        *,
        tpm: str = "2.0",
        vtpm_uuid: uuid.UUID | None = None,
        owner: tuple[int, int] | None = None,
        frontends: Sequence[Frontend] = (),
        eks: Sequence[str] = (),
        location: LocationRecord | None = None,
        actor: str,
    ) -> VtpmRecord:
        """A new vTPM; `eks` (`--ek` names, "platform" among them) are provisioned at its
        first start. A TPM 1.2 vTPM takes none (`DEFAULT_EKS` given for one is dropped).
        `location`: a front-door vTPM's state location (its uuid is `vtpm_uuid`); such a vTPM
        has no frontends of its own (its orchestrator passes sockets at each start)."""
        g = lookup.group(self._store, group_ref)
        parsed = lbl.Label.parse(label)
        if parsed.is_wildcard:
            raise LabelError("a vTPM's label names its user; '*' is for group rules only")
        if not group_permits(g, parsed):
            raise LabelError(f"group {g.name} does not permit label {parsed}")
        if tpm not in TPM_VERSIONS:
            raise RequestError(f"TPM version {tpm!r}: use 2.0 or 1.2")
        if tpm == "1.2":
            if eks and tuple(eks) != DEFAULT_EKS:
                raise RequestError(TPM12_NO_EK)
            eks = ()
        wanted = check_eks(eks)
        u = vtpm_uuid or uuid.uuid4()
        if location is not None and location.vtpm_uuid != u:
            raise ManagerError("a state location names its own vTPM")
        if not frontends and location is None:
            ctrl = Endpoint("unix", path=str(self._config.run_dir / f"{u}.ctrl"))
            frontends = (Frontend(FrontendKind.CTRL, ctrl),)
        with self._creating:
            holder = self._store.vtpm_by_label(str(parsed))
            if holder is not None:
                self._store.audit(
                    actor,
                    "vtpm.new",
                    str(u),
                    "refused",
                    {"why": "label taken", "label": str(parsed)},
                )
                raise ConfigError(label_taken(str(parsed), holder.uuid))
            self._groups.refresh()
            wrapped = self._groups.wrap_state_key(g.uuid, u, secrets.token_bytes(32))
            rec = VtpmRecord(
                uuid=u,
                group_uuid=g.uuid,
                label=str(parsed),
                tpm=tpm,
                owner_uid=None if owner is None else owner[0],
                owner_gid=None if owner is None else owner[1],
                frontends=tuple(str(f) for f in frontends),
                wrapped_key=wrapped,
                created=time.time(),
            )
            self._store.add_vtpm(rec, location)
            if wanted:
                self._want_eks(u, wanted)
        self._store.audit(actor, "vtpm.new", str(u), "ok", {"group": g.name, "label": rec.label})
        return rec

    # EKs ----------------------------------------------------------------------------------------

    def _pending(self, vtpm_uuid: uuid.UUID) -> Path:
        """The EKs a vTPM still has to provision, until a start of it has come up with them."""
        return self._config.data_dir / "vtpms" / f"{vtpm_uuid}.ek-pending"

    def _want_eks(self, vtpm_uuid: uuid.UUID, eks: tuple[str, ...]) -> None:
        try:
            files.write_atomic(self._pending(vtpm_uuid), ",".join(eks).encode(), 0o600)
        except OSError as e:
            raise ManagerError(f"cannot record the EKs to provision: {e.strerror}") from None

    def _pending_eks(self, vtpm_uuid: uuid.UUID) -> tuple[str, ...]:
        try:
            text = self._pending(vtpm_uuid).read_text()
        except FileNotFoundError:
            return ()
        except (OSError, UnicodeDecodeError) as e:
            log.error("vTPM %s: the EKs to provision cannot be read: %s", vtpm_uuid, e)
            return ()
        return check_eks(tuple(n for n in text.split(",") if n))

    def provision_eks(self, vtpm_uuid: uuid.UUID, eks: Sequence[str], *, actor: str) -> None:
        """`vtpm ek provision`: restart the instance once with `--ek` (it comes back running
        whether or not it ran before: provisioning needs the instance)."""
        rec = lookup.vtpm(self._store, vtpm_uuid)
        if rec.tpm != "2.0":
            raise RequestError(TPM12_NO_EK)
        wanted = check_eks(eks)
        if not wanted:
            raise RequestError("vtpm ek provision: name at least one EK or platform")
        self._want_eks(rec.uuid, wanted)
        self._supervisor.stop(rec.uuid)
        self.start(rec.uuid, actor=actor)
        self._store.audit(actor, "vtpm.ek.provision", str(rec.uuid), "ok", {"eks": list(wanted)})

    def instance(self, rec: VtpmRecord) -> ManagedInstance:
        """How the vTPM's instance is started."""
        return ManagedInstance(
            vtpm_uuid=rec.uuid,
            tpm=rec.tpm,
            state_dir=self._config.vtpm_dir(rec.uuid),
            label=rec.label,
            frontends=tuple(Frontend.parse(f) for f in rec.frontends),
            socket_owner=rec.owner_uid,
            socket_group=rec.owner_gid,
            labels_file=self._config.labels_file,
        )

    def start(
        self, vtpm_uuid: uuid.UUID, *, wait: bool = True, actor: str, once: Sequence[str] = ()
    ) -> None:
        """Start the vTPM's instance; `once`: extra arguments for this process, not restarts."""
        rec = lookup.vtpm(self._store, vtpm_uuid)
        loc = self._store.location(rec.uuid)
        if loc is not None:
            raise ManagerError(
                f"vTPM {rec.uuid} is run by its orchestrator (state at {loc.path}): it starts "
                "with its VM, through the front door"
            )
        self.check_unlocked(rec, "vtpm.start", actor)
        log_file = self._config.log_dir / f"{rec.uuid}.log"
        eks = self._pending_eks(rec.uuid)
        once = [*once, *instanceargs.ek(eks), *self.accept_once(rec)]
        self._supervisor.start(rec.uuid, self.instance(rec).argv(), log_file, once)
        self._store.set_wanted_running(rec.uuid, True)
        self._store.audit(actor, "vtpm.start", str(rec.uuid), "ok", {})
        if not wait:
            if rec.accept_state:
                self._store.set_accept_state(rec.uuid, False)
            return
        try:
            self._supervisor.wait_ready(rec.uuid, READY_TIMEOUT)
        except InstanceExitedError:
            self._store.set_wanted_running(rec.uuid, False)
            raise
        if eks:  # provisioned: later starts go without --ek (unwaited ones ask again)
            self._pending(rec.uuid).unlink(missing_ok=True)
        if rec.accept_state:  # accepted and recorded: later starts check as before
            self._store.set_accept_state(rec.uuid, False)

    def check_unlocked(self, rec: VtpmRecord, action: str, actor: str) -> None:
        """ManagerError (audited) when the vTPM's group is locked in the host's state now."""
        g = lookup.group(self._store, str(rec.group_uuid))
        self._groups.refresh()
        st = self._groups.status(g.uuid)
        if not st.unlocked:
            self._store.audit(actor, action, str(rec.uuid), "refused", {"why": st.reason})
            raise ManagerError(
                f"vTPM {rec.uuid} cannot start: group {g.name} is locked: {st.reason}"
            )

    @staticmethod
    def accept_once(rec: VtpmRecord) -> list[str]:
        """`--accept-state` when an administrator asked for it (`accept_state`)."""
        return [instanceargs.ACCEPT_STATE] if rec.accept_state else []

    def accept_state(self, vtpm_uuid: uuid.UUID, *, actor: str) -> VtpmRecord:
        """`vtpm accept-state`: the vTPM's next start accepts the state blobs on disk that
        open under its key but are not the ones recorded (and records them), once."""
        rec = lookup.vtpm(self._store, vtpm_uuid)
        self._store.set_accept_state(rec.uuid, True)
        self._store.audit(actor, "vtpm.accept-state", str(rec.uuid), "ok", {})
        log.warning("vTPM %s: its next start accepts the state on disk (%s)", rec.uuid, actor)
        return lookup.vtpm(self._store, rec.uuid)

    def stop(self, vtpm_uuid: uuid.UUID, *, actor: str) -> bool:
        rec = lookup.vtpm(self._store, vtpm_uuid)
        self._store.set_wanted_running(rec.uuid, False)
        was = self._supervisor.stop(rec.uuid)
        self._store.audit(actor, "vtpm.stop", str(rec.uuid), "ok", {"was_running": was})
        return was

    def delete(self, vtpm_uuid: uuid.UUID, *, actor: str) -> None:
        rec = lookup.vtpm(self._store, vtpm_uuid)
        self._supervisor.stop(rec.uuid)
        self._supervisor.forget(rec.uuid)
        shutil.rmtree(self._config.vtpm_dir(rec.uuid), ignore_errors=True)
        shutil.rmtree(certs_dir(self._config.vtpm_dir(rec.uuid)), ignore_errors=True)
        launchfiles.forget(self._config, rec.uuid)
        self._pending(rec.uuid).unlink(missing_ok=True)
        self._store.delete_vtpm(rec.uuid)
        self._store.audit(actor, "vtpm.del", str(rec.uuid), "ok", {"group": str(rec.group_uuid)})

    def autostart(self) -> None:
        """Start the vTPMs that were running when the Manager last stopped."""
        for v in self._store.vtpms():
            if v.wanted_running:
                try:
                    self.start(v.uuid, wait=False, actor="manager")
                except VtpmError as e:
                    log.error("vTPM %s not started: %s", v.uuid, e)
