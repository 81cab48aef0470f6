"""The floor under the Manager's own state: a monotonic NV counter in the hardware TPM.

Restoring an older copy of the whole data directory (database and state blobs together) looks
consistent from the inside: every blob matches its recorded digest. Only something outside
the directory can tell it is old. The floor is a TPM2_NT_COUNTER NV index in the hardware TPM
(it only ever goes up, and survives TPM reboots) plus the value the database last knew of it
(`meta.floor_value`). At start the two must agree; a database whose value is below the
counter is an older copy, and the Manager refuses to start.

The index: owner-authorised (OWNERREAD | OWNERWRITE with the owner hierarchy's auth, empty,
as the rest of the Manager uses it), NO_DA, at FLOOR_FIRST or the first free handle above it
(up to FLOOR_LAST; 0x01500100 and up belong to the groups' approval indices). Its handle is
recorded in `meta.floor_nv`. Its authPolicy, which authorises nothing (no POLICYREAD or
POLICYWRITE), is SHA-256(TAG || manager uuid): it names the Manager the index belongs to, so a
database from before its Manager defined the index (it records no handle, but an index with
its uuid exists) is recognised as an older copy too, and a lost database can be told from a
Manager that never had one (any written floor index in the range).

When it advances: at every start (after the check), at every orderly stop (after the
instances stored their last state), and after every administrative change that matters
(FLOORED_ACTIONS, as audited by the store; performed by `tick` from the Manager's loop, so
bursts coalesce). Never per state write: a real TPM's NV endures some 100k..1M writes. Each
advance takes a token from a bucket of BUCKET_SIZE refilled one per REFILL_SECONDS (kept in
the meta table): at most BUCKET_SIZE + 48 a day even for a Manager restarted in a loop, about
17.5k a year; an advance without a token waits (`due`) until one comes. Not ORDERLY: an
orderly counter may jump forward after a power loss by up to its orderly interval, which is
indistinguishable here from a restored copy and would lock the Manager out.

Crashes. An advance is: (1) record `floor_pending` = value + 1 (committed, synchronous FULL),
(2) TPM2_NV_Increment, (3) record `floor_value` = the counter as read back and drop
`floor_pending`, in one transaction. At start the counter N is accepted when N == floor_value
(a crash before (2), or none) or N == floor_pending (a crash between (2) and (3)); nothing
else. The marker is what makes N == floor_value + 1 safe to accept: a copy taken at rest has
no marker, so a copy from just before the last advance is still refused. An advance begins
by reconciling the same way, so a failed (3) (full disk) never leads to a second increment
the database has not heard of. Before its first increment a counter has no value at all and
its first one sets it to the highest any counter of the TPM ever had; so on a new index the
handle is recorded first (no `floor_value`), then defined, incremented and read back, and
whatever it reads is recorded: a crash anywhere in that resumes from the recorded handle.

What remains (README, "Rollback of the Manager's own state"): a copy taken while the Manager
ran, after its last advance, and put back after that Manager died without an orderly stop
(kill -9, power loss), passes: it is a state the floor has seen as current. So does any copy
while an advance waits for a token. Whoever holds the owner hierarchy's auth (root, when it
is empty) can undefine the index; the floor protects against restored backups and careless
copies, not against root on the host.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpm2_pytss import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_NT,
    TPM2B_NV_PUBLIC,
    TPMA_NV,
    TPMS_NV_PUBLIC,
)

from vtpm.errors import HwTpmError, ManagerError
from vtpm.manager.config import ManagerConfig
from vtpm.manager.hwtpm import HardwareTpm
from vtpm.manager.store import Store

log = logging.getLogger(__name__)

FLOOR_FIRST = 0x01500000
FLOOR_LAST = 0x015000FF
TAG = b"vtpm manager floor\0"
COUNTER_SIZE = 8
BUCKET_SIZE = 64
REFILL_SECONDS = 1800.0
RETRY_SECONDS = 30.0  # after a failed advance (hardware TPM away), before the next try
FLOORED_ACTIONS = frozenset({"group.new", "group.update", "group.del", "vtpm.new", "vtpm.del"})
STATE_SUFFIXES = (".blob", ".next")  # an instance's state files (vtpm.instance.statestore)

ATTRIBUTES = (
    TPMA_NV.OWNERWRITE
    | TPMA_NV.OWNERREAD
    | TPMA_NV.NO_DA
    | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT)
)

K_HANDLE, K_VALUE, K_PENDING = "floor_nv", "floor_value", "floor_pending"
K_TOKENS, K_AT = "floor_tokens", "floor_at"


def policy_for(manager_uuid: str) -> bytes:
    """The authPolicy that names a Manager's floor index."""
    return hashlib.sha256(TAG + uuid.UUID(manager_uuid).bytes).digest()


