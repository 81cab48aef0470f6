"""Raw TPM frames on a stream socket: tpm2-tss TCTI `swtpm`, and QEMU's data channel."""

from __future__ import annotations

import logging
import socket

from vtpm.errors import RemoteProtocolError
from vtpm.instance.device import Device
from vtpm.wire._common import CLOSED, NEED_DATA
from vtpm.wire.tpmframe import FrameServerConnection, TpmCommand

log = logging.getLogger(__name__)

READ_SIZE = 65536


def serve_frames(device: Device, conn: socket.socket, peer: str, max_size: int) -> None:
    """Answer TPM commands on `conn` until the peer closes or breaks the framing."""
    codec = FrameServerConnection(max_size=max_size)
    inbox = bytearray(READ_SIZE)  # reused: a fresh 64 KiB bytes per read costs more
    view = memoryview(inbox)
    execute = device.execute
    try:
        while True:
            try:
                n = conn.recv_into(inbox)
            except OSError as e:
                log.info("raw %s: connection lost: %s", peer, e.strerror)
                return
            data = bytes(view[:n])  # one copy
            command = codec.whole_command(data)  # the usual case: one read, one command
            if command is not None:
                if not _answer(conn, codec, execute(command), peer):
                    return
                continue
            codec.receive_data(data)
            while True:
                event = codec.next_event()
                if event is NEED_DATA:
                    break
                if event is CLOSED:
                    return
                assert isinstance(event, TpmCommand)
                if not _answer(conn, codec, execute(event.data), peer):
                    return
    except RemoteProtocolError as e:
        log.warning("raw %s: dropped: %s", peer, e)


def _answer(conn: socket.socket, codec: FrameServerConnection, reply: bytes, peer: str) -> bool:
    try:
        conn.sendall(codec.respond(reply))
    except OSError as e:
        log.info("raw %s: peer went away before its answer: %s", peer, e.strerror)
        return False
    return True
