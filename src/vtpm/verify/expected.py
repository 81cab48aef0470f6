"""The verifier's expected values: a JSON policy file naming what a quote must show.

    {
      "format": "vtpm-verify-policy/1",
      "vtpm_uuid": "6f1c...",                     optional: the vTPM the deep quote must be for
      "group": "tenants" | "<uuid>",              optional: its group, by name or uuid
      "label": "guest1_u:vm_r:vtpm_t",            optional: its label, exactly
      "vtpm_pcrs": {"sha256": {"4": "hex", ..}},  optional: vTPM PCR values
      "host_pcrs": {"sha256": {"0": "hex", ..}},  optional: host PCR values
      "event_log": ...                            optional: kept as given, for the event-log
                                                  replay (`vtpm.verify.eventlog`) to interpret
    }

Any other key is refused (a misspelt key must not silently weaken a policy). PCR maps take
banks sha1/sha256/sha384/sha512, indices 0..23 and hex values of the bank's digest size.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from vtpm.errors import ConfigError
from vtpm.files import read_limited
from vtpm.tpm.constants import MAX_PCR
from vtpm.tpm.hashes import HASH_BY_NAME

FORMAT = "vtpm-verify-policy/1"
KEYS = frozenset({"format", "vtpm_uuid", "group", "label", "vtpm_pcrs", "host_pcrs", "event_log"})
MAX_POLICY_BYTES = 1 << 20

PcrBanks = Mapping[str, Mapping[int, bytes]]  # bank name -> PCR index -> value


@dataclass(frozen=True, slots=True)
class Expected:
    vtpm_uuid: uuid.UUID | None = None
    group: str | None = None
    label: str | None = None
    vtpm_pcrs: PcrBanks | None = None
    host_pcrs: PcrBanks | None = None
    event_log: object = None  # raw JSON value, interpreted by the event-log replay

    def __post_init__(self) -> None:
        for name in ("vtpm_pcrs", "host_pcrs"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _freeze(_check_banks(value, name)))

    @classmethod
    def from_json(cls, raw: object) -> Expected:
        """Build from a parsed policy document; ConfigError naming the problem."""
        if not isinstance(raw, dict):
            raise ConfigError("a verify policy is a JSON object")
        if raw.get("format") != FORMAT:
            raise ConfigError(f'a verify policy needs "format": "{FORMAT}"')
        unknown = sorted(set(raw) - KEYS)
        if unknown:
            raise ConfigError(f"unknown key(s) in the verify policy: {', '.join(unknown)}")
        vtpm_uuid = None
        if raw.get("vtpm_uuid") is not None:
            text = raw["vtpm_uuid"]
            try:
                vtpm_uuid = uuid.UUID(text) if isinstance(text, str) else None
            except ValueError:
                vtpm_uuid = None
            if vtpm_uuid is None:
                raise ConfigError(f"vtpm_uuid {text!r} is not a uuid")
        group = _opt_str(raw, "group")
        label = _opt_str(raw, "label")
        if label is not None and label.count(":") != 2:
            raise ConfigError(f"label {label!r} is not user:role:type")
        return cls(
            vtpm_uuid=vtpm_uuid,
            group=group,
            label=label,
            vtpm_pcrs=_parse_banks(raw.get("vtpm_pcrs"), "vtpm_pcrs"),
            host_pcrs=_parse_banks(raw.get("host_pcrs"), "host_pcrs"),
            event_log=raw.get("event_log"),
        )

    @classmethod
    def load(cls, path: Path) -> Expected:
        """Read a policy file; ConfigError naming the file and the problem."""
        data = read_limited(path, "verify policy", MAX_POLICY_BYTES)
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"verify policy {path} is not valid JSON: {e}") from None
        except RecursionError:
            raise ConfigError(f"verify policy {path} is nested too deeply to be read") from None
        try:
            return cls.from_json(raw)
        except ConfigError as e:
            raise ConfigError(f"verify policy {path}: {e}") from None


def _opt_str(raw: Mapping[str, object], key: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty string")
    return value


def _parse_banks(raw: object, what: str) -> dict[str, dict[int, bytes]] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f'{what} must be an object like {{"sha256": {{"4": "hex"}}}}')
    out: dict[str, dict[int, bytes]] = {}
    for bank, values in raw.items():
        if not isinstance(values, dict) or not values:
            raise ConfigError(f"{what}.{bank} must be an object of PCR index -> hex value")
        parsed: dict[int, bytes] = {}
        for key, value in values.items():
            if not (isinstance(key, str) and key.isascii() and key.isdigit()):
                raise ConfigError(f"{what}.{bank}: {key!r} is not a PCR index")
            if not isinstance(value, str):
                raise ConfigError(f"{what}.{bank}[{key}] must be a hex string")
            try:
                parsed[int(key)] = bytes.fromhex(value)
            except ValueError:
                raise ConfigError(f"{what}.{bank}[{key}] is not hex") from None
        out[bank] = parsed
    return _check_banks(out, what)


def _check_banks(banks: PcrBanks, what: str) -> dict[str, dict[int, bytes]]:
    out: dict[str, dict[int, bytes]] = {}
    for bank, values in banks.items():
        info = HASH_BY_NAME.get(bank)
        if info is None:
            raise ConfigError(f"{what}: unknown PCR bank {bank!r} (sha1, sha256, sha384, sha512)")
        for index, value in values.items():
            if not 0 <= index <= MAX_PCR:
                raise ConfigError(f"{what}.{bank}: PCR index {index} is not in 0..{MAX_PCR}")
            if len(value) != info.size:
                raise ConfigError(
                    f"{what}.{bank}[{index}] is {len(value)} bytes; a {bank} value is {info.size}"
                )
        out[bank] = dict(values)
    return out


def _freeze(banks: dict[str, dict[int, bytes]]) -> PcrBanks:
    return MappingProxyType({k: MappingProxyType(v) for k, v in banks.items()})
