"""Security labels (`user:role:type`, XSM/SELinux style) and the default label policy.

A label names who a peer is. The Manager treats SHA-256 of a vTPM's label as its "kernel hash":
a group lists the hashes it permits, and when a label's own hash is not listed the hash of the
same label with the user field replaced by `*` is tried (`*:vm_r:vtpm_t` admits every user).

Default rules (from the Xen vTPM design):
- the Manager accepts only peers of type `vtpm_t`;
- a vTPM accepts only guests of type `guest_t` or `hwdom_t` whose user field equals its own.

`*` is a pattern, never an identity: a label with the wildcard user is refused by both rules
and admitted by no group, and neither SO_PEERSEC nor the uid/gid map can produce one.

This module is the rule only (no sockets, no files), so the Manager and the verifier apply the
same one; where a peer's label comes from is `vtpm.labelpolicy`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from vtpm.errors import LabelError

WILDCARD = "*"
MAX_FIELD = 64

MANAGER_PEER_TYPES = frozenset({"vtpm_t"})
VTPM_PEER_TYPES = frozenset({"guest_t", "hwdom_t"})

_FIELD = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_FIELD}}}")
_CATS = r"c\d{1,4}(?:\.c\d{1,4})?(?:,c\d{1,4}(?:\.c\d{1,4})?)*"
_LEVEL = r"s\d{1,4}(?::" + _CATS + r")?"
_MLS = re.compile(_LEVEL + r"(?:-" + _LEVEL + r")?")


def _check_field(name: str, value: str, *, wildcard_ok: bool) -> None:
    if wildcard_ok and value == WILDCARD:
        return
    if not _FIELD.fullmatch(value):
        raise LabelError(
            f"label {name} {value!r} must be 1..{MAX_FIELD} characters of A-Z a-z 0-9 _ . -"
            + (" (or '*')" if wildcard_ok else "")
        )


@dataclass(frozen=True, slots=True)
class Label:
    """A security label `user:role:type`; the user may be the wildcard `*`."""

    user: str
    role: str
    type: str

    def __post_init__(self) -> None:
        _check_field("user", self.user, wildcard_ok=True)
        _check_field("role", self.role, wildcard_ok=False)
        _check_field("type", self.type, wildcard_ok=False)

    @classmethod
    def parse(cls, text: str) -> Label:
        """Exactly `user:role:type` (user may be `*`), or LabelError."""
        parts = text.split(":")
        if len(parts) != 3:
            raise LabelError(f"a label is user:role:type, not {text[:200]!r}")
        return cls(*parts)

    @classmethod
    def from_context(cls, text: str) -> Label:
        """A peer's SELinux context `user:role:type[:mls]`, its MLS field dropped.

        The wildcard user is refused: a context names one peer, never a pattern.
        """
        parts = text.split(":", 3)
        if len(parts) < 3:
            raise LabelError(f"a security context is user:role:type[:mls], not {text[:200]!r}")
        if len(parts) == 4 and not _MLS.fullmatch(parts[3]):
            raise LabelError(f"the MLS field of security context {text[:200]!r} is malformed")
        if parts[0] == WILDCARD:
            raise LabelError("a peer's security context cannot have the wildcard user '*'")
        return cls(parts[0], parts[1], parts[2])

    def __str__(self) -> str:
        return f"{self.user}:{self.role}:{self.type}"

    @property
    def is_wildcard(self) -> bool:
        return self.user == WILDCARD

    def digest(self) -> bytes:
        """SHA-256 of `user:role:type` (UTF-8): the label's "kernel hash"."""
        return hashlib.sha256(str(self).encode()).digest()

    def wildcard(self) -> Label:
        """The same label with the user field replaced by `*`."""
        return Label(WILDCARD, self.role, self.type)


def permitted_digests(entries: Iterable[str]) -> frozenset[bytes]:
    """The kernel hashes a group's label list permits: SHA-256 of each entry, every entry a
    label `user:role:type` (user may be `*`). LabelError for an entry that is not one."""
    return frozenset(Label.parse(text).digest() for text in entries)


def group_permits(label: Label, permitted: Collection[bytes]) -> bool:
    """Whether a group that permits the kernel hashes `permitted` admits `label`: its own hash
    is listed, or the hash of the label with its user replaced by `*` is. A wildcard label is
    a pattern, never a vTPM's identity, and is admitted by no group."""
    if label.is_wildcard:
        return False
    return label.digest() in permitted or label.wildcard().digest() in permitted


def manager_accepts(peer: Label) -> bool:
    """Default rule: the Manager serves only vTPM instances (type `vtpm_t`)."""
    return not peer.is_wildcard and peer.type in MANAGER_PEER_TYPES


def vtpm_accepts(peer: Label, vtpm: Label) -> bool:
    """Default rule: a vTPM serves only guests (`guest_t`, `hwdom_t`) of its own user."""
    return (
        not peer.is_wildcard
        and not vtpm.is_wildcard
        and peer.type in VTPM_PEER_TYPES
        and peer.user == vtpm.user
    )
