"""When a hardware TPM that stopped answering may be tried again (`vtpm.manager.hwtpm`).

An outage begins when the retry loop gives up on the TPM. From then on callers are refused at
once, without a TPM command, until a recovery attempt is due: `first` seconds after the outage
began, then after twice as long each time, up to MAX. One caller makes each attempt; success
ends the outage and resets the delay. Not thread-safe on its own: the TPM's lock covers it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

FIRST = 5.0  # seconds from the start of an outage to the first reconnection attempt
MAX = 60.0


@dataclass(frozen=True, slots=True)
class Health:
    """The TPM as its last use found it: state "ok" or "down"; then `error` says why and
    `retry_in` how many seconds remain before the next reconnection attempt."""

    state: str = "ok"
    error: str = ""
    retry_in: float = 0.0


class Outage:
    def __init__(self, first: float = FIRST) -> None:
        self._first = first
        self._delay = first
        self._why = ""  # "" while the TPM answers
        self._retry_at = 0.0  # time.monotonic() of the next attempt while down

    @property
    def why(self) -> str:
        return self._why

    def health(self) -> Health:
        if not self._why:
            return Health()
        return Health("down", self._why, max(0.0, self._retry_at - time.monotonic()))

    def wait(self) -> float:
        """Seconds until a recovery attempt is due (<= 0: due now)."""
        return self._retry_at - time.monotonic()

    def began(self, why: str) -> None:
        """The TPM does not answer (again): record why; schedule the next attempt if this is
        the start of the outage (an attempt already rescheduled it otherwise)."""
        if not self._why:
            log.error("hardware TPM down: %s", why)
            self._schedule()
        self._why = why

    def attempt(self) -> None:
        """A caller tries to recover now; the next attempt waits longer."""
        self._schedule()

    def ended(self) -> bool:
        """The TPM answered; True when that ended an outage."""
        was, self._why, self._delay = self._why, "", self._first
        return bool(was)

    def _schedule(self) -> None:
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, MAX)
