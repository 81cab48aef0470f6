"""The virtual TPM device: an engine, its encrypted state, and the power/control model that
every frontend drives.

Frontends translate their protocol into calls here; the device knows nothing of sockets.
Power model:
- the TPM is started when the instance starts, so a damaged or foreign state blob stops the
  instance before it serves anybody;
- control-channel INIT (and the simulator's RESET/POWER_ON after POWER_OFF) restarts it,
  optionally discarding a saved volatile state first; STOP powers it off with an orderly
  shutdown; commands sent while it is off get a well-formed TPM failure response.
A volatile-state blob is consumed by the start that loads it, so it is never applied twice.

An `Interposer` (the measured launch, `vtpm.instance.launch`) may stand between the frontends
and the TPM; the device calls it at two points, `execute` and `end`, under the rule written on
the protocol. A deep quote goes to the `deep_quote` function the device was built with (the
Manager's, when one holds this vTPM).
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from typing import Protocol

from vtpm.engine.engine import BLOB_NAMES, Engine, NvramBackend, StateType, TpmVersion
from vtpm.errors import DeviceError, VtpmError
from vtpm.instance import vendor
from vtpm.tpm.constants import TPM_FAIL, TPM_RC, TPM_ST, TPM_TAG12

log = logging.getLogger(__name__)

VOLATILE = BLOB_NAMES[StateType.VOLATILE]


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
    ) -> None:
        """`deep_quote`: the Manager's deep quote, when one holds this vTPM; without it the
        deep-quote command is answered TPM_RC_COMMAND_CODE (a lone instance)."""
        self.version = version
        self._store = store
        self._power = threading.RLock()
        self._failure = failure_response(version)
        self._engine = Engine(version, store)
        self._deep_quote = deep_quote
        self._interposer: Interposer | None = None
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
        """Start the TPM (restarting it if it runs). Raises on bad state; the TPM stays off."""
        with self._power:
            if self._engine.running:
                self._engine.stop()
            if delete_volatile:
                self._store.delete(VOLATILE, False)
            had_volatile = self._store.exists(VOLATILE)
            self._engine.start()
            if had_volatile:
                # applied by this start; a later start must not roll the TPM back to it
                self._store.delete(VOLATILE, False)

    def power_off(self, *, orderly: bool = True) -> None:
        """Stop the TPM. `orderly`: after the usual TPM2_Shutdown(STATE) (TPM 1.2: SaveState).
        Without it the TPM is stopped as it is, for a caller that has shut it down its own way
        (a launch's Shutdown(CLEAR), which a Shutdown(STATE) would undo)."""
        with self._power:
            self._engine.stop(orderly=orderly)

    def close(self) -> None:
        """The interposer's end, then orderly shutdown and release of the engine (state
        stored)."""
        with self._power:
            if self._interposer is not None:
                self._interposer.end()  # while the TPM can still take its last commands
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
        """The plaintext blob, for a peer migrating this vTPM (QEMU live migration)."""
        with self._power:
            if state_type is StateType.VOLATILE and self._engine.running:
                return self._engine.store_volatile()
            blob = self._store.load(BLOB_NAMES[state_type])
            return blob or b""

    def set_state_blob(self, state_type: StateType, data: bytes) -> None:
        """Replace a blob while the TPM is stopped; the next power-on uses it."""
        with self._power:
            if self._engine.running:
                raise DeviceError("state blobs can only be set while the TPM is stopped")
            name = BLOB_NAMES[state_type]
            if data:
                self._store.store(name, data)
            else:
                self._store.delete(name, False)

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
