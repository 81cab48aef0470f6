"""A second factor on a front-door vTPM's state: the orchestrator's secret (`swtpm_setup
--pwdfile-fd`, `swtpm --key pwdfd=`), mixed into the key the instance is given.

What is kept: only a check value, HMAC-SHA256 keyed by the vTPM's state key over a fixed label
and the secret (`check_value`), so the Manager can refuse a wrong secret before it starts an
instance; never the secret. What the instance is given for such a vTPM is not its state key but
HKDF-SHA256 of the state key and the secret (`mixed_key`): state written under it does not open
without the secret, even by this Manager.

The secret lives in memory only for as long as a front-door connection that brought it holds
it (`Secrets.hold` ... `release`); the key-custody link asks for it when the instance says
Hello. A vTPM that needs a secret and has none held (e.g. `vtpm start` by an administrator) is
refused its key.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import uuid

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

CHECK_LABEL = b"vtpm front-door secret check v1\x00"
MIX_INFO = b"vtpm front-door state key v1"


def check_value(state_key: bytes, secret: bytes) -> bytes:
    return hmac.new(state_key, CHECK_LABEL + secret, hashlib.sha256).digest()


def matches(state_key: bytes, secret: bytes, check: bytes) -> bool:
    return hmac.compare_digest(check_value(state_key, secret), check)


def mixed_key(state_key: bytes, secret: bytes) -> bytes:
    """The key an instance of a vTPM with a secret is given (32 bytes, like the state key)."""
    return HKDF(hashes.SHA256(), 32, salt=state_key, info=MIX_INFO).derive(secret)


class Secrets:
    """The secrets of the front-door vTPMs being run or set up now, by vTPM (memory only)."""

    def __init__(self) -> None:
        self._held: dict[uuid.UUID, bytes] = {}
        self._lock = threading.Lock()

    def hold(self, vtpm_uuid: uuid.UUID, secret: bytes) -> None:
        with self._lock:
            self._held[vtpm_uuid] = secret

    def release(self, vtpm_uuid: uuid.UUID) -> None:
        with self._lock:
            self._held.pop(vtpm_uuid, None)

    def get(self, vtpm_uuid: uuid.UUID) -> bytes | None:
        with self._lock:
            return self._held.get(vtpm_uuid)
