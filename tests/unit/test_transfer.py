"""The sealed transfer blob codec: a round trip in both directions, and every header field,
the ciphertext and the tag bound (any change refused, with one opaque message)."""

from __future__ import annotations

import secrets
import uuid

import pytest

from vtpm.engine.engine import StateType
from vtpm.errors import RequestError
from vtpm.instance.statekey import StateKey
from vtpm.instance.transfer import HEADER, MAGIC, REFUSED, TransferBlob, TransferKey

KEY = StateKey(bytes(range(32)))
VTPM = uuid.UUID("0b9f2b8e-2c43-4bb4-9f4e-2b1c4e6e9a01")
DATA = b"libtpms permanent state " * 40


def sealed(generation: int = 7, kind: StateType = StateType.PERMANENT) -> bytes:
    return TransferKey(KEY).seal(TransferBlob(VTPM, kind, generation, DATA))


@pytest.mark.parametrize("kind", list(StateType))
def test_round_trip(kind: StateType) -> None:
    raw = sealed(123456789, kind)
    blob = TransferKey(KEY).open(raw, VTPM, kind)
    assert blob == TransferBlob(VTPM, kind, 123456789, DATA)
    assert raw.startswith(MAGIC) and DATA[:16] not in raw
    assert len(raw) == HEADER.size + len(DATA) + 16
    assert sealed(1, kind) != sealed(1, kind)  # a fresh nonce each time


def test_an_empty_blob_round_trips() -> None:
    raw = TransferKey(KEY).seal(TransferBlob(VTPM, StateType.VOLATILE, 0, b""))
    assert TransferKey(KEY).open(raw, VTPM, StateType.VOLATILE).data == b""


# offset and size of each header field (see the format in vtpm.instance.transfer)
FIELDS = {
    "magic": (0, 8),
    "version": (8, 4),
    "uuid": (12, 16),
    "type": (28, 4),
    "generation": (32, 8),
    "nonce": (40, 12),
    "ciphertext": (52, 1),
    "tag": (-16, 16),
}


@pytest.mark.parametrize("name", list(FIELDS))
def test_a_change_to_any_field_is_refused(name: str) -> None:
    start, size = FIELDS[name]
    raw = bytearray(sealed())
    pos = start if start >= 0 else len(raw) + start
    raw[pos + size - 1] ^= 0x01
    with pytest.raises(RequestError) as e:
        TransferKey(KEY).open(bytes(raw), VTPM, StateType.PERMANENT)
    assert str(e.value) == REFUSED


def test_another_vtpm_another_key_another_type_and_short_input_are_refused() -> None:
    raw = sealed()
    cases = [
        (TransferKey(KEY), raw, uuid.uuid4(), StateType.PERMANENT),
        (TransferKey(StateKey(secrets.token_bytes(32))), raw, VTPM, StateType.PERMANENT),
        (TransferKey(KEY), raw, VTPM, StateType.VOLATILE),
        (TransferKey(KEY), raw[: HEADER.size + 15], VTPM, StateType.PERMANENT),
        (TransferKey(KEY), raw[:-1], VTPM, StateType.PERMANENT),
        (TransferKey(KEY), secrets.token_bytes(1400), VTPM, StateType.PERMANENT),
        (TransferKey(KEY), b"", VTPM, StateType.PERMANENT),
    ]
    for key, data, vtpm, kind in cases:
        with pytest.raises(RequestError, match=REFUSED):
            key.open(data, vtpm, kind)


def test_generation_range() -> None:
    with pytest.raises(RequestError):
        TransferBlob(VTPM, StateType.PERMANENT, 1 << 64, b"")
    with pytest.raises(RequestError):
        TransferBlob(VTPM, StateType.PERMANENT, -1, b"")
