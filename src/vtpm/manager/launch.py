"""The Manager's part of a measured launch: check, place the record, restart the instance.

`launch()` refuses before touching anything when the vTPM's label differs from the one the
launcher names, when the vTPM is not TPM 2.0, or when its group is locked. Then it writes the
launch record beside the vTPM (`vtpms/<uuid>.launch.json`; the instance writes the event log
`vtpms/<uuid>.eventlog`) and restarts the vTPM's instance with `--launch FILE` for that one
process: the supervisor's restarts run without it, so a launch never outlives its instance.
The instance makes the TPM fresh and rehearses the extends before it reports ready; if it
cannot, the launch is refused and the vTPM is put back as it was (running plain if it was
running, stopped otherwise). `cancel()` withdraws a launch whose guest did not start.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from vtpm.errors import LaunchError, VtpmError
from vtpm.launchrecord import LaunchRecord

if TYPE_CHECKING:
    from vtpm.manager.service import Manager
    from vtpm.manager.store import VtpmRecord

log = logging.getLogger(__name__)


def record_path(m: Manager, vtpm_uuid: uuid.UUID) -> Path:
    return m.config.data_dir / "vtpms" / f"{vtpm_uuid}.launch.json"


def event_log_path(m: Manager, vtpm_uuid: uuid.UUID) -> Path:
    return m.config.data_dir / "vtpms" / f"{vtpm_uuid}.eventlog"


def label_refusal(vtpm_uuid: object, label: str, wanted: str | None) -> str:
    """Why a launch that names the label `wanted` is refused for a vTPM labelled `label`."""
    if wanted is not None and wanted != label:
        return f"vTPM {vtpm_uuid} has label {label}, not {wanted}"
    return ""


def _running(m: Manager, vtpm_uuid: uuid.UUID) -> bool:
    child = m.supervisor.child(vtpm_uuid)
    return child is not None and child.state in ("running", "starting")


def _refusal(m: Manager, rec: VtpmRecord, label: str | None) -> str:
    """Why the vTPM cannot take a launch (checked before anything is touched), or ""."""
    why = label_refusal(rec.uuid, rec.label, label)
    if why:
        return why
    if rec.tpm != "2.0":
        return f"vTPM {rec.uuid} is a TPM {rec.tpm}; a measured launch needs TPM 2.0"
    g = m.group(str(rec.group_uuid))
    m.groups.refresh()
    st = m.groups.status(g.uuid)
    return "" if st.unlocked else f"group {g.name} is locked: {st.reason}"


def launch(
    m: Manager, vtpm_uuid: uuid.UUID, record: LaunchRecord, *, label: str | None, actor: str
) -> LaunchRecord:
    """Arm `record` on a fresh instance of the vTPM; the record as placed, or LaunchError."""
    rec = m.vtpm(str(vtpm_uuid))
    target = str(rec.uuid)
    why = _refusal(m, rec, label)
    if why:
        m.store.audit(actor, "vtpm.launch", target, "refused", {"why": why})
        raise LaunchError(f"launch refused: {why}")

    placed = record.with_place(rec.uuid, event_log_path(m, rec.uuid))
    path = record_path(m, rec.uuid)
    was_running = _running(m, rec.uuid)
    try:
        placed.save(path)
    except OSError as e:
        raise LaunchError(f"cannot write the launch record {path}: {e.strerror}") from None
    m.supervisor.stop(rec.uuid)
    try:
        m.start_vtpm(rec.uuid, actor=actor, once=("--launch", str(path)))
    except VtpmError as e:
        m.supervisor.stop(rec.uuid)  # one that did not come up in time
        path.unlink(missing_ok=True)
        _restore(m, rec.uuid, was_running, actor)
        m.store.audit(actor, "vtpm.launch", target, "refused", {"why": str(e)})
        raise LaunchError(f"launch refused: {e}") from None
    m.store.audit(
        actor,
        "vtpm.launch",
        target,
        "ok",
        {"events": [f"PCR {x.pcr} {x.event_data}" for x in placed.measurements]},
    )
    log.info("vTPM %s: measured launch armed (%s)", rec.uuid, path)
    return placed


def cancel(m: Manager, vtpm_uuid: uuid.UUID, *, actor: str) -> None:
    """Withdraw a launch (its guest did not start): the instance runs again without it."""
    rec = m.vtpm(str(vtpm_uuid))
    m.supervisor.stop(rec.uuid)
    forget(m, rec.uuid)
    m.store.audit(actor, "vtpm.launch.cancel", str(rec.uuid), "ok", {})
    _restore(m, rec.uuid, True, actor)


def forget(m: Manager, vtpm_uuid: uuid.UUID) -> None:
    """Remove the vTPM's launch record and event log (a withdrawn launch, a deleted vTPM)."""
    for path in (record_path(m, vtpm_uuid), event_log_path(m, vtpm_uuid)):
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.error("vTPM %s: cannot remove %s: %s", vtpm_uuid, path, e.strerror)


def _restore(m: Manager, vtpm_uuid: uuid.UUID, was_running: bool, actor: str) -> None:
    if not was_running:
        m.store.set_wanted_running(vtpm_uuid, False)
        return
    try:
        m.start_vtpm(vtpm_uuid, actor=actor)
    except VtpmError as e:
        log.error("vTPM %s: not restarted after a withdrawn launch: %s", vtpm_uuid, e)
