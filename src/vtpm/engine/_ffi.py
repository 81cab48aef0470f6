"""The ctypes boundary to libtpms: the only module of the project that imports ctypes.

Every symbol is declared with argtypes and restype; TPMLIB_Process is also called through a
second handle without argtypes, with arguments built once of exactly the declared types (see
`Libtpms.process`). Memory libtpms hands back (state blobs, info strings) is copied into
`bytes` and released with libc `free` in one place, `_take`; the response buffer, which libtpms
keeps between commands, is copied out and freed at `close`. No ctypes object leaves this
module; callers see ints, bytes and str.

Facts this follows (libtpms 0.9 `tpm_library.h`): one TPM per process (global state), calls are
not thread-safe except `TPMLIB_CancelCommand`; the NVRAM load callback hands libtpms a buffer it
allocated with `malloc`, which libtpms frees; the store callback must not free.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Final

from vtpm.errors import EngineLoadError

LIBRARY_NAMES: Final = ("libtpms.so.0", "libtpms.so")
MIN_VERSION: Final = 0x000902  # 0.9.2, the Debian 12 package

_u8p = ctypes.POINTER(ctypes.c_uint8)
_u8pp = ctypes.POINTER(_u8p)
_u32p = ctypes.POINTER(ctypes.c_uint32)

# TPM_RESULT (*)(void)
_NvramInit = ctypes.CFUNCTYPE(ctypes.c_uint32)
# (unsigned char **data, uint32_t *length, uint32_t tpm_number, const char *name)
_NvramLoad = ctypes.CFUNCTYPE(ctypes.c_uint32, _u8pp, _u32p, ctypes.c_uint32, ctypes.c_char_p)
# (const unsigned char *data, uint32_t length, uint32_t tpm_number, const char *name)
_NvramStore = ctypes.CFUNCTYPE(
    ctypes.c_uint32, _u8p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_char_p
)
# (uint32_t tpm_number, const char *name, TPM_BOOL mustExist)
_NvramDelete = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32, ctypes.c_char_p, ctypes.c_uint8)
_IoInit = ctypes.CFUNCTYPE(ctypes.c_uint32)
# (TPM_MODIFIER_INDICATOR *locality, uint32_t tpm_number)
_IoLocality = ctypes.CFUNCTYPE(ctypes.c_uint32, _u32p, ctypes.c_uint32)
# (TPM_BOOL *physicalPresence, uint32_t tpm_number)
_IoPresence = ctypes.CFUNCTYPE(ctypes.c_uint32, _u8p, ctypes.c_uint32)


class _Callbacks(ctypes.Structure):
    _fields_ = (
        ("sizeOfStruct", ctypes.c_int),
        ("tpm_nvram_init", _NvramInit),
        ("tpm_nvram_loaddata", _NvramLoad),
        ("tpm_nvram_storedata", _NvramStore),
        ("tpm_nvram_deletename", _NvramDelete),
        ("tpm_io_init", _IoInit),
        ("tpm_io_getlocality", _IoLocality),
        ("tpm_io_getphysicalpresence", _IoPresence),
    )


# Python-side callback signatures (plain types only).
LoadFn = Callable[[str], "tuple[int, bytes | None]"]  # name -> (result, blob or None)
StoreFn = Callable[[str, bytes], int]  # name, blob -> result
DeleteFn = Callable[[str, bool], int]  # name, must_exist -> result
LocalityFn = Callable[[], int]

TPM_SUCCESS: Final = 0
TPM_FAIL: Final = 9

CMD_BUFFER_SIZE: Final = 8192  # commands up to this size are copied into one reused buffer


def _declare(lib: ctypes.CDLL) -> None:
    c = ctypes
    sigs: dict[str, tuple[list[object], object]] = {
        "TPMLIB_GetVersion": ([], c.c_uint32),
        "TPMLIB_ChooseTPMVersion": ([c.c_int], c.c_uint32),
        "TPMLIB_RegisterCallbacks": ([c.POINTER(_Callbacks)], c.c_uint32),
        "TPMLIB_MainInit": ([], c.c_uint32),
        "TPMLIB_Terminate": ([], None),
        "TPMLIB_Process": ([_u8pp, _u32p, _u32p, _u8p, c.c_uint32], c.c_uint32),
        "TPMLIB_VolatileAll_Store": ([_u8pp, _u32p], c.c_uint32),
        "TPMLIB_CancelCommand": ([], c.c_uint32),
        "TPMLIB_GetInfo": ([c.c_int], c.c_void_p),
        "TPMLIB_SetBufferSize": ([c.c_uint32, _u32p, _u32p], c.c_uint32),
        "TPMLIB_ValidateState": ([c.c_int, c.c_uint], c.c_uint32),
        "TPMLIB_SetState": ([c.c_int, _u8p, c.c_uint32], c.c_uint32),
        "TPMLIB_GetState": ([c.c_int, _u8pp, _u32p], c.c_uint32),
        "TPM_IO_Hash_Start": ([], c.c_uint32),
        "TPM_IO_Hash_Data": ([_u8p, c.c_uint32], c.c_uint32),
        "TPM_IO_Hash_End": ([], c.c_uint32),
        "TPM_IO_TpmEstablished_Get": ([_u8p], c.c_uint32),
        "TPM_IO_TpmEstablished_Reset": ([], c.c_uint32),
        "TPMLIB_SetDebugFD": ([c.c_int], None),
        "TPMLIB_SetDebugLevel": ([c.c_uint], None),
    }
    for name, (argtypes, restype) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes = argtypes
        fn.restype = restype


def _in(data: bytes) -> ctypes.Array[ctypes.c_uint8]:
    return (ctypes.c_uint8 * max(len(data), 1)).from_buffer_copy(data or b"\0")


class Libtpms:
    """libtpms loaded and declared. One per process; the facade in `engine.py` owns it."""

    def __init__(self) -> None:
        lib = None
        for name in LIBRARY_NAMES:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if lib is None:
            raise EngineLoadError(
                "libtpms is not installed (Debian package libtpms0); run ./dev install"
            )
        libc_name = ctypes.util.find_library("c") or "libc.so.6"
        self._libc = ctypes.CDLL(libc_name)
        self._libc.malloc.argtypes = [ctypes.c_size_t]
        self._libc.malloc.restype = ctypes.c_void_p
        self._libc.free.argtypes = [ctypes.c_void_p]
        self._libc.free.restype = None
        _declare(lib)
        self._lib = lib
        self.version: int = lib.TPMLIB_GetVersion()
        if self.version < MIN_VERSION:
            raise EngineLoadError(
                f"libtpms {self.version_string} is too old; 0.9.2 or later is needed"
            )
        self.has_set_profile = hasattr(lib, "TPMLIB_SetProfile")
        self._resp = _u8p()
        self._resp_len = ctypes.c_uint32(0)
        self._resp_cap = ctypes.c_uint32(0)
        self._reset_view()
        self._resp_ref = ctypes.byref(self._resp)
        self._resp_len_ref = ctypes.byref(self._resp_len)
        self._resp_cap_ref = ctypes.byref(self._resp_cap)
        # the address libtpms stored in self._resp, read without building a pointer object
        self._resp_addr = ctypes.c_void_p.from_buffer(self._resp)
        self._cmd = (ctypes.c_uint8 * CMD_BUFFER_SIZE)()
        self._cmd_view = memoryview(self._cmd).cast("B")
        fast = lib["TPMLIB_Process"]  # a second handle to the symbol: no argtypes, see process()
        fast.restype = ctypes.c_uint32
        self._process_fast = fast
        self._callbacks: _Callbacks | None = None
        self._callbacks_loc0: _Callbacks | None = None

    def _reset_view(self) -> None:
        self._view = memoryview(b"")
        self._view_addr: int | None = None

    @property
    def version_string(self) -> str:
        v = self.version
        return f"{v >> 16}.{(v >> 8) & 0xFF}.{v & 0xFF}"

    # memory ---------------------------------------------------------------------------------

    def _take(self, ptr: ctypes._Pointer[ctypes.c_uint8], length: int) -> bytes:
        """Copy `length` bytes out of a libtpms allocation and free it."""
        if not ptr:
            return b""
        try:
            return ctypes.string_at(ptr, length)
        finally:
            self._libc.free(ctypes.cast(ptr, ctypes.c_void_p))

    def close(self) -> None:
        """Release the persistent response buffer."""
        if self._resp:
            self._libc.free(ctypes.cast(self._resp, ctypes.c_void_p))
            self._resp_addr.value = None
            self._resp_cap.value = 0
            self._reset_view()

    # callbacks ------------------------------------------------------------------------------

    def register_callbacks(
        self, load: LoadFn, store: StoreFn, delete: DeleteFn, locality: LocalityFn
    ) -> int:
        libc = self._libc

        def c_load(
            data: ctypes._Pointer[ctypes._Pointer[ctypes.c_uint8]],
            length: ctypes._Pointer[ctypes.c_uint32],
            _tpm_number: int,
            name: bytes,
        ) -> int:
            rc, blob = load(name.decode("ascii", "replace"))
            if rc != TPM_SUCCESS or blob is None:
                return rc
            buf = libc.malloc(max(len(blob), 1))
            if not buf:
                return TPM_FAIL
            ctypes.memmove(buf, blob, len(blob))
            data[0] = ctypes.cast(buf, _u8p)
            length[0] = len(blob)
            return TPM_SUCCESS

        def c_store(
            data: ctypes._Pointer[ctypes.c_uint8], length: int, _n: int, name: bytes
        ) -> int:
            return store(name.decode("ascii", "replace"), ctypes.string_at(data, length))

        def c_delete(_n: int, name: bytes, must_exist: int) -> int:
            return delete(name.decode("ascii", "replace"), bool(must_exist))

        def c_locality(loc: ctypes._Pointer[ctypes.c_uint32], _n: int) -> int:
            loc[0] = locality()
            return TPM_SUCCESS

        def c_presence(pp: ctypes._Pointer[ctypes.c_uint8], _n: int) -> int:
            pp[0] = 0
            return TPM_SUCCESS

        fields = (
            ctypes.sizeof(_Callbacks),
            _NvramInit(lambda: TPM_SUCCESS),
            _NvramLoad(c_load),
            _NvramStore(c_store),
            _NvramDelete(c_delete),
            _IoInit(lambda: TPM_SUCCESS),
        )
        # libtpms copies the structure (a plain memcpy, so it may be swapped between commands)
        # but keeps the function pointers: both variants stay referenced here
        self._callbacks = _Callbacks(*fields, _IoLocality(c_locality), _IoPresence(c_presence))
        self._callbacks_loc0 = _Callbacks(*fields, _IoLocality(), _IoPresence(c_presence))
        rc: int = self._lib.TPMLIB_RegisterCallbacks(ctypes.byref(self._callbacks))
        return rc

    def locality_callback(self, enabled: bool) -> int:
        """Register the locality callback, or none (TPM 2.0 then runs every command at
        locality 0). libtpms asks for the locality before every command; a Python callback
        there costs more than the rest of a short command, so the engine drops it while the
        locality is 0. Not for TPM 1.2, whose library prints to stdout without a callback."""
        cbs = self._callbacks if enabled else self._callbacks_loc0
        if cbs is None:
            raise RuntimeError("register_callbacks() first")
        rc: int = self._lib.TPMLIB_RegisterCallbacks(ctypes.byref(cbs))
        return rc

    # library calls --------------------------------------------------------------------------

    def set_debug_fd(self, fd: int) -> None:
        """Where libtpms writes its diagnostics, debug level 0. Its forced messages (failure
        mode, a state blob it cannot read) go to this fd, else to stderr; one of them is a hex
        dump of the command that put the TPM into failure mode (`tpm_tpm2_interface.c`)."""
        self._lib.TPMLIB_SetDebugLevel(0)
        self._lib.TPMLIB_SetDebugFD(fd)

    def choose_version(self, tpm2: bool) -> int:
        rc: int = self._lib.TPMLIB_ChooseTPMVersion(1 if tpm2 else 0)
        return rc

    def main_init(self) -> int:
        rc: int = self._lib.TPMLIB_MainInit()
        return rc

    def terminate(self) -> None:
        self._lib.TPMLIB_Terminate()

    def process(self, command: bytes) -> tuple[int, bytes]:
        """TPMLIB_Process, the per-command path. Costs are kept out of it: the command is
        copied into a buffer made once, the call goes through `_process_fast` with ctypes
        objects of exactly the declared types built once (ctypes' argument conversion would
        cost more than a short TPM command), and the response buffer libtpms allocates (and
        keeps, at its maximum size) is read through a view made once per allocation."""
        n = len(command)
        if n <= CMD_BUFFER_SIZE:
            self._cmd_view[:n] = command
            cmd = self._cmd
        else:
            cmd = _in(command)
        rc: int = self._process_fast(self._resp_ref, self._resp_len_ref, self._resp_cap_ref, cmd, n)
        if rc != TPM_SUCCESS:
            return rc, b""
        size = self._resp_len.value
        addr = self._resp_addr.value
        if addr != self._view_addr or size > len(self._view):
            if not addr:
                return rc, b""
            cap = max(self._resp_cap.value, size)
            self._view = memoryview((ctypes.c_uint8 * cap).from_address(addr)).cast("B")
            self._view_addr = addr
        return rc, self._view[:size].tobytes()

    def volatile_store(self) -> tuple[int, bytes]:
        buf = _u8p()
        n = ctypes.c_uint32(0)
        rc: int = self._lib.TPMLIB_VolatileAll_Store(ctypes.byref(buf), ctypes.byref(n))
        return rc, self._take(buf, n.value)

    def cancel(self) -> int:
        rc: int = self._lib.TPMLIB_CancelCommand()
        return rc

    def get_info(self, flags: int) -> str:
        ptr = self._lib.TPMLIB_GetInfo(flags)
        if not ptr:
            return ""
        try:
            raw: bytes = ctypes.string_at(ptr)
            return raw.decode("utf-8", "replace")
        finally:
            self._libc.free(ptr)

    def set_buffer_size(self, wanted: int) -> tuple[int, int, int]:
        lo = ctypes.c_uint32(0)
        hi = ctypes.c_uint32(0)
        size: int = self._lib.TPMLIB_SetBufferSize(wanted, ctypes.byref(lo), ctypes.byref(hi))
        return size, lo.value, hi.value

    def validate_state(self, state_type: int) -> int:
        rc: int = self._lib.TPMLIB_ValidateState(state_type, 0)
        return rc

    def set_state(self, state_type: int, data: bytes | None) -> int:
        if data is None:
            rc: int = self._lib.TPMLIB_SetState(state_type, None, 0)
        else:
            rc = self._lib.TPMLIB_SetState(state_type, _in(data), len(data))
        return rc

    def get_state(self, state_type: int) -> tuple[int, bytes]:
        buf = _u8p()
        n = ctypes.c_uint32(0)
        rc: int = self._lib.TPMLIB_GetState(state_type, ctypes.byref(buf), ctypes.byref(n))
        return rc, self._take(buf, n.value)

    def hash_start(self) -> int:
        rc: int = self._lib.TPM_IO_Hash_Start()
        return rc

    def hash_data(self, data: bytes) -> int:
        rc: int = self._lib.TPM_IO_Hash_Data(_in(data), len(data))
        return rc

    def hash_end(self) -> int:
        rc: int = self._lib.TPM_IO_Hash_End()
        return rc

    def established_get(self) -> tuple[int, bool]:
        flag = ctypes.c_uint8(0)
        rc: int = self._lib.TPM_IO_TpmEstablished_Get(ctypes.byref(flag))
        return rc, bool(flag.value)

    def established_reset(self) -> int:
        rc: int = self._lib.TPM_IO_TpmEstablished_Reset()
        return rc
