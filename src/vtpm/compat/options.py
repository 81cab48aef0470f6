"""The command-line grammar the swtpm family speaks, parsed once, for all three programs.

Rules:
- a long option takes its value as the next word or after `=` (`--tpmstate dir=D`,
  `--tpmstate=dir=D`); a short option as the next word (`-r 3`); `--save TYPE FILE` takes two;
- an option's value may be a suboption list `key=value,key2=value2,flag` (`suboptions`);
- each program lists its options (`Spec`): what it honours, what it accepts and ignores
  (`IGNORED`, logged), what it refuses (`REFUSED`, with the reason: one line, exit 1);
- an option nobody listed is logged and skipped (with the next word as its value when that
  word does not start with `-`), so a newer orchestrator's harmless extra does not break a
  start. Positional words are kept for the program to judge.

Standard library only: `swtpm socket` parses before its sockets exist.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


class UsageError(Exception):
    """The command line cannot be honoured; the message is the one line the user sees."""


class Kind(enum.IntEnum):
    FLAG = 0  # no value
    VALUE = 1  # one value
    PAIR = 2  # two values (`--save TYPE FILE`)


class Treat(enum.StrEnum):
    HONOUR = "honour"
    IGNORED = "ignored"  # accepted, has no effect here (logged)
    REFUSED = "refused"  # asks for something this implementation does not do


@dataclass(frozen=True, slots=True)
class Spec:
    names: tuple[str, ...]  # "--tpmstate", "--tpm-state", "-t": the first is the key
    kind: Kind = Kind.FLAG
    treat: Treat = Treat.HONOUR
    why: str = ""  # for IGNORED and REFUSED: what the user is told

    @property
    def key(self) -> str:
        return self.names[0]


@dataclass(frozen=True, slots=True)
class Parsed:
    """Each honoured option's values in order (a flag's value is ""); what was skipped."""

    values: Mapping[str, tuple[str, ...]]
    positional: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # one line per ignored or unknown option, for the log

    def has(self, key: str) -> bool:
        return key in self.values

    def last(self, key: str) -> str | None:
        got = self.values.get(key)
        return got[-1] if got else None

    def all(self, key: str) -> tuple[str, ...]:
        return self.values.get(key, ())


def parse(argv: Sequence[str], specs: Sequence[Spec]) -> Parsed:
    by_name = {name: spec for spec in specs for name in spec.names}
    values: dict[str, list[str]] = {}
    positional: list[str] = []
    notes: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            positional += argv[i:]
            break
        if not word.startswith("-") or word == "-":
            positional.append(word)
            continue
        name, eq, inline = word.partition("=") if word.startswith("--") else (word, "", "")
        spec = by_name.get(name)
        if spec is None:
            if not eq and i < len(argv) and not argv[i].startswith("-"):
                inline, i = argv[i], i + 1
            notes.append(
                f"option {name} is unknown here, ignored" + (f" ({inline})" * bool(inline))
            )
            continue
        got: list[str] = []
        if spec.kind is Kind.FLAG:
            if eq:
                raise UsageError(f"option {name} takes no value")
            got = [""]
        else:
            want = int(spec.kind)
            if eq:
                got.append(inline)
            while len(got) < want:
                if i >= len(argv):
                    raise UsageError(
                        f"option {name} needs {'a value' if want == 1 else 'two values'}"
                    )
                got.append(argv[i])
                i += 1
        if spec.treat is Treat.REFUSED:
            raise UsageError(f"{name}: {spec.why}")
        if spec.treat is Treat.IGNORED:
            notes.append(f"option {name} ignored: {spec.why}")
            continue
        values.setdefault(spec.key, []).append(" ".join(got) if spec.kind is Kind.PAIR else got[0])
    return Parsed({k: tuple(v) for k, v in values.items()}, tuple(positional), tuple(notes))


@dataclass(frozen=True, slots=True)
class Suboptions:
    """`key=value,key2=value2,flag` as an ordered mapping (a flag's value is "")."""

    items: tuple[tuple[str, str], ...] = field(default=())

    def get(self, key: str) -> str | None:
        for k, v in self.items:
            if k == key:
                return v
        return None

    def has(self, key: str) -> bool:
        return any(k == key for k, _ in self.items)

    def keys(self) -> tuple[str, ...]:
        return tuple(k for k, _ in self.items)


def suboptions(
    text: str,
    option: str,
    known: Sequence[str],
    *,
    refused: Mapping[str, str] | None = None,
    notes: list[str] | None = None,
) -> Suboptions:
    """Split `text`; a key in `refused` raises UsageError with its reason, a key neither known
    nor refused is noted (in `notes`) and dropped. A key given twice: the last one counts."""
    items: dict[str, str] = {}
    for part in text.split(","):
        if not part:
            continue
        key, _, value = part.partition("=")
        if refused and key in refused:
            raise UsageError(f"{option} {key}: {refused[key]}")
        if key not in known:
            if notes is not None:
                notes.append(f"{option}: suboption {key!r} is unknown here, ignored")
            continue
        items.pop(key, None)
        items[key] = value
    return Suboptions(tuple(items.items()))


def parse_mode(text: str, what: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise UsageError(f"{what}: mode {text!r} is not an octal number") from None
    if not 0 <= mode <= 0o777:
        raise UsageError(f"{what}: mode {text} is out of range")
    return mode


def parse_int(text: str, what: str, lo: int, hi: int) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise UsageError(f"{what}: {text!r} is not a number") from None
    if not lo <= value <= hi:
        raise UsageError(f"{what}: {value} is outside {lo}..{hi}")
    return value
