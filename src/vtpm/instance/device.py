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
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from vtpm.engine.engine import BLOB_NAMES, Engine, NvramBackend, StateType, TpmVersion
from vtpm.errors import DeviceError, VtpmError
from vtpm.instance import vendor
from vtpm.tpm.constants import TPM_FAIL, TPM_RC, TPM_ST, TPM_TAG12

if TYPE_CHECKING:
    from vtpm.instance.launch import Launch

log = logging.getLogger(__name__)

VOLATILE = BLOB_NAMES[StateType.VOLATILE]


class StateBackend(NvramBackend, Protocol):
    """The store the device keeps its blobs in (the instance's `StateStore`)."""

    def exists(self, name: str) -> bool: ...


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

    def __init__(self, version: TpmVersion, store: StateBackend, buffer_size: int = 0) -> None:
        self.version = version
        self._store = store
        self._power = threading.RLock()
        self._failure = failure_response(version)
        self.engine = Engine(version, store)
        self.deep_quote: vendor.Quote | None = None  # set when a Manager holds this vTPM
        self.launch: Launch | None = None  # set when a measured launch is armed
        if buffer_size:
            self.engine.set_buffer_size(buffer_size)

    # power ----------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.engine.running

    def power_on(self, *, delete_volatile: bool = False) -> None:
        """Start the TPM (restarting it if it runs). Raises on bad state; the TPM stays off."""
        with self._power:
            if self.engine.running:
                self.engine.stop()
            if delete_volatile:
                self._store.delete(VOLATILE, False)
            had_volatile = self._store.exists(VOLATILE)
            self.engine.start()
            if had_volatile:
                # applied by this start; a later start must not roll the TPM back to it
                self._store.delete(VOLATILE, False)

    def power_off(self) -> None:
        with self._power:
            self.engine.stop()

    def close(self) -> None:
        """Orderly shutdown and release of the engine (state stored)."""
        with self._power:
            if self.launch is not None:
                self.launch.end()  # a later run must not resume the launch's PCRs
            self.engine.close()

    # commands -------------------------------------------------------------------------------

    def execute(self, command: bytes, locality: int | None = None) -> bytes:
        if self.launch is not None and not vendor.is_deep_quote(command):
            # a measured launch is armed (vtpm.instance.launch): commands are serialized with
            # power changes, so nothing runs between a TPM2_Startup(CLEAR) and its extends (a
            # deep quote, which waits for the Manager, is not held; its PCR reads come here)
            with self._power:
                return self.launch.execute(command, locality)
        return self.process(command, locality)

    def process(self, command: bytes, locality: int | None = None) -> bytes:
        """One command to the TPM, without a launch's interposition."""
        if command[6:10] == vendor.CODE_BYTES:  # the deep-quote command: answered here
            return vendor.handle(command, self.execute, self.deep_quote)
        try:
            return self.engine.process(command, locality)
        except VtpmError as e:  # the engine, or a state write the Manager did not record
            if self.engine.running:
                log.error("TPM command failed: %s", e)
            return self._failure

    def cancel(self) -> None:
        self.engine.cancel()

    def set_locality(self, locality: int) -> None:
        self.engine.locality = locality

    @property
    def locality(self) -> int:
        return self.engine.locality

    # control operations ------------------------------------------------------------------

    def store_volatile(self) -> None:
        with self._power:
            if not self.engine.running:
                raise DeviceError("the TPM is not running")
            self._store.store(VOLATILE, self.engine.store_volatile())

    def buffer_size(self, wanted: int) -> BufferSizes:
        with self._power:
            if wanted and self.engine.running:
                raise DeviceError("the buffer size can only be changed while the TPM is stopped")
            return BufferSizes(*self.engine.set_buffer_size(wanted))

    def get_state_blob(self, state_type: StateType) -> bytes:
        """The plaintext blob, for a peer migrating this vTPM (QEMU live migration)."""
        with self._power:
            if state_type is StateType.VOLATILE and self.engine.running:
                return self.engine.store_volatile()
            blob = self._store.load(BLOB_NAMES[state_type])
            return blob or b""

    def set_state_blob(self, state_type: StateType, data: bytes) -> None:
        """Replace a blob while the TPM is stopped; the next power-on uses it."""
        with self._power:
            if self.engine.running:
                raise DeviceError("state blobs can only be set while the TPM is stopped")
            name = BLOB_NAMES[state_type]
            if data:
                self._store.store(name, data)
            else:
                self._store.delete(name, False)

    def established(self) -> bool:
        return self.engine.established()

    def reset_established(self, locality: int) -> None:
        self.engine.reset_established(locality)

    def hash_start(self) -> None:
        self.engine.hash_start()

    def hash_data(self, data: bytes) -> None:
        self.engine.hash_data(data)

    def hash_end(self) -> None:
        self.engine.hash_end()

    def info(self, flags: int) -> str:
        return self.engine.info(flags)
