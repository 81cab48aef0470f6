"""The Manager's end of each running instance's key-custody link, and which vTPMs are open.

A vTPM is *open* from the moment its key is granted on a link until that link ends: the rule
"a vTPM runs at most once" is `open()` refusing a second open of a uuid. The link thread reads;
any thread may write (one at a time). PCR values an instance sends back for a deep quote asked
on the host are queued on its link for the one request in flight.
"""

from __future__ import annotations

import queue
import socket
import threading
import uuid

from vtpm.errors import ManagerError
from vtpm.tpm.constants import TPM_ALG
from vtpm.wire import ipc

PCR_TIMEOUT = 10.0


class InstanceLink:
    """One instance's link: the codec, a write lock, and the PCR replies it queues."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.codec = ipc.IpcConnection(ipc.Role.MANAGER)
        self._write = threading.Lock()
        self._pcr_lock = threading.Lock()  # one PCR request in flight
        self.pcr_replies: queue.Queue[ipc.PcrReply | None] = queue.Queue()

    def send(self, event: ipc.ManagerEvent) -> None:
        with self._write:
            self.sock.sendall(self.codec.send(event))

    def read_pcrs(self, pcrs: tuple[int, ...]) -> tuple[tuple[int, bytes], ...]:
        """The instance's SHA-256 values of `pcrs`; ManagerError when it cannot say."""
        with self._pcr_lock:
            try:
                self.send(ipc.PcrRequest(TPM_ALG.SHA256, pcrs))
                reply = self.pcr_replies.get(timeout=PCR_TIMEOUT)
            except (OSError, queue.Empty):
                reply = None
            if reply is None or tuple(i for i, _ in reply.pcrs) != pcrs:
                raise ManagerError(
                    "the vTPM could not report its PCR values (has its TPM been started?)"
                )
            return reply.pcrs

    def closed(self) -> None:
        """The link ended: a PCR request waiting on it gives up."""
        self.pcr_replies.put(None)


class Links:
    """Open vTPMs and their links (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[uuid.UUID, InstanceLink] = {}

    def open(self, vtpm_uuid: uuid.UUID, link: InstanceLink) -> bool:
        """Mark the vTPM open on `link`; False if it is open already (elsewhere)."""
        with self._lock:
            if vtpm_uuid in self._open:
                return False
            self._open[vtpm_uuid] = link
            return True

    def close(self, vtpm_uuid: uuid.UUID, link: InstanceLink) -> None:
        with self._lock:
            if self._open.get(vtpm_uuid) is link:
                del self._open[vtpm_uuid]

    def get(self, vtpm_uuid: uuid.UUID) -> InstanceLink | None:
        with self._lock:
            return self._open.get(vtpm_uuid)
