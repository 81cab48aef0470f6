"""Replay a TCG event log against a vTPM's quoted PCR values and against the expected launch.

`replay_checks(log, pcrs, bank, expected)` is what `vtpm verify --event-log FILE` runs, with
`pcrs` the vTPM PCR values a quote or a deep quote vouched for (bank `bank`). Checks:

    eventlog.parse     the log is a crypto-agile TCG log (`vtpm.tpm.eventlog`) with digests in
                       `bank`
    eventlog.replay    replaying the log gives, for every PCR it extends, the quoted value (and
                       the quote covers that PCR): the log is the true story of those PCRs
    eventlog.expected  (with a policy) the log's events are the expected launch's, one by one;
                       the first event that differs is named, with both digests. When the
                       policy has no event list, the replayed values are compared with its
                       `vtpm_pcrs` and the events into a differing PCR are named.

The policy's `event_log` entry, as `vtpm launch reference` writes it:

    "event_log": {"events": [{"pcr": 4, "type": "EV_IPL", "data": "kernel vmlinuz",
                              "digests": {"sha1": "<hex>", "sha256": "<hex>", ...}}, ...]}

Event numbers are positions in the log after its Spec ID header, counted from 1 (as
`tpm2_eventlog` numbers them).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

from vtpm.errors import ConfigError, EventLogError
from vtpm.tpm import eventlog
from vtpm.tpm.constants import HASH_NAMES, MAX_PCR
from vtpm.tpm.eventlog import Event, EventType
from vtpm.tpm.hashes import HASH_BY_NAME
from vtpm.verify.expected import Expected
from vtpm.verify.verdict import Check

MAX_EXPECTED_EVENTS = 1024
ENTRY_KEYS = frozenset({"pcr", "type", "data", "digests"})

Numbered = list[tuple[int, Event]]  # (event number in the log, event)


def _short(data: bytes) -> str:
    text = data.hex()
    return text if len(text) <= 24 else text[:24] + "..."


# the policy's event list ----------------------------------------------------------------------


def policy_entry(events: Sequence[Event]) -> dict[str, object]:
    """The policy's `event_log` value naming `events` as the expected ones."""
    out = []
    for ev in events:
        out.append(
            {
                "pcr": ev.pcr,
                "type": eventlog.type_name(ev.type),
                "data": ev.data.decode("utf-8", errors="replace"),
                "digests": {HASH_NAMES[a]: d.hex() for a, d in ev.digests},
            }
        )
    return {"events": out}


def parse_policy_entry(raw: object) -> tuple[Event, ...]:
    """The expected events of a policy's `event_log` value; ConfigError if malformed."""
    where = "the policy's event_log"
    events = raw.get("events") if isinstance(raw, dict) and set(raw) == {"events"} else None
    if not isinstance(events, list) or not 1 <= len(events) <= MAX_EXPECTED_EVENTS:
        raise ConfigError(f'{where} must be {{"events": [...]}} with 1..{MAX_EXPECTED_EVENTS}')
    out = []
    for n, e in enumerate(events, 1):
        if not isinstance(e, dict) or set(e) != ENTRY_KEYS:
            raise ConfigError(f"{where}: event {n} needs exactly {', '.join(sorted(ENTRY_KEYS))}")
        pcr, etype, data, digests = e["pcr"], e["type"], e["data"], e["digests"]
        if not isinstance(data, str) or not isinstance(digests, dict) or not digests:
            raise ConfigError(f"{where}: event {n}'s data or digests are malformed")
        try:
            type_value = EventType[etype] if isinstance(etype, str) else EventType(etype)
        except (KeyError, ValueError):
            raise ConfigError(f"{where}: event {n} has an unknown type {etype!r}") from None
        pairs = []
        for name, value in digests.items():
            info = HASH_BY_NAME.get(name)
            try:
                digest = bytes.fromhex(value) if isinstance(value, str) else b""
            except ValueError:
                digest = b""
            if info is None or len(digest) != info.size:
                raise ConfigError(f"{where}: event {n} has a bad {name} digest")
            pairs.append((info.alg, digest))
        if not isinstance(pcr, int) or isinstance(pcr, bool) or not 0 <= pcr <= MAX_PCR:
            raise ConfigError(f"{where}: event {n}'s pcr must be 0..{MAX_PCR}")
        out.append(Event(pcr, type_value, tuple(pairs), data.encode()))
    return tuple(out)


# checks -------------------------------------------------------------------------------------


