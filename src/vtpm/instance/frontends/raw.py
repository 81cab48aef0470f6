"""Raw TPM frames on a stream socket: tpm2-tss TCTI `swtpm`, and QEMU's data channel."""

from __future__ import annotations

import logging
import socket

from vtpm import serving
from vtpm.errors import RemoteProtocolError
from vtpm.instance.device import Device
from vtpm.wire.tpmframe import FrameServerConnection

log = logging.getLogger(__name__)


def serve_frames(
    device: Device,
    conn: socket.socket,
    peer: str,
    max_size: int,
    *,
    idle_timeout: float | None = None,
) -> None:
    """Answer TPM commands on `conn` until the peer closes or breaks the framing."""
    codec = FrameServerConnection(max_size=max_size)
    execute = device.execute
    respond = codec.respond
    sendall = conn.sendall
    # the usual read holds one whole command: `whole_command` takes it past the codec's buffer
    requests = serving.events(
        conn, codec, idle_timeout=idle_timeout, whole_message=codec.whole_command
    )
    try:
        for request in requests:
            command = request if isinstance(request, bytes) else request.data
            try:
                sendall(respond(execute(command)))
            except OSError as e:
                log.info("raw %s: peer went away before its answer: %s", peer, e.strerror)
                return
    except RemoteProtocolError as e:
        log.warning("raw %s: dropped: %s", peer, e)
    except serving.ConnectionLostError as e:
        log.info("raw %s: connection lost: %s", peer, e)
