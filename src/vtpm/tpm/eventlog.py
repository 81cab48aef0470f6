"""The TCG crypto-agile event log: encode, parse and replay (no I/O).

TCG PC Client Platform Firmware Profile (PFP) 1.05, 10.2.1 TCG_PCR_EVENT (the SHA-1 header
event), 10.2.2 TCG_PCR_EVENT2, 10.4.5.1 TCG_EfiSpecIdEvent ("Spec ID Event03"), 10.4.1 event
types. The layout every firmware and Linux (`binary_bios_measurements`) use:

    header  TCG_PCR_EVENT: u32 pcrIndex 0 | u32 eventType EV_NO_ACTION | 20 zero bytes |
            u32 eventSize | TCG_EfiSpecIdEvent: "Spec ID Event03\\0" | u32 platformClass |
            u8 specVersionMinor, specVersionMajor, specErrata, uintnSize |
            u32 numberOfAlgorithms | {u16 algorithmId, u16 digestSize} x n |
            u8 vendorInfoSize | vendorInfo
    events  TCG_PCR_EVENT2: u32 pcrIndex | u32 eventType | TPML_DIGEST_VALUES (u32 count |
            {u16 hashAlg, digest} x count, sizes from the header) | u32 eventSize | event

All integers are little-endian (the log is a UEFI structure), unlike TPM commands.

Rules: parsing only refuses, it never guesses: a log must open with the Spec ID header, every
event's digests must use the header's algorithms with the header's sizes, and every length is
bounded before use. Malformed input raises `EventLogError` naming the event and the field (as
does an `Event` that is not valid); encoding what cannot be encoded raises LocalProtocolError.
Replay starts every PCR at zero, except that an EV_NO_ACTION "StartupLocality" event sets
PCR 0's starting value to the locality (PFP 10.4.5.3).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from vtpm.errors import EventLogError, LocalProtocolError
from vtpm.tpm.constants import DIGEST_SIZES, HASH_NAMES, MAX_PCR
from vtpm.tpm.frames import extend_value

SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"
PLATFORM_CLASS_CLIENT = 0
SPEC_VERSION = (0, 2, 0)  # minor, major, errata: the crypto-agile format of PFP 2.0
UINTN_SIZE_64 = 2
MAX_EVENT_DATA = 1 << 20
MAX_EVENTS = 100_000


class EventType(enum.IntEnum):
    """PFP 10.4.1 event types (the pre-OS ones; EFI types are 0x800000xx)."""

    EV_PREBOOT_CERT = 0x00
    EV_POST_CODE = 0x01
    EV_UNUSED = 0x02
    EV_NO_ACTION = 0x03
    EV_SEPARATOR = 0x04
    EV_ACTION = 0x05
    EV_EVENT_TAG = 0x06
    EV_S_CRTM_CONTENTS = 0x07
    EV_S_CRTM_VERSION = 0x08
    EV_CPU_MICROCODE = 0x09
    EV_PLATFORM_CONFIG_FLAGS = 0x0A
    EV_TABLE_OF_DEVICES = 0x0B
    EV_COMPACT_HASH = 0x0C
    EV_IPL = 0x0D
    EV_IPL_PARTITION_DATA = 0x0E
    EV_NONHOST_CODE = 0x0F
    EV_NONHOST_CONFIG = 0x10
    EV_NONHOST_INFO = 0x11
    EV_OMIT_BOOT_DEVICE_EVENTS = 0x12


def type_name(event_type: int) -> str:
    try:
        return EventType(event_type).name
    except ValueError:
        return f"event type {event_type:#x}"


@dataclass(frozen=True, slots=True)
class Event:
    """One TCG_PCR_EVENT2: digests in the log's order, as (TPM_ALG_ID, digest)."""

    pcr: int
    type: int
    digests: tuple[tuple[int, bytes], ...]
    data: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.pcr <= MAX_PCR:
            raise EventLogError(f"PCR {self.pcr} is not in 0..{MAX_PCR}")
        for alg, digest in self.digests:
            if DIGEST_SIZES.get(alg, len(digest)) != len(digest):
                raise EventLogError(f"a digest of {len(digest)} bytes for algorithm {alg:#06x}")

    def digest(self, alg: int) -> bytes | None:
        for a, d in self.digests:
            if a == alg:
                return d
        return None

    def describe(self) -> str:
        """`PCR 4, EV_IPL "kernel vmlinuz"`: how reports name this event."""
        text = self.data.decode("utf-8", errors="replace").rstrip("\x00")
        if not text.isprintable() or len(text) > 120:
            text = text[:117] + "..." if text.isprintable() else f"{len(self.data)} bytes"
        return f'PCR {self.pcr}, {type_name(self.type)} "{text}"'


