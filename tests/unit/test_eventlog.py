"""vtpm.tpm.eventlog: a real firmware's log (SeaBIOS, captured), our encoder, bad input.

The captured log is the vector: it must parse and replay to the PCR values the guest read from
its TPM. Our own logs are checked against tpm2-tools' parser in tests/integration/test_launch.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtpm.errors import EventLogError
from vtpm.tpm import eventlog
from vtpm.tpm.constants import DIGEST_SIZES, TPM_ALG
from vtpm.tpm.eventlog import Event, EventLog, EventType

VECTORS = Path(__file__).parent.parent / "vectors"
SEABIOS_LOG = (VECTORS / "seabios-binary_bios_measurements.bin").read_bytes()
SEABIOS_PCRS = json.loads((VECTORS / "seabios-binary_bios_measurements.pcrs.json").read_text())
BANKS = (TPM_ALG.SHA1, TPM_ALG.SHA256, TPM_ALG.SHA384, TPM_ALG.SHA512)


def test_seabios_log_parses_and_replays_to_the_guests_pcrs() -> None:
    log = eventlog.parse(SEABIOS_LOG)
    assert log.banks == BANKS
    assert len(log.events) > 10
    types = {e.type for e in log.events}
    assert EventType.EV_SEPARATOR in types
    for bank, alg in (("sha1", TPM_ALG.SHA1), ("sha256", TPM_ALG.SHA256)):
        values = eventlog.replay(log.events, alg)
        for pcr, want in SEABIOS_PCRS["pcrs"][bank].items():
            got = values.get(int(pcr), bytes(len(bytes.fromhex(want))))
            assert got.hex() == want, f"{bank} PCR {pcr}"


def test_seabios_log_reencodes_byte_for_byte() -> None:
    log = eventlog.parse(SEABIOS_LOG)
    header_size = len(eventlog.encode_header(log.banks, log.vendor_info))
    body = b"".join(eventlog.encode_event(e) for e in log.events)
    assert SEABIOS_LOG[header_size:] == body


def _event(pcr: int, data: bytes, banks: tuple[int, ...] = BANKS) -> Event:
    names: dict[int, str] = {TPM_ALG.SHA1: "sha1", TPM_ALG.SHA256: "sha256"}
    names |= {TPM_ALG.SHA384: "sha384", TPM_ALG.SHA512: "sha512"}
    digests = tuple((a, hashlib.new(names[a], data).digest()) for a in banks)
    return Event(pcr, EventType.EV_IPL, digests, data)


def test_encode_parse_round_trip_and_replay_arithmetic() -> None:
    events = (_event(4, b"kernel"), _event(5, b"cmdline"), _event(5, b"initrd"))
    log = EventLog(tuple((a, DIGEST_SIZES[a]) for a in BANKS), events)
    data = eventlog.encode(log)
    assert eventlog.parse(data) == log
    # header: TCG_PCR_EVENT, little-endian, with the Spec ID signature
    assert struct.unpack_from("<II", data) == (0, EventType.EV_NO_ACTION)
    assert data[32 : 32 + 16] == b"Spec ID Event03\x00"
    values = eventlog.replay(events, TPM_ALG.SHA256)
    k, c, i = (hashlib.sha256(x).digest() for x in (b"kernel", b"cmdline", b"initrd"))
    pcr4 = hashlib.sha256(bytes(32) + k).digest()
    pcr5 = hashlib.sha256(hashlib.sha256(bytes(32) + c).digest() + i).digest()
    assert values == {4: pcr4, 5: pcr5}


def test_startup_locality_sets_pcr0_start() -> None:
    data = b"StartupLocality\x00\x03"
    loc = Event(0, EventType.EV_NO_ACTION, ((TPM_ALG.SHA256, bytes(32)),), data)
    ext = _event(0, b"crtm", (TPM_ALG.SHA256,))
    values = eventlog.replay([loc, ext], TPM_ALG.SHA256)
    digest = ext.digest(TPM_ALG.SHA256)
    assert digest is not None
    assert values[0] == hashlib.sha256(bytes(31) + b"\x03" + digest).digest()


def test_replay_needs_the_bank() -> None:
    with pytest.raises(EventLogError, match="no sha384 digest"):
        eventlog.replay([_event(4, b"k", (TPM_ALG.SHA256,))], TPM_ALG.SHA384)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:-1], "truncated in event 3: the event data"),
        (lambda d: d[:20], "truncated in the log header"),
        (lambda d: d[:32] + b"Spec ID Event02\x00" + d[48:], "Spec ID Event03"),
        (lambda d: struct.pack("<I", 4) + d[4:], "does not open with an EV_NO_ACTION"),
    ],
)
def test_malformed_logs(mutate: object, message: str) -> None:
    events = (_event(4, b"kernel"), _event(5, b"cmdline"), _event(5, b"initrd"))
    data = eventlog.encode(EventLog(tuple((a, DIGEST_SIZES[a]) for a in BANKS), events))
    with pytest.raises(EventLogError, match=message):
        eventlog.parse(mutate(data))  # type: ignore[operator]


def test_event_with_unannounced_algorithm() -> None:
    header = eventlog.encode_header([TPM_ALG.SHA256])
    bad = eventlog.encode_event(_event(4, b"k", (TPM_ALG.SHA1,)))
    with pytest.raises(EventLogError, match="event 1: digest algorithm 0x0004 is not announced"):
        eventlog.parse(header + bad)


def test_every_truncation_of_the_real_log_is_refused_cleanly() -> None:
    header = len(eventlog.encode_header(eventlog.parse(SEABIOS_LOG).banks))
    boundaries = {header}
    for cut in range(len(SEABIOS_LOG)):
        try:
            eventlog.parse(SEABIOS_LOG[:cut])
        except EventLogError:
            continue
        boundaries.add(cut)  # a cut at an event boundary is a shorter, valid log
    assert min(boundaries) == header


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_garbage_raises_only_event_log_errors(data: bytes) -> None:
    for candidate in (data, SEABIOS_LOG[:100] + data):
        with contextlib.suppress(EventLogError):
            eventlog.parse(candidate)


def test_a_bank_we_do_not_hash_still_parses() -> None:
    """Firmware may log SM3_256 (0x0012) too: parse it, replay the banks we know."""
    sm3 = 0x0012
    spec = eventlog.SPEC_ID_SIGNATURE + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 2)
    spec += struct.pack("<HHHH", TPM_ALG.SHA256, 32, sm3, 32) + b"\x00"
    header = struct.pack("<II", 0, EventType.EV_NO_ACTION) + bytes(20)
    header += struct.pack("<I", len(spec)) + spec
    event = struct.pack("<III", 4, EventType.EV_IPL, 2) + struct.pack("<H", TPM_ALG.SHA256)
    event += b"\x11" * 32 + struct.pack("<H", sm3) + b"\x22" * 32 + struct.pack("<I", 1) + b"k"
    log = eventlog.parse(header + event)
    assert log.banks == (TPM_ALG.SHA256, sm3)
    want = hashlib.sha256(bytes(32) + b"\x11" * 32).digest()
    assert eventlog.replay(log.events, TPM_ALG.SHA256) == {4: want}
