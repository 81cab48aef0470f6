"""A typed facade over libtpms: one TPM 2.0 or 1.2 per process.

The engine serializes every library call with one lock (libtpms is not thread-safe) except
`cancel`, which libtpms allows from another thread so that a long key generation can be stopped.
NVRAM traffic goes to an `NvramBackend` (the instance's encrypted state store). An exception in
the backend never crosses the C boundary: the callback answers TPM_FAIL and the engine re-raises
the recorded error to its caller afterwards.

A state write that fails (a full disk, a Manager that does not record it) is the exception: the
callback keeps the blob and answers success, so libtpms does not enter its failure mode (which
only a restart, losing the TPM's volatile state, would end). Until the blob is stored, no
command reaches the TPM: the one whose write failed and every later one get an error (the
device answers them TPM_RC_FAILURE), and the write is retried before each command and every
`RETRY_INTERVAL` seconds. Once stored, the TPM serves again where it was; nothing acknowledged
is lost (the command whose write failed was not acknowledged; its effect may or may not
survive, as for a command in flight at a crash).

The backend is told when the TPM can no longer serve and when it can again (`HealthListener`):
a write that fails, or libtpms in failure mode (it answers TPM_RC_FAILURE; only a restart ends
that). libtpms' own diagnostics are kept out of the log in clear (`vtpm.engine.diagnostics`).
"""

from __future__ import annotations

import enum
import logging
import struct
import threading
from typing import Protocol, runtime_checkable

from vtpm.engine import diagnostics
from vtpm.engine._ffi import TPM_FAIL, TPM_SUCCESS, Libtpms
from vtpm.errors import StateError, TpmError, VtpmError
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_RC, TPM_RETRY, TPM_SU

log = logging.getLogger(__name__)

_claimed = threading.Lock()  # one Engine per process: libtpms state is global
RETRY_INTERVAL = 2.0  # seconds between retries of a state write that failed
_FAILURE_CODES = {  # the response code field of libtpms' answers in failure mode
    True: struct.pack(">I", TPM_RC.FAILURE),
    False: struct.pack(">I", 0x1C),  # TPM 1.2: TPM_FAILEDSELFTEST
}


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


@runtime_checkable
class HealthListener(Protocol):
    """A backend that wants to know when the TPM cannot serve (`failed`) and why, and when it
    serves again (`failed` False, reason ""). Called with the engine's lock held: it must not
    call the engine, nor wait for anything that does."""

    def tpm_health(self, failed: bool, reason: str) -> None: ...


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
        self._pending: dict[str, bytes] = {}  # blobs libtpms handed over, not yet stored
        self._write_error: VtpmError | None = None
        self._failed = ""  # why the TPM cannot serve; "" while it can
        self._health = nvram if isinstance(nvram, HealthListener) else None
        self._failure_code = _FAILURE_CODES[version is TpmVersion.TPM20]
        self._closing = threading.Event()
        self._lib.set_debug_fd(diagnostics.sink_fd())
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
        self._closing.set()
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
        if self._pending:  # an earlier write is not stored yet: this one waits behind it
            self._pending[name] = data
            return TPM_SUCCESS
        try:
            self._nvram.store(name, data)
        except VtpmError as e:
            self._hold(name, data, e)
        except Exception as e:
            log.exception("state store of %s failed", name)
            self._hold(name, data, StateError(f"storing state blob {name} failed: {e}"))
        return TPM_SUCCESS  # see the module docstring: a failed write is held, not fatal

    # state writes that failed, and the TPM's health ----------------------------------------

    def _hold(self, name: str, data: bytes, error: VtpmError) -> None:
        """Keep a blob whose write failed; retried by `_flush` (caller holds the lock)."""
        self._pending[name] = data
        self._write_error = error
        self._set_health(f"a state write failed: {error}")
        threading.Thread(target=self._retry_loop, name="state-write-retry", daemon=True).start()

    def _flush(self) -> None:
        """Store the held blobs, in order; raises StateError while one still fails (caller
        holds the lock)."""
        while self._pending:
            name, data = next(iter(self._pending.items()))
            try:
                self._nvram.store(name, data)
            except VtpmError as e:
                self._write_error = e
                raise StateError(f"the TPM's state cannot be stored: {e}") from None
            except Exception as e:
                raise StateError(f"the TPM's state cannot be stored: {e}") from None
            del self._pending[name]
        if self._write_error is not None:
            self._write_error = None
            log.warning("the TPM's held state is stored again; it serves")
            self._set_health("")

    def _retry_loop(self) -> None:
        while not self._closing.wait(RETRY_INTERVAL):
            with self._lock:
                if not self._pending or self._closed:
                    return
                try:
                    self._flush()
                    return
                except StateError:
                    continue

    def _set_health(self, reason: str) -> None:
        if reason == self._failed:
            return
        self._failed = reason
        if reason:
            log.error("the TPM cannot serve: %s", reason)
        if self._health is not None:
            try:
                self._health.tpm_health(bool(reason), reason)
            except Exception:
                log.exception("reporting the TPM's health failed")

    @property
    def failed(self) -> str:
        """Why the TPM cannot serve now ("" while it can)."""
        return self._failed

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
            try:
                self._check(rc, "initialising the TPM")
                self._flush()  # a blob written at manufacture must be on disk before serving
            except BaseException:
                self._pending.clear()
                self._write_error = None
                self._lib.terminate()
                raise
            self._running = True
            self._set_health("")

    def stop(self, *, orderly: bool = True) -> None:
        """Stop the TPM. With `orderly`, first send a Shutdown(STATE) (TPM 1.2: SaveState) so
        the next start is not counted as an abrupt reset."""
        with self._lock:
            if not self._running:
                return
            try:
                self._flush()  # the state the TPM holds is stored, or stop says it is not
                if orderly:
                    cmd = (
                        frames.shutdown(TPM_SU.STATE)
                        if self.version is TpmVersion.TPM20
                        else frames.save_state12()
                    )
                    self._lib.process(cmd)
                    self._raise_callback_error()
                    self._flush()
            finally:
                self._pending.clear()  # never acknowledged: the disk holds the last state that was
                self._write_error = None
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
            if self._pending:
                self._flush()  # raises while the held state still cannot be stored
            if locality is not None and locality != self._locality:
                self._use_locality(locality)
            rc, resp = self._lib.process(command)
            if self._callback_error is not None:  # inline: this is the per-command path
                self._raise_callback_error()
            if self._pending:  # this command's state write failed: it is not acknowledged
                raise StateError(f"the TPM's state cannot be stored: {self._write_error}")
            if rc != TPM_SUCCESS:
                raise TpmError(f"libtpms could not process the command (result {rc:#x})")
            if resp[6:10] == self._failure_code and not self._failed:
                self._set_health("libtpms is in failure mode (a restart of the TPM ends it)")
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