def state_dirs(config: ManagerConfig) -> list[Path]:
    """The vTPM state directories that hold state files."""
    root = config.data_dir / "vtpms"
    if not root.is_dir():
        return []
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and any(f.name.endswith(STATE_SUFFIXES) for f in d.iterdir()):
            out.append(d)
    return out


def refuse_lost_database(config: ManagerConfig, present: bool) -> None:
    """Refuse a database that is missing or empty while vTPM state lies beside it: their
    wrapped keys were in it, and a new empty one would lose them for good."""
    if present:
        return
    dirs = state_dirs(config)
    if dirs:
        raise ManagerError(
            f"the Manager's database {config.db_path} is missing or empty, but "
            f"{config.data_dir / 'vtpms'} holds the state of {len(dirs)} vTPM(s) (e.g. "
            f"{dirs[0].name}) whose keys only it held: restore {config.db_path.name} from "
            f"the backup taken together with those state directories (nothing was changed)"
        )


@dataclass(frozen=True, slots=True)
class NvPublic:
    attributes: int
    auth_policy: bytes
    size: int
    name_alg: int

    @property
    def written(self) -> bool:
        return bool(self.attributes & TPMA_NV.WRITTEN)

    def is_floor(self) -> bool:
        return (
            self.attributes & ~TPMA_NV.WRITTEN == ATTRIBUTES
            and self.size == COUNTER_SIZE
            and self.name_alg == TPM2_ALG.SHA256
        )


class NvCounter:
    """TPM2 NV counter operations in FLOOR_FIRST..FLOOR_LAST, through `HardwareTpm.run`."""

    def __init__(self, hw: HardwareTpm) -> None:
        self.hw = hw

    def defined(self) -> list[int]:
        def op(ectx: Any) -> list[int]:
            _more, data = ectx.get_capability(
                TPM2_CAP.HANDLES, FLOOR_FIRST, FLOOR_LAST - FLOOR_FIRST + 1
            )
            return [int(h) for h in data.data.handles if FLOOR_FIRST <= int(h) <= FLOOR_LAST]

        return self.hw.run("listing NV indices", op)

    def public(self, handle: int) -> NvPublic | None:
        """The index's public area, or None if it is not defined."""
        if handle not in self.defined():
            return None

        def op(ectx: Any) -> NvPublic:
            nv = ectx.tr_from_tpmpublic(handle)
            try:
                pub, _name = ectx.nv_read_public(nv)
            finally:
                ectx.tr_close(nv)
            p = pub.nvPublic
            return NvPublic(int(p.attributes), bytes(p.authPolicy), int(p.dataSize), int(p.nameAlg))

        return self.hw.run(f"reading NV index 0x{handle:08x}'s public area", op)

    def define(self, handle: int, auth_policy: bytes) -> None:
        public = TPM2B_NV_PUBLIC(
            nvPublic=TPMS_NV_PUBLIC(
                nvIndex=handle,
                nameAlg=TPM2_ALG.SHA256,
                attributes=ATTRIBUTES,
                authPolicy=auth_policy,
                dataSize=COUNTER_SIZE,
            )
        )

        def op(ectx: Any) -> None:
            nv = ectx.nv_define_space(None, public, auth_handle=ESYS_TR.OWNER)
            ectx.tr_close(nv)

        self.hw.run(f"defining NV counter 0x{handle:08x}", op)

    def increment(self, handle: int) -> None:
        def op(ectx: Any) -> None:
            nv = ectx.tr_from_tpmpublic(handle)
            try:
                ectx.nv_increment(nv, auth_handle=ESYS_TR.OWNER)
            finally:
                ectx.tr_close(nv)

        self.hw.run(f"incrementing NV counter 0x{handle:08x}", op)

    def read(self, handle: int) -> int:
        def op(ectx: Any) -> int:
            nv = ectx.tr_from_tpmpublic(handle)
            try:
                data = ectx.nv_read(nv, COUNTER_SIZE, 0, auth_handle=ESYS_TR.OWNER)
            finally:
                ectx.tr_close(nv)
            return int.from_bytes(bytes(data), "big")

        return self.hw.run(f"reading NV counter 0x{handle:08x}", op)


