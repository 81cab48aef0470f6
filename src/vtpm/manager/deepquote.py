"""Deep quotes, batched: many requests, one hardware quote.

A hardware TPM quote takes tens to hundreds of milliseconds, so requests are gathered: each
request waits at most `window` seconds for company, and requests arriving while the hardware TPM
is busy with the previous batch wait for it to finish and then go together. A batch holds the
requests for one group (one attestation key) and one host PCR selection; its DeepQuoteInfo
leaves form a Merkle tree (`vtpm.wire.deepquote`), one TPM2_Quote signs the root, and each
answer carries its own inclusion path. A lone request's tree is its leaf.

One worker thread serves the batches in arrival order of their oldest request, so the hardware
TPM sees one quote at a time (it serializes them anyway).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from vtpm.errors import ConfigError, ManagerError, VtpmError
from vtpm.wire.deepquote import DeepQuoteInfo, merkle_path, merkle_tree
from vtpm.wire.evidence import Evidence, SignedQuote

log = logging.getLogger(__name__)

DEFAULT_WINDOW = 0.02
MAX_BATCH = 4096
REQUEST_TIMEOUT = 120.0

QuoteFn = Callable[[uuid.UUID, bytes, tuple[int, ...]], SignedQuote]
Key = tuple[uuid.UUID, tuple[int, ...]]


@dataclass
class _Request:
    info: DeepQuoteInfo
    arrived: float
    done: threading.Event = field(default_factory=threading.Event)
    result: Evidence | None = None
    error: VtpmError | None = None


class DeepQuoter:
    def __init__(
        self, quote: QuoteFn, window: float = DEFAULT_WINDOW, max_batch: int = MAX_BATCH
    ) -> None:
        if window < 0 or max_batch < 1:
            raise ConfigError("a deep-quote batcher needs window >= 0 and max_batch >= 1")
        self._quote = quote
        self.window = window
        self.max_batch = max_batch
        self._pending: dict[Key, list[_Request]] = {}
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="deep-quotes", daemon=True)
        self._thread.start()
        self.batches = 0  # hardware quotes made (for status and benchmarks)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def request(
        self,
        group: uuid.UUID,
        info: DeepQuoteInfo,
        host_pcrs: tuple[int, ...],
        timeout: float = REQUEST_TIMEOUT,
    ) -> Evidence:
        """Block until the batch holding this request is quoted; its evidence."""
        req = _Request(info, time.monotonic())
        with self._cond:
            if self._closed:
                raise ManagerError("the Manager is stopping")
            self._pending.setdefault((group, host_pcrs), []).append(req)
            self._cond.notify()
        if not req.done.wait(timeout):
            raise ManagerError(f"the deep quote did not complete within {timeout:.0f} s")
        if req.error is not None:
            raise req.error
        assert req.result is not None
        return req.result

    def _next_batch(self) -> tuple[Key, list[_Request]] | None:
        with self._cond:
            while True:
                if self._closed:
                    for reqs in self._pending.values():
                        for r in reqs:
                            r.error = ManagerError("the Manager is stopping")
                            r.done.set()
                    self._pending.clear()
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                key = min(self._pending, key=lambda k: self._pending[k][0].arrived)
                wait = self._pending[key][0].arrived + self.window - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                reqs = self._pending.pop(key)
                batch, rest = reqs[: self.max_batch], reqs[self.max_batch :]
                if rest:
                    self._pending[key] = rest
                return key, batch

    def _run(self) -> None:
        while True:
            item = self._next_batch()
            if item is None:
                return
            self._serve(*item)

    def _serve(self, key: Key, batch: list[_Request]) -> None:
        group, host_pcrs = key
        levels = merkle_tree([r.info.leaf() for r in batch])
        try:
            quote = self._quote(group, levels[-1][0], host_pcrs)
        except VtpmError as e:
            for r in batch:
                r.error = e
                r.done.set()
            return
        except Exception as e:  # never leave a waiter hanging
            log.exception("deep quote of a batch of %d failed", len(batch))
            err = ManagerError(f"the deep quote failed: {type(e).__name__}")
            for r in batch:
                r.error = err
                r.done.set()
            return
        self.batches += 1
        for i, r in enumerate(batch):
            r.result = Evidence(r.info, merkle_path(levels, i), quote, len(batch))
            r.done.set()
        log.debug("deep quote: %d request(s) in one hardware quote", len(batch))