@dataclass(frozen=True, slots=True)
class EventLog:
    """A parsed log: the header's algorithms (TPM_ALG_ID, digest size) and the events after it."""

    algorithms: tuple[tuple[int, int], ...]
    events: tuple[Event, ...]
    vendor_info: bytes = b""

    @property
    def banks(self) -> tuple[int, ...]:
        return tuple(alg for alg, _size in self.algorithms)


# encoding -----------------------------------------------------------------------------------


def encode_header(algorithms: Sequence[int], vendor_info: bytes = b"") -> bytes:
    """The TCG_PCR_EVENT that opens a crypto-agile log, announcing `algorithms`."""
    if not algorithms or len(vendor_info) > 255:
        raise LocalProtocolError(
            "a Spec ID event needs at least one algorithm and <= 255 vendor bytes"
        )
    spec = SPEC_ID_SIGNATURE + struct.pack(
        "<IBBBBI", PLATFORM_CLASS_CLIENT, *SPEC_VERSION, UINTN_SIZE_64, len(algorithms)
    )
    spec += b"".join(struct.pack("<HH", alg, DIGEST_SIZES[alg]) for alg in algorithms)
    spec += struct.pack("<B", len(vendor_info)) + vendor_info
    return struct.pack("<II", 0, EventType.EV_NO_ACTION) + bytes(20) + _sized(spec)


def encode_event(event: Event) -> bytes:
    """One TCG_PCR_EVENT2."""
    out = struct.pack("<III", event.pcr, event.type, len(event.digests))
    out += b"".join(struct.pack("<H", alg) + digest for alg, digest in event.digests)
    return out + _sized(event.data)


def encode(log: EventLog) -> bytes:
    for ev in log.events:
        if tuple(alg for alg, _ in ev.digests) != log.banks:
            raise LocalProtocolError(f"event {ev.describe()} does not carry the log's algorithms")
    header = encode_header(log.banks, log.vendor_info)
    return header + b"".join(encode_event(ev) for ev in log.events)


def _sized(data: bytes) -> bytes:
    return struct.pack("<I", len(data)) + data


# parsing ------------------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.off = 0
        self.where = "the log header"

    def take(self, n: int, field: str) -> bytes:
        if n > len(self.data) - self.off:
            raise EventLogError(
                f"event log truncated in {self.where}: {field} needs {n} bytes at offset "
                f"{self.off}, {len(self.data) - self.off} left"
            )
        out = self.data[self.off : self.off + n]
        self.off += n
        return out

    def unpack(self, fmt: str, field: str) -> tuple[int, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), field))

    @property
    def done(self) -> bool:
        return self.off == len(self.data)


