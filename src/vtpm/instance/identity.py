"""The non-secret identity file of a state directory: which vTPM (uuid) and which TPM version.

Kept in `instance.json` beside the encrypted blobs so that a restart with a forgotten or wrong
`--uuid` / `--tpm` fails with a clear message instead of an integrity error.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from vtpm.engine.engine import TpmVersion
from vtpm.errors import ConfigError, StateError
from vtpm.files import write_atomic

FILENAME = "instance.json"
MAX_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Identity:
    vtpm_uuid: uuid.UUID
    tpm_version: TpmVersion


def read(state_dir: Path) -> Identity | None:
    """The recorded identity, None if there is none yet, StateError if it is unreadable."""
    path = state_dir / FILENAME
    try:  # the directory may be another user's: a symlink planted here is not followed
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StateError(f"{path} cannot be read ({e.strerror}); refusing to start") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StateError(f"{path} is not a regular file; refusing to start")
        text = os.read(fd, MAX_SIZE + 1)
    except OSError as e:
        raise StateError(f"{path} cannot be read ({e.strerror}); refusing to start") from None
    finally:
        os.close(fd)
    try:
        raw = json.loads(text)
        return Identity(uuid.UUID(raw["uuid"]), TpmVersion(raw["tpm"]))
    except (ValueError, KeyError, TypeError) as e:  # what json, uuid and TpmVersion raise
        raise StateError(f"{path} is unreadable ({e}); refusing to start") from None


def write(state_dir: Path, ident: Identity) -> None:
    data = json.dumps({"uuid": str(ident.vtpm_uuid), "tpm": ident.tpm_version.value}) + "\n"
    write_atomic(state_dir / FILENAME, data.encode())


def resolve(state_dir: Path, wanted_uuid: uuid.UUID | None, version: TpmVersion) -> Identity:
    """The identity to run with: the recorded one, checked against what was asked for."""
    known = read(state_dir)
    if known is None:
        ident = Identity(wanted_uuid or uuid.uuid4(), version)
        write(state_dir, ident)
        return ident
    if wanted_uuid is not None and wanted_uuid != known.vtpm_uuid:
        raise ConfigError(
            f"{state_dir} holds vTPM {known.vtpm_uuid}, not {wanted_uuid}; refusing to start"
        )
    if known.tpm_version is not version:
        raise ConfigError(
            f"{state_dir} holds a TPM {known.tpm_version.value}, not {version.value}; "
            f"pass --tpm {known.tpm_version.value}"
        )
    return known