def replay_checks(
    log: bytes, pcrs: Mapping[int, bytes], bank: str, expected: Expected | None
) -> list[Check]:
    info = HASH_BY_NAME.get(bank)
    if info is None:
        return [Check("eventlog.parse", False, f"the quote's bank {bank} is not supported")]
    try:
        parsed = eventlog.parse(log)
    except EventLogError as e:
        return [Check("eventlog.parse", False, str(e))]
    names = ", ".join(HASH_NAMES.get(a, f"{a:#06x}") for a in parsed.banks)
    if info.alg not in parsed.banks:
        return [Check("eventlog.parse", False, f"the log has {names} digests, no {bank}")]
    measured: Numbered = [
        (n, e) for n, e in enumerate(parsed.events, 1) if eventlog.is_measurement(e)
    ]
    checks = [Check("eventlog.parse", True, f"{len(parsed.events)} event(s), banks {names}")]
    values = eventlog.replay(parsed.events, info.alg)
    checks.append(_replay(measured, values, pcrs))
    if expected is not None:
        check = _expected(measured, values, info.alg, bank, expected)
        if check is not None:
            checks.append(check)
    return checks


def _into(measured: Numbered, pcr: int) -> str:
    return "; ".join(f"event {n}: {e.describe()}" for n, e in measured if e.pcr == pcr)


def _replay(measured: Numbered, values: Mapping[int, bytes], pcrs: Mapping[int, bytes]) -> Check:
    if not values:
        return Check("eventlog.replay", False, "the log extends no PCR: it proves nothing")
    problems = []
    for pcr, value in sorted(values.items()):
        have = pcrs.get(pcr)
        if have is None:
            problems.append(f"PCR {pcr} is extended by the log but not quoted")
        elif not hmac.compare_digest(have, value):
            problems.append(
                f"PCR {pcr}: the log ({_into(measured, pcr)}) replays to {_short(value)}, the "
                f"vTPM holds {_short(have)}"
            )
    if problems:
        return Check("eventlog.replay", False, "; ".join(problems))
    listed = ", ".join(str(p) for p in sorted(values))
    return Check("eventlog.replay", True, f"the log replays to the quoted PCR {listed}")


def _expected(
    measured: Numbered, values: Mapping[int, bytes], alg: int, bank: str, expected: Expected
) -> Check | None:
    if expected.event_log is not None:
        want = [e for e in parse_policy_entry(expected.event_log) if eventlog.is_measurement(e)]
        return _compare_events(measured, want, alg, bank)
    want_values = (expected.vtpm_pcrs or {}).get(bank)
    if not want_values:
        return None
    problems = []
    for pcr, value in sorted(want_values.items()):
        got = values.get(pcr)
        if got is not None and not hmac.compare_digest(got, value):
            problems.append(
                f"PCR {pcr} replays to {_short(got)}, expected {_short(value)}; the log's "
                f"events into it: {_into(measured, pcr)}"
            )
    if problems:
        return Check("eventlog.expected", False, "; ".join(problems))
    return Check("eventlog.expected", True, "the replayed PCR values are the expected ones")


def _compare_events(measured: Numbered, want: Sequence[Event], alg: int, bank: str) -> Check:
    for i, (n, got) in enumerate(measured):
        if i >= len(want):
            return Check(
                "eventlog.expected",
                False,
                f"event {n} ({got.describe()}) is not in the expected launch "
                f"({len(want)} event(s))",
            )
        exp = want[i]
        digest, exp_digest = got.digest(alg), exp.digest(alg)
        if exp_digest is None:
            return Check("eventlog.expected", False, f"the policy has no {bank} digests")
        if got.pcr != exp.pcr or got.type != exp.type:
            why = f"it is {got.describe()}, expected {exp.describe()}"
        elif digest is None or not hmac.compare_digest(digest, exp_digest):
            why = (
                f"its {bank} digest is {_short(digest or b'')}, expected {_short(exp_digest)} "
                f"({exp.describe()})"
            )
        else:
            continue
        return Check("eventlog.expected", False, f"event {n} ({got.describe()}) differs: {why}")
    if len(measured) < len(want):
        missing = want[len(measured)]
        return Check(
            "eventlog.expected",
            False,
            f"the log ends after {len(measured)} event(s); expected next: {missing.describe()}",
        )
    return Check(
        "eventlog.expected",
        True,
        f"all {len(want)} event(s) are the expected launch's: "
        + "; ".join(e.describe() for e in want),
    )
