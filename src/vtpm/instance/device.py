"""The virtual TPM device: an engine, its encrypted state, and the power/control model that
every frontend drives.

Frontends translate their protocol into calls here; the device knows nothing of sockets.
Power model:
- the TPM is started when the instance starts, so a damaged or foreign state blob stops the
  instance before it serves anybody;
- control-channel INIT (and the simulator's RESET/POWER_ON after POWER_OFF) restarts it;
  STOP powers it off with an orderly shutdown; commands sent while it is off get a
  well-formed TPM failure response.
A volatile-state blob is consumed by the start that loads it (deleted after the load, as swtpm
does for INIT's DELETE_VOLATILE), so it is never applied twice and a resumed guest keeps it.

State leaves and enters through peers only sealed (`vtpm.instance.transfer`): `export_state`
seals a blob for this vTPM; `import_state` accepts only this vTPM's sealed blobs, not older
than the current permanent state, and holds them pending; the next power-on test-loads them
and installs them only if libtpms starts with them, else the previous state runs on.
After the permanent state was exported from a running TPM (QEMU's migration source), the TPM
is stopped without Shutdown(STATE) until it runs another command: the exported state stays the
vTPM's latest, so restoring it later is not taken for a rollback.

An `Interposer` (the measured launch, `vtpm.instance.launch`) may stand between the frontends
and the TPM; the device calls it at two points, `execute` and `end`, under the rule written on
the protocol. A deep quote goes to the `deep_quote` function the device was built with (the
Manager's, when one holds this vTPM).
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass, field
from typing import Protocol

from vtpm.engine.engine import (
    BLOB_NAMES,
    Engine,
    HealthListener,
    NvramBackend,
    StateType,
    TpmVersion,
)
from vtpm.errors import DeviceError, RequestError, VtpmError
from vtpm.instance import vendor
from vtpm.instance.transfer import ExportedBlob, Transfer, TransferBlob
from vtpm.tpm.constants import TPM_FAIL, TPM_RC, TPM_ST, TPM_TAG12

log = logging.getLogger(__name__)

VOLATILE = BLOB_NAMES[StateType.VOLATILE]
PERMANENT = BLOB_NAMES[StateType.PERMANENT]


class StateBackend(NvramBackend, Protocol):
    """The store the device keeps its blobs in (the instance's `StateStore`)."""

    def exists(self, name: str) -> bool: ...


class Interposer(Protocol):
    """Stands between the frontends and the TPM for every command (a measured launch).
    A device gets one through `Device.interpose`, once.

    Lock rule, enforced by `Device` (the only caller): `execute` and `end` run with the device's
    power lock held, so no other command, no power change (INIT, STOP, a simulator reset) and
    no state-blob operation runs while they do. They may call the device's methods (the lock is
    re-entrant; `process` reaches the TPM without interposition) and must not wait for another
    thread that needs the device. A deep-quote command is not interposed: it waits for the
    Manager, which may ask this device for PCR values from another thread; the PCR reads it
    makes come back through `Device.execute` and are interposed then."""

    def execute(self, command: bytes, locality: int | None) -> bytes:
        """The answer to a guest's command (from `Device.execute`, the power lock held)."""
        ...

    def end(self) -> None:
        """The device is closing (from `Device.close`, the power lock held, the engine not yet
        released). Must not raise."""
        ...


@dataclass(frozen=True, slots=True)
class _Pushed:
    generation: int
    data: bytes | None = field(repr=False)  # None: the peer set an empty blob (no such state)


class _TrialNvram:
    """The engine's NVRAM: the store, except while a start test-loads pushed blobs; then loads
    come from the trial set and writes go into it, so the store is untouched until the start
    has succeeded (the engine calls back on the thread that started it, under its lock)."""

    def __init__(self, store: StateBackend) -> None:
        self._store = store
        self.trial: dict[str, bytes | None] | None = None

    def load(self, name: str) -> bytes | None:
        return self._store.load(name) if self.trial is None else self.trial.get(name)

    def store(self, name: str, data: bytes) -> object:
        if self.trial is None:
            return self._store.store(name, data)
        self.trial[name] = data
        return None

    def delete(self, name: str, must_exist: bool) -> bool:
        if self.trial is None:
            return self._store.delete(name, must_exist)
        existed = self.trial.get(name) is not None
        self.trial[name] = None
        return existed

    def tpm_health(self, failed: bool, reason: str) -> None:
        """`HealthListener`: passed on to the store, which tells the Manager."""
        if isinstance(self._store, HealthListener):
            self._store.tpm_health(failed, reason)


@dataclass(frozen=True, slots=True)
class BufferSizes:
    size: int
    minimum: int
    maximum: int


def failure_response(version: TpmVersion) -> bytes:
    """A well-formed 'TPM failure' answer for a command that reached a powered-off TPM."""
    if version is TpmVersion.TPM20:
        return struct.pack(">HII", TPM_ST.NO_SESSIONS, 10, TPM_RC.FAILURE)
    return struct.pack(">HII", TPM_TAG12.RSP_COMMAND, 10, TPM_FAIL)


class Device:
    """One vTPM. Thread-safe: the engine serializes TPM work; `_power` guards power changes."""

    def __init__(
        self,
        version: TpmVersion,
        store: StateBackend,
        buffer_size: int = 0,
        *,
        deep_quote: vendor.Quote | None = None,
        transfer: Transfer | None = None,
    ) -> None:
        """`deep_quote`: the Manager's deep quote, when one holds this vTPM; without it the
        deep-quote command is answered TPM_RC_COMMAND_CODE (a lone instance). `transfer`:
        how state is sealed for peers; without it no state leaves or enters through them."""
        self.version = version
        self._store = store
        self._power = threading.RLock()
        self._failure = failure_response(version)
        self._nvram = _TrialNvram(store)
        self._engine = Engine(version, self._nvram)
        self._deep_quote = deep_quote
        self._interposer: Interposer | None = None
        self._transfer = transfer
        self._pending: dict[StateType, _Pushed] = {}
        self._handed_over = False  # the running TPM's permanent state was exported since
        if buffer_size:
            self._engine.set_buffer_size(buffer_size)

    def interpose(self, interposer: Interposer) -> None:
        """Send every later command (but deep quotes) through `interposer`; once per device."""
        with self._power:
            if self._interposer is not None:
                raise DeviceError("this device already has an interposer")
            self._interposer = interposer

    @property
    def library_version(self) -> str:
        return self._engine.library_version

    # power ----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._engine.running

    def power_on(self, *, delete_volatile: bool = False) -> None:
        """Start the TPM (restarting it if it runs), with the blobs a peer set since the last
        start if any (test-loaded: if libtpms refuses them, the previous state is started and
        DeviceError raised). Raises on bad state; the TPM stays off.

        `delete_volatile`: a fresh TPM, as a measured launch needs: the saved volatile state
        is discarded BEFORE the start, and so are blobs a peer set. (Not the control channel's
        INIT flag of that name: INIT never discards first; every start deletes the volatile
        blob after loading it.)"""
        with self._power:
            if self._engine.running:
                self._engine.stop(orderly=self._orderly(True))
            pending, self._pending = self._pending, {}
            if delete_volatile:
                if pending:
                    log.warning("discarding the state blobs set through the control channel")
                self._store.delete(VOLATILE, False)
                pending = {}
            if pending:
                self._start_pushed(pending)
            else:
                self._start()
            self._handed_over = False

    def _start(self) -> None:
        had_volatile = self._store.exists(VOLATILE)
        self._engine.start()
        if had_volatile:
            # applied by this start; a later start must not roll the TPM back to it
            self._store.delete(VOLATILE, False)

    def _orderly(self, wanted: bool) -> bool:
        if wanted and self._handed_over:
            log.info(
                "the TPM's state was exported and it ran no command since: stopping it without "
                "TPM2_Shutdown(STATE), so the exported state stays the vTPM's latest"
            )
            return False
        return wanted

    def power_off(self, *, orderly: bool = True) -> None:
        """Stop the TPM. `orderly`: after the usual TPM2_Shutdown(STATE) (TPM 1.2: SaveState).
        Without it the TPM is stopped as it is, for a caller that has shut it down its own way
        (a launch's Shutdown(CLEAR), which a Shutdown(STATE) would undo)."""
        with self._power:
            self._engine.stop(orderly=self._orderly(orderly))

    def close(self) -> None:
        """The interposer's end, then orderly shutdown and release of the engine (state
        stored)."""
        with self._power:
            if self._interposer is not None:
                self._interposer.end()  # while the TPM can still take its last commands
            if self._engine.running and not self._orderly(True):
                self._engine.stop(orderly=False)
            self._pending.clear()
            self._engine.close()

    # commands -------------------------------------------------------------------------------

    def execute(self, command: bytes, locality: int | None = None) -> bytes:
        """A frontend's command: through the interposer if there is one (see `Interposer`)."""
        interposer = self._interposer
        if interposer is not None and not vendor.is_deep_quote(command):
            with self._power:  # the Interposer lock rule
                return interposer.execute(command, locality)
        return self.process(command, locality)

    def process(self, command: bytes, locality: int | None = None) -> bytes:
        """One command to the TPM, without interposition."""
        self._handed_over = False  # the TPM moves on from what was exported
        if command[6:10] == vendor.CODE_BYTES:  # the deep-quote command: answered here
            return vendor.handle(command, self.execute, self._deep_quote)
        try:
            return self._engine.process(command, locality)
        except VtpmError as e:  # the engine, or a state write the Manager did not record
            if self._engine.running:
                log.error("TPM command failed: %s", e)
            return self._failure

    def cancel(self) -> None:
        self._engine.cancel()

    def set_locality(self, locality: int) -> None:
        self._engine.locality = locality

    @property
    def locality(self) -> int:
        return self._engine.locality

    # control operations ------------------------------------------------------------------

    def store_volatile(self) -> None:
        with self._power:
            if not self._engine.running:
                raise DeviceError("the TPM is not running")
            self._store.store(VOLATILE, self._engine.store_volatile())

    def buffer_size(self, wanted: int) -> BufferSizes:
        with self._power:
            if wanted and self._engine.running:
                raise DeviceError("the buffer size can only be changed while the TPM is stopped")
            return BufferSizes(*self._engine.set_buffer_size(wanted))

    def get_state_blob(self, state_type: StateType) -> bytes:
        """The plaintext blob, for this process's own use (a peer gets `export_state`)."""
        with self._power:
            if state_type is StateType.VOLATILE and self._engine.running:
                return self._engine.store_volatile()
            blob = self._store.load(BLOB_NAMES[state_type])
            return blob or b""

    def set_state_blob(self, state_type: StateType, data: bytes) -> None:
        """Replace a blob while the TPM is stopped; the next power-on uses it. Trusted callers
        only, unchecked (a peer's blobs go through `import_state`)."""
        with self._power:
            if self._engine.running:
                raise DeviceError("state blobs can only be set while the TPM is stopped")
            name = BLOB_NAMES[state_type]
            if data:
                self._store.store(name, data)
            else:
                self._store.delete(name, False)

    # state through peers (sealed) ---------------------------------------------------------

    def _need_transfer(self) -> Transfer:
        if self._transfer is None:
            raise DeviceError("this vTPM has no state transfer key: no state leaves or enters it")
        return self._transfer

    def export_state(self, state_type: StateType, *, plaintext: bool = False) -> ExportedBlob:
        """A blob for a peer (QEMU's migration source): sealed for this vTPM, stamped with the
        permanent state's generation; in clear only if asked (`plaintext`) and this device
        allows it. An absent blob is empty."""
        with self._power:
            t = self._need_transfer()
            data = self.get_state_blob(state_type)
            if state_type is StateType.PERMANENT and self._engine.running:
                self._handed_over = True
            if not data:
                return ExportedBlob(b"", sealed=False)
            if plaintext and t.plaintext_export:
                return ExportedBlob(data, sealed=False)
            generation = t.generations.counter(PERMANENT)
            blob = TransferBlob(t.vtpm_uuid, state_type, generation, data)
            return ExportedBlob(t.key.seal(blob), sealed=True)

    def import_state(self, state_type: StateType, raw: bytes) -> None:
        """A peer's blob (QEMU's incoming migration), TPM stopped: accepted only if it opens
        as this vTPM's `state_type` blob and is not older than the current permanent state;
        then pending until the next power-on test-loads it. A refused blob also discards the
        blobs set before it; nothing stored changes either way."""
        with self._power:
            if self._engine.running:
                raise DeviceError("state blobs can only be set while the TPM is stopped")
            t = self._need_transfer()
            try:
                self._pending[state_type] = self._check_pushed(t, state_type, raw)
            except VtpmError:
                if self._pending:
                    log.info("discarding the state blobs set before the refused one")
                self._pending.clear()
                raise

    @staticmethod
    def _check_pushed(t: Transfer, state_type: StateType, raw: bytes) -> _Pushed:
        name = BLOB_NAMES[state_type]
        if not raw:
            if state_type is StateType.PERMANENT:
                raise RequestError("an empty permanent state blob is refused (it would erase it)")
            return _Pushed(0, None)
        blob = t.key.open(raw, t.vtpm_uuid, state_type)
        current = t.generations.counter(PERMANENT)
        if blob.generation < current:
            raise RequestError(
                f"the {name} blob is refused as a rollback: exported at generation "
                f"{blob.generation}, older than the current permanent state ({current})"
            )
        return _Pushed(blob.generation, blob.data)

    def _start_pushed(self, pending: dict[StateType, _Pushed]) -> None:
        """Start with the pushed blobs; install them only once libtpms started with them."""
        t = self._need_transfer()
        perm = pending.get(StateType.PERMANENT)
        # a pushed permanent state comes with its own volatile and save states, or none
        trial: dict[str, bytes | None] = {}
        for st, name in BLOB_NAMES.items():
            if st in pending:
                trial[name] = pending[st].data
            else:
                trial[name] = None if perm is not None else self._store.load(name)
        base = perm.generation if perm is not None else t.generations.counter(PERMANENT)
        try:
            for st, p in pending.items():
                if p.data is not None and p.generation != base:
                    raise RequestError(
                        f"the {BLOB_NAMES[st]} blob belongs to another permanent state "
                        f"(generation {p.generation}, not {base})"
                    )
            self._nvram.trial = trial
            try:
                self._engine.start()
            finally:
                self._nvram.trial = None
        except VtpmError as e:
            log.error("the state blobs set through the control channel were refused: %s", e)
            self._start()
            raise DeviceError(
                "the state blobs set were refused; the vTPM's previous state runs"
            ) from None
        try:
            self._install(trial, base if perm is not None else None)
        except VtpmError:
            self._engine.stop(orderly=False)  # what runs is not what is stored
            self._start()
            raise

    def _install(self, trial: dict[str, bytes | None], floor: int | None) -> None:
        """Store what the trial start ran with (its own writes included); the volatile state
        it loaded is deleted, as after every start. `floor`: a pushed permanent state's
        generation, which its stored version must exceed."""
        t = self._need_transfer()
        for name in (BLOB_NAMES[StateType.SAVESTATE], PERMANENT):
            data = trial[name]
            if data is None:
                self._store.delete(name, False)
            elif data != self._store.load(name):
                if name == PERMANENT and floor is not None:
                    t.generations.raise_counter(name, floor)
                self._store.store(name, data)
        self._store.delete(VOLATILE, False)
        log.info("state blobs set through the control channel installed")

    def established(self) -> bool:
        return self._engine.established()

    def reset_established(self, locality: int) -> None:
        self._engine.reset_established(locality)

    def hash_start(self) -> None:
        self._engine.hash_start()

    def hash_data(self, data: bytes) -> None:
        self._engine.hash_data(data)

    def hash_end(self) -> None:
        self._engine.hash_end()

    def info(self, flags: int) -> str:
        return self._engine.info(flags)
