"""The Manager's part of a measured launch: check, place the record, restart the instance.

`launch()` refuses before touching anything when the vTPM's label differs from the one the
launcher names, when the vTPM is not TPM 2.0, or when its group is locked. Then it writes the
launch record beside the vTPM (`launchfiles.record_path`; the instance writes the event log) and
restarts the vTPM's instance with `--launch FILE` for that one process: the supervisor's
restarts run without it, so a launch never outlives its instance. The instance makes the TPM
fresh and rehearses the extends before it reports ready; if it cannot, the launch is refused and
the vTPM is put back as it was (running plain if it was running, stopped otherwise).
`cancel()` withdraws a launch whose guest did not start.
"""

from __future__ import annotations

import logging
import uuid

from vtpm import instanceargs
from vtpm.errors import LaunchError, VtpmError
from vtpm.launchrecord import LaunchRecord, label_refusal
from vtpm.manager import launchfiles, lookup
from vtpm.manager.config import ManagerConfig
from vtpm.manager.groups import GroupKeys
from vtpm.manager.store import GroupRecord, Store, VtpmRecord
from vtpm.manager.supervisor import Supervisor
from vtpm.manager.vtpms import VtpmRegistry

log = logging.getLogger(__name__)


def refusal(rec: VtpmRecord, g: GroupRecord, unlocked: bool, reason: str, label: str | None) -> str:
    """Why the vTPM cannot take a launch (checked before anything is touched), or ""."""
    why = label_refusal(rec.uuid, rec.label, label)
    if why:
        return why
    if rec.tpm != "2.0":
        return f"vTPM {rec.uuid} is a TPM {rec.tpm}; a measured launch needs TPM 2.0"
    return "" if unlocked else f"group {g.name} is locked: {reason}"


class Launches:
    def __init__(
        self,
        config: ManagerConfig,
        store: Store,
        groups: GroupKeys,
        registry: VtpmRegistry,
        supervisor: Supervisor,
    ) -> None:
        self._config = config
        self._store = store
        self._groups = groups
        self._registry = registry
        self._supervisor = supervisor

    def launch(
        self, vtpm_uuid: uuid.UUID, record: LaunchRecord, *, label: str | None, actor: str
    ) -> LaunchRecord:
        """Arm `record` on a fresh instance of the vTPM; the record as placed, or LaunchError."""
        rec = lookup.vtpm(self._store, vtpm_uuid)
        target = str(rec.uuid)
        g = lookup.group(self._store, str(rec.group_uuid))
        self._groups.refresh()
        st = self._groups.status(g.uuid)
        why = refusal(rec, g, st.unlocked, st.reason, label)
        if why:
            self._store.audit(actor, "vtpm.launch", target, "refused", {"why": why})
            raise LaunchError(f"launch refused: {why}")

        placed = record.with_place(rec.uuid, launchfiles.event_log_path(self._config, rec.uuid))
        path = launchfiles.record_path(self._config, rec.uuid)
        was_running = self._supervisor.active(rec.uuid)
        try:
            placed.save(path)
        except OSError as e:
            raise LaunchError(f"cannot write the launch record {path}: {e.strerror}") from None
        self._supervisor.stop(rec.uuid)
        try:
            self._registry.start(rec.uuid, actor=actor, once=instanceargs.launch(path))
        except VtpmError as e:
            self._supervisor.stop(rec.uuid)  # one that did not come up in time
            path.unlink(missing_ok=True)
            self._restore(rec.uuid, was_running, actor)
            self._store.audit(actor, "vtpm.launch", target, "refused", {"why": str(e)})
            raise LaunchError(f"launch refused: {e}") from None
        events = [f"PCR {x.pcr} {x.event_data}" for x in placed.measurements]
        self._store.audit(actor, "vtpm.launch", target, "ok", {"events": events})
        log.info("vTPM %s: measured launch armed (%s)", rec.uuid, path)
        return placed

    def cancel(self, vtpm_uuid: uuid.UUID, *, actor: str) -> None:
        """Withdraw a launch (its guest did not start): the instance runs again without it."""
        rec = lookup.vtpm(self._store, vtpm_uuid)
        self._supervisor.stop(rec.uuid)
        launchfiles.forget(self._config, rec.uuid)
        self._store.audit(actor, "vtpm.launch.cancel", str(rec.uuid), "ok", {})
        self._restore(rec.uuid, True, actor)

    def _restore(self, vtpm_uuid: uuid.UUID, was_running: bool, actor: str) -> None:
        if not was_running:
            self._store.set_wanted_running(vtpm_uuid, False)
            return
        try:
            self._registry.start(vtpm_uuid, actor=actor)
        except VtpmError as e:
            log.error("vTPM %s: not restarted after a withdrawn launch: %s", vtpm_uuid, e)