def refuse_floored_tpm(hw: HardwareTpm, db_path: Path) -> None:
    """For a missing or empty database: refuse if the hardware TPM holds a written floor,
    i.e. a Manager using this TPM had a database that is gone now."""
    nv = NvCounter(hw)
    for handle in nv.defined():
        pub = nv.public(handle)
        if pub is not None and pub.is_floor() and pub.written:
            raise ManagerError(
                f"the Manager's database {db_path} is missing or empty, but the hardware TPM "
                f"holds a vtpm Manager's floor (NV 0x{handle:08x}): there was a database; "
                f"restore it from the backup taken together with the data directory, or, to "
                f"start this data directory over, run `vtpm manager init` (nothing was changed)"
            )


class Floor:
    """The Manager's floor: check at `open`, advance at start, stop and after admin changes.

    Thread-safe (one lock); `note` is the store's audit listener and only marks an advance
    due, `tick` (the Manager's loop) performs it."""

    def __init__(
        self, store: Store, hw: HardwareTpm, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._nv = NvCounter(hw)
        self._clock = clock
        self._lock = threading.Lock()
        self._handle = 0
        self._due = False
        self._next_try = 0.0

    @property
    def handle(self) -> int:
        return self._handle

    @property
    def due(self) -> bool:
        return self._due

    def _int(self, key: str) -> int | None:
        value = self._store.meta(key)
        return None if value is None else int(value, 0)

    # the check at start ---------------------------------------------------------------------

    def open(self, *, accept_rollback: bool = False) -> int:
        """Check the database against the counter (refusing an older copy), then advance.
        Returns the counter's value as the database now knows it."""
        with self._lock:
            manager_uuid = self._store.meta("manager_uuid") or ""
            auth_policy = policy_for(manager_uuid)
            handle = self._int(K_HANDLE)
            if handle is None:
                handle = self._first_handle(auth_policy, accept_rollback)
            pub = self._nv.public(handle)
            known = self._int(K_VALUE)
            if pub is None:
                if known is not None:
                    raise ManagerError(
                        f"the floor NV counter 0x{handle:08x} this database records is not in "
                        f"the hardware TPM: the TPM was cleared or replaced, or the index "
                        f"undefined; the Manager's state cannot be checked against it"
                    )
                self._nv.define(handle, auth_policy)
                pub = self._nv.public(handle)
            if pub is None or not pub.is_floor() or pub.auth_policy != auth_policy:
                raise ManagerError(
                    f"NV index 0x{handle:08x} in the hardware TPM is not this Manager's floor "
                    f"counter (its attributes or owner differ)"
                )
            if known is None:  # a new floor: whatever its first increment gives
                if not pub.written:
                    self._nv.increment(handle)
                self._record(self._nv.read(handle), spend=True)
            else:
                self._check(handle, self._nv.read(handle), known, accept_rollback)
                self._due = True  # the start's advance, performed just below
            self._handle = handle  # checked: from now on it advances
        if self._due:
            self.advance("start")
        return int(self._int(K_VALUE) or 0)

    def _first_handle(self, auth_policy: bytes, accept_rollback: bool) -> int:
        """The handle for a database that records none: the first free one, unless this
        Manager already has a floor (then the database is older than that floor)."""
        defined = self._nv.defined()
        for handle in defined:
            pub = self._nv.public(handle)
            if pub is not None and pub.is_floor() and pub.auth_policy == auth_policy:
                if not accept_rollback:
                    raise ManagerError(_rollback(f"its database predates NV 0x{handle:08x}"))
                log.warning("floor: a database from before NV 0x%08x accepted", handle)
                self._store.update_meta({K_HANDLE: f"0x{handle:08x}"})
                return handle
        free = next((h for h in range(FLOOR_FIRST, FLOOR_LAST + 1) if h not in defined), None)
        if free is None:
            raise HwTpmError(
                f"no free NV handle in 0x{FLOOR_FIRST:08x}..0x{FLOOR_LAST:08x} for the floor"
            )
        self._store.update_meta({K_HANDLE: f"0x{free:08x}"})  # before the define: a crash resumes
        log.info("floor: NV counter 0x%08x for this Manager", free)
        return free

    def _check(self, handle: int, counter: int, known: int, accept_rollback: bool) -> None:
        pending = self._int(K_PENDING)
        if counter == known or (pending is not None and counter == pending):
            if pending is not None:  # a crash within an advance: settle it
                self._record(counter, spend=counter == pending)
            return
        if counter < known:
            raise ManagerError(
                f"the floor NV counter 0x{handle:08x} reads {counter}, below the {known} this "
                f"database recorded: not the hardware TPM this data directory was made on"
            )
        if not accept_rollback:
            raise ManagerError(
                _rollback(f"the database knows {known}, NV 0x{handle:08x} reads {counter}")
            )
        log.warning("floor: an older data directory accepted (%d, counter %d)", known, counter)
        detail: dict[str, object] = {"database": known, "counter": counter}
        self._store.audit("manager", "floor.accept_rollback", f"0x{handle:08x}", "ok", detail)
        self._record(counter, spend=False)

    # advancing ------------------------------------------------------------------------------

    def note(self, action: str, outcome: str) -> None:
        """The store's audit listener: an administrative change that matters is due a floor."""
        if outcome == "ok" and action in FLOORED_ACTIONS:
            self._due = True

    def tick(self) -> None:
        if self._due and self._clock() >= self._next_try:
            self.advance("an administrative change")

    def close(self) -> None:
        """At an orderly stop: the state as it is now becomes the floor."""
        if self._handle:
            self.advance("stop")

    def advance(self, why: str) -> bool:
        """Increment the counter and record it, if a token is there; else mark it due."""
        with self._lock:
            if not self._handle:
                return False
            if not self._take_token():
                self._due = True
                log.debug("floor: advance (%s) waits for a token", why)
                return False
            try:
                known = self._reconcile()
                self._store.update_meta({K_PENDING: str(known + 1)})
                self._nv.increment(self._handle)
                self._record(self._nv.read(self._handle), spend=True)
            except (HwTpmError, ManagerError, OSError, sqlite3.Error) as e:
                self._due = True
                self._next_try = self._clock() + RETRY_SECONDS
                log.warning("floor: advance (%s) failed, will retry: %s", why, e)
                return False
            self._due = False
            log.debug("floor: advanced (%s) to %s", why, self._store.meta(K_VALUE))
            return True

    def _reconcile(self) -> int:
        """The value the database knows, after settling a previous advance's crash."""
        known = self._int(K_VALUE) or 0
        counter = self._nv.read(self._handle)
        if counter == known:
            return known
        if counter == self._int(K_PENDING):
            self._record(counter, spend=False)
            return counter
        raise ManagerError(
            f"the floor NV counter 0x{self._handle:08x} reads {counter}, the database {known}: "
            f"something else changed it; not advancing"
        )

    def _tokens(self, now: float) -> float:
        raw_tokens, raw_at = self._store.meta(K_TOKENS), self._store.meta(K_AT)
        tokens = float(BUCKET_SIZE) if raw_tokens is None else float(raw_tokens)
        at = now if raw_at is None else float(raw_at)
        return min(float(BUCKET_SIZE), tokens + max(0.0, now - at) / REFILL_SECONDS)

    def _take_token(self) -> bool:
        return self._tokens(self._clock()) >= 1.0

    def _record(self, counter: int, *, spend: bool) -> None:
        now = self._clock()
        tokens = self._tokens(now) - (1.0 if spend else 0.0)
        self._store.update_meta(
            {K_VALUE: str(counter), K_TOKENS: f"{max(tokens, 0.0):.6f}", K_AT: f"{now:.6f}"},
            remove=(K_PENDING,),
        )


def _rollback(detail: str) -> str:
    return (
        f"the data directory is older than the hardware TPM says: restored from a backup? "
        f"({detail}) Put back the newest copy of the whole data directory; if this older "
        f"copy is all there is, start once with `vtpm manager run --accept-rollback` (its "
        f"vTPMs then run on their older state)"
    )
