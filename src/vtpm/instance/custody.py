"""The instance's side of key custody: its link to the vTPM Manager over an inherited socket.

At start the instance says Hello with its uuid and receives its state key and the digests of
its current state blobs (or a refusal). It then serves as the state store's journal: each blob
written is reported and the write completes only once the Manager acknowledges it; a deletion
is reported the same way. When the link drops (the Manager died) the instance is told to stop:
a write it can no longer report must not be acknowledged to its client. The instance also
tells the Manager, unasked, when its TPM cannot serve and when it can again (`TpmHealth`).

The instance's own requests (Hello, state writes, deep quotes, EK certificates) go one at a
time and take their answer from the reader thread. The Manager may also ask the instance for
its PCR values (a deep quote asked on the host); those requests are answered from a worker
thread, never the reader, which must stay free to deliver the answers a TPM command in
progress is waiting for.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
import uuid
from collections.abc import Callable, Sequence

from vtpm import serving
from vtpm.errors import ManagerError, RemoteProtocolError, StateError, VtpmError
from vtpm.instance.statekey import StateKey
from vtpm.wire import ipc

log = logging.getLogger(__name__)

REPLY_TIMEOUT = 30.0
QUOTE_TIMEOUT = 120.0
_LOST = object()

PcrReader = Callable[[int, Sequence[int]], tuple[tuple[int, bytes], ...]]


class ManagerLink:
    """A `StateJournal` backed by the Manager. `hello()` first, then use; `close()` at the end."""

    def __init__(self, sock: socket.socket, vtpm_uuid: uuid.UUID) -> None:
        self._sock = sock
        self._uuid = vtpm_uuid
        self._codec = ipc.IpcConnection(ipc.Role.PEER)
        # the Manager's events, read first by hello() and then by the reader thread
        self._events = serving.events(sock, self._codec)
        self._digests: dict[str, bytes] = {}
        self._replies: queue.Queue[object] = queue.Queue()
        self._request = threading.Lock()  # one request in flight at a time
        self._write = threading.Lock()  # one writer on the socket at a time
        self._pcr_reader: PcrReader | None = None
        self._lost = threading.Event()
        self._request_state = threading.Lock()  # orders _lost against a late watch()
        self._on_lost: Callable[[], None] = lambda: None
        self._reader: threading.Thread | None = None

    # start ----------------------------------------------------------------------------------

    def hello(self) -> StateKey:
        """Ask for the state key; raises ManagerError if the Manager refuses or is gone."""
        self._send(ipc.Hello(self._uuid))
        reply = self._read_one()
        if isinstance(reply, ipc.Refused):
            raise ManagerError(f"the Manager refused to release this vTPM's key: {reply.reason}")
        if not isinstance(reply, ipc.KeyGrant):
            raise ManagerError(f"the Manager answered Hello with {type(reply).__name__}")
        self._digests = dict(reply.digests)
        # from now on a reader thread takes the Manager's answers (the TPM's first state
        # write may come while the instance is still starting)
        self._reader = threading.Thread(target=self._read_loop, name="manager-link", daemon=True)
        self._reader.start()
        return StateKey(reply.key)

    def serve_pcrs(self, reader: PcrReader) -> None:
        """Answer the Manager's PCR requests with `reader(bank, pcrs)`."""
        self._pcr_reader = reader

    def watch(self, on_lost: Callable[[], None]) -> None:
        """Run `on_lost` when the link drops (at once if it already has)."""
        with self._request_state:
            self._on_lost = on_lost
            lost = self._lost.is_set()
        if lost:
            on_lost()

    # StateJournal ---------------------------------------------------------------------------

    def expected(self, name: str) -> bytes | None:
        return self._digests.get(name)

    def written(self, name: str, counter: int, digest: bytes) -> None:
        self._expect_ack(ipc.StateWritten(name, counter, digest), f"the write of {name}")
        self._digests[name] = digest

    def deleted(self, name: str) -> None:
        self._expect_ack(ipc.StateDeleted(name), f"the deletion of {name}")
        self._digests.pop(name, None)

    # deep quotes ----------------------------------------------------------------------------

    def deep_quote(
        self,
        nonce: bytes,
        host_pcrs: tuple[int, ...],
        bank: int,
        pcrs: tuple[tuple[int, bytes], ...],
    ) -> bytes:
        """Evidence (compact binary) for a deep quote asked from inside the guest."""
        reply = self._roundtrip(
            ipc.QuoteRequest(nonce, host_pcrs, bank, pcrs), "the deep quote", QUOTE_TIMEOUT
        )
        if isinstance(reply, ipc.Refused):
            raise ManagerError(f"the Manager refused the deep quote: {reply.reason}")
        if not isinstance(reply, ipc.QuoteReply):
            raise ManagerError(f"the Manager answered a deep quote with {type(reply).__name__}")
        return reply.evidence

    # certificates -------------------------------------------------------------------------

    def certificate(self, kind: str, ek_public: bytes) -> bytes:
        """The certificate (DER) the Manager's group CA issues for this vTPM's `kind` EK
        (or its platform certificate) with public area `ek_public`; ManagerError if refused."""
        reply = self._roundtrip(
            ipc.CertRequest(kind, ek_public), f"the {kind} certificate", QUOTE_TIMEOUT
        )
        if isinstance(reply, ipc.Refused):
            raise ManagerError(f"the Manager refused the {kind} certificate: {reply.reason}")
        if not isinstance(reply, ipc.CertReply):
            raise ManagerError(
                f"the Manager answered a certificate request with {type(reply).__name__}"
            )
        return reply.certificate

    def _answer_pcrs(self, req: ipc.PcrRequest) -> None:
        reader = self._pcr_reader
        values: tuple[tuple[int, bytes], ...] = ()
        try:
            if reader is not None:
                values = reader(req.bank, req.pcrs)
        except VtpmError as e:  # e.g. the guest has not started the TPM yet
            log.warning("the Manager asked for PCR values that cannot be read: %s", e)
        try:
            self._send(ipc.PcrReply(req.bank, values))  # empty: could not read them
        except OSError as e:
            log.error("answering the Manager's PCR request failed: %s", e)

    def ready(self) -> None:
        """Tell the Manager the instance serves (its frontends listen)."""
        self._send(ipc.Ready())

    def tpm_health(self, failed: bool, reason: str) -> None:
        """Tell the Manager the TPM cannot serve (and why), or serves again; for its status.
        No answer is awaited (this runs under the engine's lock)."""
        text = reason.encode("utf-8")[: ipc.MAX_REASON].decode("utf-8", "ignore") if failed else ""
        try:
            self._send(ipc.TpmHealth(failed, text))
        except OSError as e:
            log.warning("telling the Manager of the TPM's health failed: %s", e)

    # end ------------------------------------------------------------------------------------

    def goodbye(self) -> None:
        if not self._lost.is_set():
            with contextlib.suppress(OSError):
                self._send(ipc.Goodbye())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        if self._reader is not None:
            self._reader.join(timeout=2)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    # plumbing -------------------------------------------------------------------------------

    def _send(self, event: ipc.PeerEvent) -> None:
        with self._write:
            self._sock.sendall(self._codec.send(event))

    def _read_one(self) -> object:
        """The Manager's next event (before the reader thread runs, then on it)."""
        try:
            return next(self._events)
        except StopIteration:
            raise ManagerError("the Manager closed the link") from None
        except serving.ConnectionLostError as e:
            raise ManagerError(f"the link to the Manager failed: {e}") from None

    def _read_loop(self) -> None:
        try:
            while True:
                ev = self._read_one()
                if isinstance(ev, ipc.PcrRequest):
                    threading.Thread(
                        target=self._answer_pcrs, args=(ev,), name="pcr-request", daemon=True
                    ).start()
                else:
                    self._replies.put(ev)
        except (ManagerError, RemoteProtocolError) as e:
            log.error("link to the Manager lost: %s", e)
        finally:
            with self._request_state:
                self._lost.set()
                on_lost = self._on_lost
            self._replies.put(_LOST)
            on_lost()

    def _roundtrip(self, event: ipc.PeerEvent, what: str, timeout: float) -> object:
        with self._request:
            if self._lost.is_set():
                raise StateError(f"{what} cannot be recorded: the link to the Manager is lost")
            try:
                self._send(event)
            except OSError as e:
                raise StateError(f"{what} cannot be recorded: {e.strerror}") from None
            try:
                reply = self._replies.get(timeout=timeout)
            except queue.Empty:
                raise StateError(f"the Manager did not answer {what}") from None
            if reply is _LOST:
                self._replies.put(_LOST)  # later callers see it too
                raise StateError(f"{what} cannot be recorded: the link to the Manager is lost")
            return reply

    def _expect_ack(self, event: ipc.PeerEvent, what: str) -> None:
        reply = self._roundtrip(event, what, REPLY_TIMEOUT)
        if isinstance(reply, ipc.Refused):
            raise StateError(f"the Manager refused {what}: {reply.reason}")
        if not isinstance(reply, ipc.Ack):
            raise StateError(f"the Manager answered {what} with {type(reply).__name__}")
