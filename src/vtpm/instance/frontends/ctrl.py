"""The swtpm-compatible control channel (QEMU `-tpmdev emulator`, tpm2-tss TCTI `swtpm`).

One handler per control connection. CMD_SET_DATAFD's descriptor arrives as SCM_RIGHTS
ancillary data; it becomes a data channel served like a raw frame socket. Any descriptor that
arrives without a SET_DATAFD is closed at once.

State blobs leave and enter only sealed (`vtpm.instance.transfer`, see `Device.export_state`
and `import_state`): GET_STATEBLOB answers a sealed blob flagged STATE_FLAG_ENCRYPTED. Its
DECRYPTED flag is a wish, granted only by a standalone instance started with
--export-plaintext-state; otherwise the blob comes sealed all the same (QEMU asks DECRYPTED
on every migration and sends the blob back as it got it, as with swtpm's migration key).
SET_STATEBLOB takes only this vTPM's sealed blobs (its flags are not trusted); the next INIT
test-loads them. INIT's DELETE_VOLATILE needs no action: every start deletes the volatile
blob after loading it (swtpm's order), so a migrated or restored guest keeps its PCRs.

`on_end` (the instance's --terminate) is called when a UNIX connection ends other than by
SHUTDOWN (which stops the instance anyway): the peer closed it, it broke, or it was dropped.
A TCP control connection's end is not reported: tcti-swtpm opens one per control command, and
`swtpm socket --terminate` too ends only with a UNIX control client (or the data client).
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import socket
from collections.abc import Callable

from vtpm import serving
from vtpm.engine.engine import StateType
from vtpm.errors import RemoteProtocolError, VtpmError
from vtpm.instance.device import Device
from vtpm.instance.transfer import ExportedBlob
from vtpm.wire import ctrl as w

log = logging.getLogger(__name__)

MAX_FDS = 4
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)

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


class PassedDescriptors:
    """The descriptors a control connection's peer passes with SCM_RIGHTS (`recv` is the read
    `serving.events` uses on a UNIX socket).

    A descriptor belongs to the read it arrived with: a SET_DATAFD answered from that read takes
    it (`take`); any the read's requests did not take is closed when the next read starts, that
    is as soon as they are answered, so a peer cannot pile descriptors up in this process.
    `close()` at the end of the connection closes any still held."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._fds: list[int] = []

    def recv(self, size: int) -> bytes:
        self.close()  # brought by the previous read and taken by no SET_DATAFD
        data, ancdata, _flags, _addr = self._conn.recvmsg(size, _ANCILLARY_SPACE)
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                self._fds.extend(got)
        return data

    def take(self) -> int | None:
        """The descriptor passed with the current read (the caller owns it), or None."""
        return self._fds.pop() if self._fds else None

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.pop())


class _Connection:
    """What one control connection holds: its passed descriptors, and the blobs it exported
    (a GET_STATEBLOB at an offset continues the one exported at offset 0: sealing anew would
    give other bytes)."""

    def __init__(self, fds: PassedDescriptors) -> None:
        self.fds = fds
        self.exports: dict[int, ExportedBlob] = {}


class ControlHandler:
    """Serves one control connection against `device`."""

    def __init__(
        self,
        device: Device,
        spawn_data: Callable[[socket.socket, str], None],
        on_shutdown: Callable[[], None],
        *,
        idle_timeout: float | None = None,
        on_end: Callable[[str], None] | None = None,
    ) -> None:
        self._device = device
        self._spawn_data = spawn_data
        self._on_shutdown = on_shutdown
        self._idle_timeout = idle_timeout
        self._on_end = on_end

    def __call__(self, conn: socket.socket, peer: str) -> None:
        codec = w.ControlServerConnection()
        requests: serving.Codec[w.Request] = codec
        fds = PassedDescriptors(conn)
        state = _Connection(fds)
        recv = fds.recv if conn.family == socket.AF_UNIX else None
        try:
            for event in serving.events(conn, requests, idle_timeout=self._idle_timeout, recv=recv):
                reply = self._answer(event, state, peer)
                conn.sendall(codec.send(reply))
                if isinstance(event, w.Shutdown):
                    self._on_shutdown()
                    return
            log.debug("ctrl %s: closed by the peer", peer)
        except RemoteProtocolError as e:
            log.warning("ctrl %s: dropped: %s", peer, e)
            with contextlib.suppress(OSError):
                conn.sendall(w.error_bytes_for_unknown())
        except serving.ConnectionLostError as e:
            log.info("ctrl %s: connection lost: %s", peer, e)
        except OSError as e:
            log.info("ctrl %s: connection lost: %s", peer, e.strerror)
        finally:
            fds.close()
        if self._on_end is not None and conn.family == socket.AF_UNIX:
            self._on_end(peer)

    def _answer(self, ev: w.Request, state: _Connection, peer: str) -> w.Response:
        try:
            return self._dispatch(ev, state, peer)
        except VtpmError as e:
            log.error("ctrl %s: %s failed: %s", peer, type(ev).__name__, e)
            return w.Result(FAIL)

    def _dispatch(self, ev: w.Request, state: _Connection, peer: str) -> w.Response:
        dev = self._device
        match ev:
            case w.GetCapability():
                return w.CapabilityResult(OK, int(CAPABILITIES))
            case w.Init():
                dev.power_on()  # DELETE_VOLATILE: done after the load, by every start
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
            case w.GetStateBlob(flags=flags, blob_type=kind, offset=offset):
                if kind not in BLOB_TYPES:
                    return w.Result(BAD_PARAMETER)
                return self._export(state, peer, kind, flags, offset)
            case w.SetStateBlob(blob_type=kind, data=data):
                if kind not in BLOB_TYPES:
                    return w.Result(BAD_PARAMETER)
                dev.import_state(BLOB_TYPES[w.StateBlobType(kind)], data)
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
                fd = state.fds.take()
                if fd is None:
                    log.warning("ctrl %s: SET_DATAFD without a descriptor", peer)
                    return w.Result(BAD_PARAMETER)
                try:
                    data_sock = socket.socket(fileno=fd)
                except OSError:
                    os.close(fd)
                    return w.Result(BAD_PARAMETER)
                self._spawn_data(data_sock, f"{peer} data-fd")
                return w.Result(OK)
        raise RemoteProtocolError(f"unhandled control request {type(ev).__name__}")

    def _export(
        self, state: _Connection, peer: str, kind: int, flags: int, offset: int
    ) -> w.Response:
        blob = state.exports.get(kind) if offset else None
        if blob is None:
            plaintext = bool(flags & w.STATE_FLAG_DECRYPTED)
            blob = self._device.export_state(BLOB_TYPES[w.StateBlobType(kind)], plaintext=plaintext)
            state.exports[kind] = blob
            if plaintext and blob.sealed:
                log.info("ctrl %s: state blob %d asked for in clear, sent sealed", peer, kind)
            elif not blob.sealed and blob.data:
                log.warning("ctrl %s: state blob %d sent in clear (plaintext export)", peer, kind)
        flags_out = w.STATE_FLAG_ENCRYPTED if blob.sealed else 0
        return w.StateBlobResult(OK, flags_out, len(blob.data), blob.data[offset:])
