"""The launch record: what a measured launch extends, handed from the launcher to the vTPM.

The launcher computes the measurements; the Manager writes the record beside the vTPM
(`<data-dir>/vtpms/<uuid>.launch.json`, nothing secret in it) and starts the vTPM's instance
with `--launch FILE`; the instance extends the measurements after each TPM2_Startup(CLEAR) and
writes the event log the record names.

    {
      "format": "vtpm-launch/1",
      "vtpm": "<uuid>" | null,
      "event_log": "/path/of/the/log" | null,
      "measurements": [
        {"pcr": 4, "kind": "kernel",  "event_type": "EV_IPL", "event_data": "kernel vmlinuz",
         "digests": {"sha1": "<hex>", "sha256": "<hex>", "sha384": "<hex>", "sha512": "<hex>"}},
        {"pcr": 5, "kind": "cmdline", ..., "event_data": "cmdline console=ttyS0"},
        {"pcr": 5, "kind": "initrd",  ..., "event_data": "initrd initrd.gz"}       (optional)
      ]
    }

The record is checked strictly (exact keys, the kinds in this order, each in its PCR, digests
of the right sizes): the Manager accepts records from administrators and the instance must
never extend anything a launch does not measure.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vtpm.errors import ConfigError
from vtpm.files import read_limited
from vtpm.tpm.constants import DIGEST_SIZES, HASH_NAMES
from vtpm.tpm.eventlog import Event, EventType

FORMAT = "vtpm-launch/1"
KIND_PCRS = {"kernel": 4, "cmdline": 5, "initrd": 5}
ORDERS = (("kernel", "cmdline"), ("kernel", "cmdline", "initrd"))
ALG_BY_NAME = {name: alg for alg, name in HASH_NAMES.items()}
MAX_EVENT_DATA = 4096
MAX_RECORD_BYTES = 1 << 16
RECORD_KEYS = frozenset({"format", "vtpm", "event_log", "measurements"})
MEASUREMENT_KEYS = frozenset({"pcr", "kind", "event_type", "event_data", "digests"})


@dataclass(frozen=True, slots=True)
class Measurement:
    """One launch extend: `digests` (TPM_ALG_ID -> digest) into `pcr`, logged as EV_IPL."""

    kind: str
    event_data: str
    digests: tuple[tuple[int, bytes], ...]

    def __post_init__(self) -> None:
        if self.kind not in KIND_PCRS:
            raise ConfigError(f"unknown launch measurement {self.kind!r}")
        if len(self.event_data.encode()) > MAX_EVENT_DATA:
            raise ConfigError(f"the {self.kind} event data is longer than {MAX_EVENT_DATA} bytes")
        if not self.digests or len({a for a, _ in self.digests}) != len(self.digests):
            raise ConfigError(f"the {self.kind} measurement needs one digest per bank")
        for alg, digest in self.digests:
            if DIGEST_SIZES.get(alg) != len(digest):
                raise ConfigError(f"the {self.kind} measurement has a bad digest for {alg:#06x}")

    @property
    def pcr(self) -> int:
        return KIND_PCRS[self.kind]

    @property
    def event_type(self) -> int:
        return EventType.EV_IPL

    @property
    def banks(self) -> tuple[int, ...]:
        return tuple(alg for alg, _ in self.digests)

    def digest(self, alg: int) -> bytes | None:
        return dict(self.digests).get(alg)

    def event(self, banks: Sequence[int]) -> Event:
        """The log event for this extend in `banks` (KeyError for a bank it has no digest of)."""
        mine = dict(self.digests)
        return Event(
            self.pcr,
            self.event_type,
            tuple((alg, mine[alg]) for alg in banks),
            self.event_data.encode(),
        )

    def to_json(self) -> dict[str, object]:
        return {
            "pcr": self.pcr,
            "kind": self.kind,
            "event_type": EventType(self.event_type).name,
            "event_data": self.event_data,
            "digests": {HASH_NAMES[alg]: d.hex() for alg, d in self.digests},
        }

    @classmethod
    def from_json(cls, raw: object) -> Measurement:
        if not isinstance(raw, dict) or set(raw) != MEASUREMENT_KEYS:
            raise ConfigError(
                f"a launch measurement has exactly the keys {sorted(MEASUREMENT_KEYS)}"
            )
        kind, data, digests = raw["kind"], raw["event_data"], raw["digests"]
        if not isinstance(kind, str) or kind not in KIND_PCRS:
            raise ConfigError(f"unknown launch measurement {kind!r}")
        if raw["pcr"] != KIND_PCRS[kind] or raw["event_type"] != "EV_IPL":
            raise ConfigError(f"the {kind} is measured into PCR {KIND_PCRS[kind]} as EV_IPL")
        if not isinstance(data, str) or not isinstance(digests, dict):
            raise ConfigError(f"the {kind} measurement's event_data or digests are malformed")
        pairs = []
        for name, value in digests.items():
            if name not in ALG_BY_NAME or not isinstance(value, str):
                raise ConfigError(f"the {kind} measurement has a bad digest entry {name!r}")
            try:
                pairs.append((ALG_BY_NAME[name], bytes.fromhex(value)))
            except ValueError:
                raise ConfigError(f"the {kind} {name} digest is not hex") from None
        return cls(kind, data, tuple(sorted(pairs)))


@dataclass(frozen=True, slots=True)
class LaunchRecord:
    measurements: tuple[Measurement, ...]
    vtpm_uuid: uuid.UUID | None = None
    event_log: Path | None = None

    def __post_init__(self) -> None:
        kinds = tuple(m.kind for m in self.measurements)
        if kinds not in ORDERS:
            raise ConfigError(
                f"a launch measures kernel, cmdline[, initrd] in that order, not {', '.join(kinds)}"
            )

    def with_place(self, vtpm_uuid: uuid.UUID, event_log: Path) -> LaunchRecord:
        return LaunchRecord(self.measurements, vtpm_uuid, event_log)

    def to_json(self) -> dict[str, object]:
        return {
            "format": FORMAT,
            "vtpm": None if self.vtpm_uuid is None else str(self.vtpm_uuid),
            "event_log": None if self.event_log is None else str(self.event_log),
            "measurements": [m.to_json() for m in self.measurements],
        }

    @classmethod
    def from_json(cls, raw: object) -> LaunchRecord:
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ConfigError(f'a launch record is a JSON object with "format": "{FORMAT}"')
        unknown = sorted(set(raw) - RECORD_KEYS)
        if unknown:
            raise ConfigError(f"unknown key(s) in the launch record: {', '.join(unknown)}")
        measurements = raw.get("measurements")
        if not isinstance(measurements, list):
            raise ConfigError("the launch record's measurements must be a list")
        vtpm, log = raw.get("vtpm"), raw.get("event_log")
        if not (vtpm is None or isinstance(vtpm, str)) or not (log is None or isinstance(log, str)):
            raise ConfigError("the launch record's vtpm and event_log are strings or null")
        try:
            vtpm_uuid = None if vtpm is None else uuid.UUID(vtpm)
        except ValueError:
            raise ConfigError(f"the launch record's vtpm {vtpm!r} is not a uuid") from None
        return cls(
            tuple(Measurement.from_json(m) for m in measurements),
            vtpm_uuid,
            None if log is None else Path(log),
        )

    @classmethod
    def load(cls, path: Path) -> LaunchRecord:
        data = read_limited(path, "launch record", MAX_RECORD_BYTES)
        try:
            try:
                raw = json.loads(data)
            except (UnicodeDecodeError, ValueError) as e:
                raise ConfigError(f"it is not JSON: {e}") from None
            return cls.from_json(raw)
        except ConfigError as e:
            raise ConfigError(f"launch record {path}: {e}") from None

    def save(self, path: Path) -> None:
        write_atomic(path, (json.dumps(self.to_json(), indent=2) + "\n").encode())


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `data` to `path` so that readers see the old file or the new, never a mix."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def banks_of(measurements: Sequence[Measurement]) -> tuple[int, ...]:
    """The banks every measurement has a digest for."""
    common: set[int] = set(DIGEST_SIZES)
    for m in measurements:
        common &= set(m.banks)
    return tuple(sorted(common))


def digests_json(values: Mapping[int, Mapping[int, bytes]]) -> dict[str, dict[str, str]]:
    """{alg: {pcr: value}} as the {"sha256": {"4": hex}} maps policies and reports use."""
    return {
        HASH_NAMES[alg]: {str(p): v.hex() for p, v in sorted(pcrs.items())}
        for alg, pcrs in values.items()
    }


def label_refusal(vtpm_uuid: object, label: str, wanted: str | None) -> str:
    """Why a launch that names the label `wanted` is refused for a vTPM labelled `label`
    (checked by the launcher first and by the Manager again)."""
    if wanted is not None and wanted != label:
        return f"vTPM {vtpm_uuid} has label {label}, not {wanted}"
    return ""
