"""A verification's result: every check by id, passed or failed, with its reason."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Check:
    id: str  # stable, dotted: "quote.signature", "deep.merkle_path", "eventlog.replay" ...
    ok: bool
    reason: str = ""

    def to_json(self) -> dict[str, object]:
        return {"id": self.id, "ok": self.ok, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Verdict:
    checks: tuple[Check, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def failed_ids(self) -> set[str]:
        return {c.id for c in self.checks if not c.ok}

    def plus(self, more: Iterable[Check]) -> Verdict:
        return Verdict((*self.checks, *more))

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "checks": [c.to_json() for c in self.checks]}
