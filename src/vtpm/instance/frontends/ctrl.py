"""The swtpm-compatible control channel (QEMU `-tpmdev emulator`, tpm2-tss TCTI `swtpm`).

One handler per control connection. CMD_SET_DATAFD's descriptor arrives as SCM_RIGHTS
ancillary data; it becomes a data channel served like a raw frame socket. Any descriptor that
arrives without a SET_DATAFD is closed at once.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
from collections.abc import Callable

from vtpm.engine.engine import StateType
from vtpm.errors import RemoteProtocolError, VtpmError
from vtpm.instance.device import Device
from vtpm.wire import ctrl as w
from vtpm.wire._common import CLOSED, NEED_DATA

log = logging.getLogger(__name__)

READ_SIZE = 65536
MAX_FDS = 4

# What this instance implements (every command QEMU's backend and tcti-swtpm use).
CAPABILITIES = (
    w.Capability.INIT
    | w.Capability.SHUTDOWN
    | w.Capability.GET_TPMESTABLISHED
    | w.Capability.SET_LOCALITY
    | w.Capability.HASHING
    | w.Capability.CANCEL_TPM_CMD
    | w.Capability.STORE_VOLATILE
    | w.Capability.RESET_TPMESTABLISHED
    | w.Capability.GET_STATEBLOB
    | w.Capability.SET_STATEBLOB
    | w.Capability.STOP
    | w.Capability.GET_CONFIG
    | w.Capability.SET_DATAFD
    | w.Capability.SET_BUFFERSIZE
    | w.Capability.GET_INFO
    | w.Capability.LOCK_STORAGE
)

CONFIG_FLAG_FILE_KEY = 0x1  # state is encrypted with a key

BLOB_TYPES = {
    w.StateBlobType.PERMANENT: StateType.PERMANENT,
    w.StateBlobType.VOLATILE: StateType.VOLATILE,
    w.StateBlobType.SAVESTATE: StateType.SAVESTATE,
}

OK = int(w.CtrlResult.SUCCESS)
FAIL = int(w.CtrlResult.FAIL)
BAD_PARAMETER = int(w.CtrlResult.BAD_PARAMETER)


class ControlHandler:
    """Serves one control connection against `device`."""

    def __init__(
        self,
        device: Device,
        spawn_data: Callable[[socket.socket, str], None],
        on_shutdown: Callable[[], None],
    ) -> None:
        self._device = device
        self._spawn_data = spawn_data
        self._on_shutdown = on_shutdown

    def __call__(self, conn: socket.socket, peer: str) -> None:
        codec = w.ControlServerConnection()
        fds: list[int] = []
        unix = conn.family == socket.AF_UNIX
        try:
            while True:
                event = codec.next_event()
                if event is NEED_DATA:
                    data = self._read(conn, fds, unix)
                    if data is None:
                        return
                    codec.receive_data(data)
                    continue
                if event is CLOSED:
                    return
                reply = self._answer(event, fds, peer)
                conn.sendall(codec.send(reply))
                if isinstance(event, w.Shutdown):
                    self._on_shutdown()
                    return
        except RemoteProtocolError as e:
            log.warning("ctrl %s: dropped: %s", peer, e)
            with contextlib.suppress(OSError):
                conn.sendall(w.error_bytes_for_unknown())
        except OSError as e:
            log.info("ctrl %s: connection lost: %s", peer, e.strerror)
        finally:
            for fd in fds:
                os.close(fd)

    @staticmethod
    def _read(conn: socket.socket, fds: list[int], unix: bool) -> bytes | None:
        try:
            if not unix:
                return conn.recv(READ_SIZE)
            data, ancdata, _flags, _addr = conn.recvmsg(
                READ_SIZE, socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
            )
        except OSError:
            return None
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        return data

    def _answer(self, ev: w.Request, fds: list[int], peer: str) -> w.Response:
        try:
            return self._dispatch(ev, fds, peer)
        except VtpmError as e:
            log.error("ctrl %s: %s failed: %s", peer, type(ev).__name__, e)
            return w.Result(FAIL)

    def _dispatch(self, ev: w.Request, fds: list[int], peer: str) -> w.Response:
        dev = self._device
        match ev:
            case w.GetCapability():
                return w.CapabilityResult(OK, int(CAPABILITIES))
            case w.Init(flags=flags):
                dev.power_on(delete_volatile=bool(flags & w.INIT_FLAG_DELETE_VOLATILE))
                return w.Result(OK)
            case w.Shutdown():
                dev.power_off()
                return w.Result(OK)
            case w.Stop():
                dev.power_off()
                return w.Result(OK)
            case w.GetTpmEstablished():
                return w.EstablishedResult(OK, dev.established())
            case w.SetLocality(locality=loc):
                dev.set_locality(loc)
                return w.Result(OK)
            case w.ResetTpmEstablished(locality=loc):
                dev.reset_established(loc)
                return w.Result(OK)
            case w.HashStart():
                dev.hash_start()
                return w.Result(OK)
            case w.HashData(data=data):
                dev.hash_data(data)
                return w.Result(OK)
            case w.HashEnd():
                dev.hash_end()
                return w.Result(OK)
            case w.CancelTpmCmd():
                dev.cancel()
                return w.Result(OK)
            case w.StoreVolatile():
                dev.store_volatile()
                return w.Result(OK)
            case w.GetStateBlob(blob_type=kind, offset=offset):
                if kind not in BLOB_TYPES:
                    return w.Result(BAD_PARAMETER)
                blob = dev.get_state_blob(BLOB_TYPES[w.StateBlobType(kind)])
                return w.StateBlobResult(OK, 0, len(blob), blob[offset:])
            case w.SetStateBlob(blob_type=kind, data=data):
                if kind not in BLOB_TYPES:
                    return w.Result(BAD_PARAMETER)
                dev.set_state_blob(BLOB_TYPES[w.StateBlobType(kind)], data)
                return w.Result(OK)
            case w.GetConfig():
                return w.ConfigResult(OK, CONFIG_FLAG_FILE_KEY)
            case w.SetBufferSize(size=size):
                sizes = dev.buffer_size(size)
                return w.BufferSizeResult(OK, sizes.size, sizes.minimum, sizes.maximum)
            case w.GetInfo(flags=flags, offset=offset):
                text = dev.info(flags & 0xFFFFFFFF).encode()
                return w.InfoResult(OK, len(text), text[offset:])
            case w.LockStorage():
                return w.Result(OK)  # the state directory is locked for the instance's life
            case w.SetDataFd():
                if not fds:
                    log.warning("ctrl %s: SET_DATAFD without a descriptor", peer)
                    return w.Result(BAD_PARAMETER)
                fd = fds.pop()
                try:
                    data_sock = socket.socket(fileno=fd)
                except OSError:
                    os.close(fd)
                    return w.Result(BAD_PARAMETER)
                self._spawn_data(data_sock, f"{peer} data-fd")
                return w.Result(OK)
        raise RemoteProtocolError(f"unhandled control request {type(ev).__name__}")
