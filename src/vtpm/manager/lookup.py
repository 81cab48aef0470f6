"""Finding a group or a vTPM by what an administrator typed: found, or one clear error."""

from __future__ import annotations

import uuid

from vtpm.errors import ManagerError, RequestError
from vtpm.manager.store import GroupRecord, Store, VtpmRecord


def group(store: Store, ref: str) -> GroupRecord:
    """The group named `ref` (a name or a uuid)."""
    g = store.group(ref)
    if g is None:
        raise ManagerError(f"no group {ref!r}")
    return g


def vtpm(store: Store, ref: uuid.UUID | str) -> VtpmRecord:
    """The vTPM with uuid `ref`."""
    if isinstance(ref, str):
        try:
            u = uuid.UUID(ref)
        except ValueError:
            raise RequestError(f"{ref[:80]!r} is not a vTPM uuid") from None
    else:
        u = ref
    rec = store.vtpm(u)
    if rec is None:
        raise ManagerError(f"no vTPM {u}")
    return rec
