"""The Microsoft TPM simulator protocol (tpm2-tss TCTI `mssim`): command and platform ports.

Power signals map onto the device: POWER_ON starts a stopped TPM (a no-op when it runs, as
tcti-mssim sends it at every connect), POWER_OFF stops it, RESET and RESTART power-cycle it.
NV and physical-presence signals are accepted and have no effect here; CANCEL_ON cancels the
command in progress.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

from vtpm import listen, serving
from vtpm.errors import RemoteProtocolError, VtpmError
from vtpm.instance.device import Device
from vtpm.wire import mssim as w

log = logging.getLogger(__name__)

SERVER_VERSION = 1


class CommandPortHandler:
    def __init__(
        self, device: Device, max_command: int, *, idle_timeout: float | None = None
    ) -> None:
        self._device = device
        self._max = max_command
        self._idle_timeout = idle_timeout

    def __call__(self, conn: socket.socket, peer: str) -> None:
        codec = w.MssimServerConnection(max_command=self._max)
        requests: serving.Codec[w.TpmPortRequest] = codec
        dev = self._device
        try:
            events = serving.events(
                conn,
                requests,
                idle_timeout=self._idle_timeout,
                recv=listen.quickack_reader(conn),
            )
            for ev in events:
                if isinstance(ev, w.SessionEnd | w.Stop):
                    return
                reply: w.CommandResponse | w.Ack | w.HandshakeResponse
                match ev:
                    case w.SendCommand(locality=loc, command=cmd):
                        reply = w.CommandResponse(dev.execute(cmd, loc))
                    case w.RemoteHandshake():
                        reply = w.HandshakeResponse(SERVER_VERSION, w.HANDSHAKE_FLAGS)
                    case w.HashStart():
                        _quietly(dev.hash_start, peer)
                        reply = w.Ack()
                    case w.HashData(data=data):
                        _quietly(lambda: dev.hash_data(data), peer)
                        reply = w.Ack()
                    case w.HashEnd():
                        _quietly(dev.hash_end, peer)
                        reply = w.Ack()
                    case _:
                        raise RemoteProtocolError(f"unexpected request {type(ev).__name__}")
                conn.sendall(codec.send(reply))
        except RemoteProtocolError as e:
            log.warning("mssim %s: dropped: %s", peer, e)
        except serving.ConnectionLostError as e:
            log.info("mssim %s: connection lost: %s", peer, e)
        except OSError as e:
            log.info("mssim %s: connection lost: %s", peer, e.strerror)


def _quietly(fn: Callable[[], None], peer: str) -> None:
    try:
        fn()
    except VtpmError as e:
        log.error("mssim %s: %s", peer, e)


class PlatformPortHandler:
    def __init__(self, device: Device, *, idle_timeout: float | None = None) -> None:
        self._device = device
        self._idle_timeout = idle_timeout

    def __call__(self, conn: socket.socket, peer: str) -> None:
        codec = w.PlatformServerConnection()
        requests: serving.Codec[w.PlatformRequest] = codec
        try:
            for ev in serving.events(conn, requests, idle_timeout=self._idle_timeout):
                if isinstance(ev, w.GetCommandResponseSizes):
                    size = self._device.buffer_size(0).size
                    conn.sendall(codec.send(w.SizesResponse(size, size)))
                    continue
                if isinstance(ev, w.PlatformSignal):
                    self._signal(ev.code, peer)
                    conn.sendall(codec.send(w.PlatformAck()))
                    continue
                return  # session end / stop
        except RemoteProtocolError as e:
            log.warning("mssim-platform %s: dropped: %s", peer, e)
        except serving.ConnectionLostError as e:
            log.info("mssim-platform %s: connection lost: %s", peer, e)
        except OSError as e:
            log.info("mssim-platform %s: connection lost: %s", peer, e.strerror)

    def _signal(self, code: w.PlatformCode, peer: str) -> None:
        dev = self._device
        try:
            if code == w.PlatformCode.POWER_ON and not dev.running:
                dev.power_on()
            elif code == w.PlatformCode.POWER_OFF:
                dev.power_off()
            elif code in (w.PlatformCode.RESET, w.PlatformCode.RESTART):
                dev.power_on()
            elif code == w.PlatformCode.CANCEL_ON:
                dev.cancel()
        except VtpmError as e:
            log.error("mssim-platform %s: %s failed: %s", peer, code.name, e)