def parse(data: bytes, max_events: int = MAX_EVENTS) -> EventLog:
    """Parse a crypto-agile log; EventLogError if it is not one."""
    r = _Reader(data)
    pcr, etype = r.unpack("<II", "pcrIndex/eventType")
    r.take(20, "the SHA-1 digest")
    (size,) = r.unpack("<I", "eventSize")
    if pcr != 0 or etype != EventType.EV_NO_ACTION or size > MAX_EVENT_DATA:
        raise EventLogError("the log does not open with an EV_NO_ACTION header event")
    algorithms, vendor = _parse_spec_id(r.take(size, "the Spec ID event"))
    sizes = dict(algorithms)
    events: list[Event] = []
    while not r.done:
        if len(events) >= max_events:
            raise EventLogError(f"the event log has more than {max_events} events")
        r.where = f"event {len(events) + 1}"
        pcr, etype, count = r.unpack("<III", "pcrIndex/eventType/digest count")
        if pcr > MAX_PCR:
            raise EventLogError(f"{r.where}: PCR index {pcr} is not in 0..{MAX_PCR}")
        if count != len(algorithms):
            raise EventLogError(
                f"{r.where}: {count} digests, but the header announces {len(algorithms)}"
            )
        digests = []
        for _ in range(count):
            (alg,) = r.unpack("<H", "hashAlg")
            if alg not in sizes:
                raise EventLogError(f"{r.where}: digest algorithm {alg:#06x} is not announced")
            digests.append((alg, r.take(sizes[alg], f"the {_alg_name(alg)} digest")))
        (size,) = r.unpack("<I", "eventSize")
        if size > MAX_EVENT_DATA:
            raise EventLogError(f"{r.where}: event data of {size} bytes is too large")
        events.append(Event(pcr, etype, tuple(digests), r.take(size, "the event data")))
    return EventLog(tuple(algorithms), tuple(events), vendor)


def _parse_spec_id(spec: bytes) -> tuple[list[tuple[int, int]], bytes]:
    r = _Reader(spec)
    r.where = "the Spec ID event"
    if r.take(16, "the signature") != SPEC_ID_SIGNATURE:
        raise EventLogError(
            'not a crypto-agile event log: the header lacks the "Spec ID Event03" signature'
        )
    _cls, _minor, _major, _errata, _uintn, count = r.unpack("<IBBBBI", "the version fields")
    if not 1 <= count <= len(DIGEST_SIZES) * 4:
        raise EventLogError(f"the Spec ID event announces {count} algorithms")
    algorithms: list[tuple[int, int]] = []
    for _ in range(count):
        alg, size = r.unpack("<HH", "an algorithm entry")
        if alg in DIGEST_SIZES and DIGEST_SIZES[alg] != size:
            raise EventLogError(f"the Spec ID event gives {_alg_name(alg)} a size of {size}")
        if not 1 <= size <= 64 or alg in dict(algorithms):
            raise EventLogError(f"the Spec ID event's entry for algorithm {alg:#06x} is invalid")
        algorithms.append((alg, size))
    (vendor_size,) = r.unpack("<B", "vendorInfoSize")
    vendor = r.take(vendor_size, "vendorInfo")
    return algorithms, vendor


def _alg_name(alg: int) -> str:
    return HASH_NAMES.get(alg, f"algorithm {alg:#06x}")


# replay -------------------------------------------------------------------------------------


def is_measurement(event: Event) -> bool:
    """EV_NO_ACTION events are informational: they are logged but never extended."""
    return event.type != EventType.EV_NO_ACTION


def starting_value(events: Iterable[Event], pcr: int, alg: int) -> bytes:
    """PCR `pcr`'s value after TPM2_Startup, before any extend (PFP 10.4.5.3)."""
    start = bytes(DIGEST_SIZES[alg])
    if pcr != 0:
        return start
    for ev in events:
        if ev.type == EventType.EV_NO_ACTION and ev.data.startswith(STARTUP_LOCALITY_SIGNATURE):
            locality = ev.data[len(STARTUP_LOCALITY_SIGNATURE) :][:1]
            if locality:
                return start[:-1] + locality
    return start


def replay(events: Sequence[Event], alg: int) -> dict[int, bytes]:
    """The value each PCR the events touch holds after them, in bank `alg`.

    Every measured event must carry a digest for `alg` (EventLogError otherwise)."""
    values: dict[int, bytes] = {}
    for i, ev in enumerate(events, 1):
        if not is_measurement(ev):
            continue
        digest = ev.digest(alg)
        if digest is None:
            raise EventLogError(f"event {i} ({ev.describe()}) has no {_alg_name(alg)} digest")
        old = values.get(ev.pcr)
        if old is None:
            old = starting_value(events, ev.pcr, alg)
        values[ev.pcr] = extend_value(alg, old, digest)
    return values
