"""An outage of the hardware TPM, and when it may be brought back (`vtpm.manager.hwtpm`).

An outage begins when the retry loop gives up on the TPM and ends at the next command it
answers. While it lasts, each use makes one quick connection attempt (no retry loop), and a
restart of the Manager's simulator is due `first` seconds after the outage began, then after
twice as long each time, up to MAX: one caller makes each restart attempt. Success resets the
delay. Not thread-safe on its own: the TPM's lock covers it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

FIRST = 5.0  # seconds from the start of an outage to the first restart of the simulator
MAX = 60.0


@dataclass(frozen=True, slots=True)
class Health:
    """The TPM as its last use found it: state "ok" or "down"; then `error` says why and
    `retry_in` how many seconds remain before the simulator may be restarted."""

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
        """Seconds until a restart is due (<= 0: due now)."""
        return self._retry_at - time.monotonic()

    def began(self, why: str) -> None:
        """The TPM does not answer (again): record why; schedule the next attempt if this is
        the start of the outage (an attempt already rescheduled it otherwise)."""
        if not self._why:
            log.error("hardware TPM down: %s", why)
            self._schedule()
        self._why = why

    def attempt(self) -> None:
        """A caller restarts the simulator now; the next restart waits longer."""
        self._schedule()

    def ended(self) -> bool:
        """The TPM answered; True when that ended an outage."""
        was, self._why, self._delay = self._why, "", self._first
        return bool(was)

    def _schedule(self) -> None:
        self._retry_at = time.monotonic() + self._delay
        self._delay = min(self._delay * 2, MAX)
