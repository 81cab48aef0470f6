"""Where a vTPM's measured-launch files live beside its state: the launch record the Manager
writes (`vtpms/<uuid>.launch.json`) and the event log the instance writes (`.eventlog`)."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from vtpm.manager.config import ManagerConfig

log = logging.getLogger(__name__)


def record_path(config: ManagerConfig, vtpm_uuid: uuid.UUID) -> Path:
    return config.data_dir / "vtpms" / f"{vtpm_uuid}.launch.json"


def event_log_path(config: ManagerConfig, vtpm_uuid: uuid.UUID) -> Path:
    return config.data_dir / "vtpms" / f"{vtpm_uuid}.eventlog"


def forget(config: ManagerConfig, vtpm_uuid: uuid.UUID) -> None:
    """Remove the vTPM's launch record and event log (a withdrawn launch, a deleted vTPM)."""
    for path in (record_path(config, vtpm_uuid), event_log_path(config, vtpm_uuid)):
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.error("vTPM %s: cannot remove %s: %s", vtpm_uuid, path, e.strerror)
