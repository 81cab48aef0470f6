"""A typed facade over libtpms: one TPM 2.0 or 1.2 per process.

The engine serializes every library call with one lock (libtpms is not thread-safe) except
`cancel`, which libtpms allows from another thread so that a long key generation can be stopped.
NVRAM traffic goes to an `NvramBackend` (the instance's encrypted state store). An exception in
the backend never crosses the C boundary: the callback answers TPM_FAIL and the engine re-raises
the recorded error to its caller afterwards.
"""

from __future__ import annotations

import enum
import logging
import threading
from typing import Protocol

from vtpm.engine._ffi import TPM_FAIL, TPM_SUCCESS, Libtpms
from vtpm.errors import TpmError, VtpmError
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_RETRY, TPM_SU

log = logging.getLogger(__name__)

_claimed = threading.Lock()  # one Engine per process: libtpms state is global


class TpmVersion(enum.Enum):
    TPM12 = "1.2"
    TPM20 = "2.0"


class StateType(enum.IntEnum):
    """TPMLIB_StateType."""

    PERMANENT = 1
    VOLATILE = 2
    SAVESTATE = 4


BLOB_NAMES = {
    StateType.PERMANENT: "permall",
    StateType.VOLATILE: "volatilestate",
    StateType.SAVESTATE: "savestate",
}


class NvramBackend(Protocol):
    """Where libtpms' state blobs live."""

    def load(self, name: str) -> bytes | None: ...

    def store(self, name: str, data: bytes) -> object: ...

    def delete(self, name: str, must_exist: bool) -> bool: ...


class Engine:
    """libtpms hosted in this process. Use as a context manager or call `close()`."""

    def __init__(self, version: TpmVersion, nvram: NvramBackend) -> None:
        if not _claimed.acquire(blocking=False):
            raise TpmError("this process already hosts a TPM engine (libtpms state is global)")
        try:
            self._lib = Libtpms()
        except BaseException:
            _claimed.release()
            raise
        self.version = version
        self._nvram = nvram
        self._lock = threading.Lock()
        self._locality = 0
        self._running = False
        self._closed = False
        self._callback_error: VtpmError | None = None
        rc = self._lib.register_callbacks(
            self._cb_load, self._cb_store, self._cb_delete, lambda: self._locality
        )
        self._check(rc, "registering callbacks")
        self._check(self._lib.choose_version(version is TpmVersion.TPM20), "choosing TPM version")
        if version is TpmVersion.TPM20:  # locality 0: no per-command callback (_use_locality)
            self._check(self._lib.locality_callback(False), "registering callbacks")

    # context management -------------------------------------------------------------------

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the TPM (storing state) and release the library for this process."""
        if self._closed:
            return
        try:
            self.stop()
        finally:
            self._lib.close()
            self._closed = True
            _claimed.release()

    # callbacks (run on the thread that called into libtpms, which holds self._lock) ---------

    def _cb_load(self, name: str) -> tuple[int, bytes | None]:
        try:
            blob = self._nvram.load(name)
        except VtpmError as e:
            self._callback_error = e
            return TPM_FAIL, None
        except Exception as e:  # never let an exception unwind through C
            log.exception("state load of %s failed", name)
            self._callback_error = TpmError(f"loading state blob {name} failed: {e}")
            return TPM_FAIL, None
        if blob is None:
            return TPM_RETRY, None  # tells libtpms the blob does not exist (manufacture)
        return TPM_SUCCESS, blob

    def _cb_store(self, name: str, data: bytes) -> int:
        try:
            self._nvram.store(name, data)
        except VtpmError as e:
            self._callback_error = e
            return TPM_FAIL
        except Exception as e:
            log.exception("state store of %s failed", name)
            self._callback_error = TpmError(f"storing state blob {name} failed: {e}")
            return TPM_FAIL
        return TPM_SUCCESS

    def _cb_delete(self, name: str, must_exist: bool) -> int:
        try:
            existed = self._nvram.delete(name, must_exist)
        except Exception as e:
            log.exception("state delete of %s failed", name)
            self._callback_error = TpmError(f"deleting state blob {name} failed: {e}")
            return TPM_FAIL
        return TPM_SUCCESS if existed or not must_exist else TPM_RETRY

    def _raise_callback_error(self) -> None:
        err, self._callback_error = self._callback_error, None
        if err is not None:
            raise err

    def _check(self, rc: int, what: str) -> None:
        self._raise_callback_error()
        if rc != TPM_SUCCESS:
            raise TpmError(f"libtpms failed {what} (result {rc:#x})")

    # lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    @property
    def library_version(self) -> str:
        return self._lib.version_string

    def start(self) -> None:
        """TPMLIB_MainInit: loads (or manufactures) state through the NVRAM backend."""
        with self._lock:
            if self._running:
                raise TpmError("the TPM is already running")
            rc = self._lib.main_init()
            if rc != TPM_SUCCESS:
                self._lib.terminate()
            self._check(rc, "initialising the TPM")
            self._running = True

    def stop(self, *, orderly: bool = True) -> None:
        """Stop the TPM. With `orderly`, first send a Shutdown(STATE) (TPM 1.2: SaveState) so
        the next start is not counted as an abrupt reset."""
        with self._lock:
            if not self._running:
                return
            try:
                if orderly:
                    cmd = (
                        frames.shutdown(TPM_SU.STATE)
                        if self.version is TpmVersion.TPM20
                        else frames.save_state12()
                    )
                    self._lib.process(cmd)
                    self._raise_callback_error()
            finally:
                self._lib.terminate()
                self._running = False

    # commands -------------------------------------------------------------------------------

    @property
    def locality(self) -> int:
        return self._locality

    @locality.setter
    def locality(self, value: int) -> None:
        with self._lock:
            self._use_locality(value)

    def _use_locality(self, value: int) -> None:
        """Set the locality libtpms sees (caller holds the lock: libtpms must not be running a
        command while its callbacks are swapped). For TPM 2.0 the per-command locality
        callback is registered only while the locality is not 0 (without it libtpms uses 0)."""
        if not 0 <= value <= 4:
            raise TpmError(f"locality {value} is out of range 0..4")
        if value == self._locality:
            return
        self._locality = value
        if self.version is TpmVersion.TPM20:
            self._check(self._lib.locality_callback(value != 0), "registering callbacks")

    def process(self, command: bytes, locality: int | None = None) -> bytes:
        """Run one TPM command; the TPM's own errors come back inside the response."""
        with self._lock:
            if not self._running:
                raise TpmError("the TPM is not running")
            if locality is not None and locality != self._locality:
                self._use_locality(locality)
            rc, resp = self._lib.process(command)
            if self._callback_error is not None:  # inline: this is the per-command path
                self._raise_callback_error()
            if rc != TPM_SUCCESS:
                raise TpmError(f"libtpms could not process the command (result {rc:#x})")
            return resp

    def cancel(self) -> None:
        """Ask a running long operation to stop (safe from any thread; no lock)."""
        self._lib.cancel()

    def set_buffer_size(self, wanted: int) -> tuple[int, int, int]:
        """(size, min, max); `wanted` 0 queries. Changing the size needs the TPM stopped."""
        with self._lock:
            if wanted and self._running:
                raise TpmError("the buffer size can only be set while the TPM is stopped")
            return self._lib.set_buffer_size(wanted)

    def info(self, flags: int) -> str:
        with self._lock:
            return self._lib.get_info(flags)

    # locality-4 hash sequence and the TPM-established flag ------------------------------------

    def hash_start(self) -> None:
        with self._lock:
            self._check(self._lib.hash_start(), "starting the hash sequence")

    def hash_data(self, data: bytes) -> None:
        with self._lock:
            self._check(self._lib.hash_data(data), "hashing data")

    def hash_end(self) -> None:
        with self._lock:
            self._check(self._lib.hash_end(), "ending the hash sequence")

    def established(self) -> bool:
        with self._lock:
            rc, flag = self._lib.established_get()
            self._check(rc, "reading the TPM-established flag")
            return flag

    def reset_established(self, locality: int) -> None:
        with self._lock:
            old = self._locality
            self._use_locality(locality)
            try:
                self._check(self._lib.established_reset(), "resetting the TPM-established flag")
            finally:
                self._use_locality(old)

    # state blobs ----------------------------------------------------------------------------

    def store_volatile(self) -> bytes:
        """The volatile state of the running TPM (TPMLIB_VolatileAll_Store)."""
        with self._lock:
            if not self._running:
                raise TpmError("the TPM is not running")
            rc, blob = self._lib.volatile_store()
            self._check(rc, "storing the volatile state")
            return blob

    def get_state(self, state_type: StateType) -> bytes:
        with self._lock:
            rc, blob = self._lib.get_state(state_type)
            self._check(rc, f"reading the {BLOB_NAMES[state_type]} state")
            return blob

    def set_state(self, state_type: StateType, data: bytes | None) -> None:
        """Hand libtpms a blob to use at the next start (TPM stopped)."""
        with self._lock:
            if self._running:
                raise TpmError("state blobs can only be set while the TPM is stopped")
            self._check(
                self._lib.set_state(state_type, data), f"setting the {BLOB_NAMES[state_type]} state"
            )
