"""Where a peer's label comes from, and the label policy file (the socket side of `vtpm.labels`).

On Linux: the kernel's SO_PEERSEC context where SELinux is on (its MLS field is dropped);
otherwise the uid -> label, then gid -> label map of the policy file (SO_PEERCRED); otherwise
the peer is unlabelled and the policy file's `unlabeled` setting decides. A context that is not
SELinux-style (AppArmor's `unconfined` or a profile name, a Smack label) carries no
user:role:type, so the map decides for it as well.

The policy file is TOML: `unlabeled = "refuse" | "allow"`, `[uid]` and `[gid]` tables of
id = "user:role:type". The rules a label is judged by are `vtpm.labels`.
"""

from __future__ import annotations

import errno
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Literal

from vtpm.errors import ConfigError, LabelError
from vtpm.labels import Label, manager_accepts, vtpm_accepts
from vtpm.listen import MAX_ID, peer_credentials

# SO_PEERSEC is 31 on every Linux architecture; older Pythons do not export the name.
SO_PEERSEC: int = getattr(socket, "SO_PEERSEC", 31)
# Python's getsockopt refuses larger buffers; a longer context is refused (LabelError).
PEERSEC_BUFSIZE = 1024

Unlabeled = Literal["refuse", "allow"]


@dataclass(frozen=True, slots=True)
class LabelMap:
    """Labels for peers the kernel does not label: by uid first, then by gid."""

    uid: Mapping[int, Label] = field(default_factory=dict, hash=False)
    gid: Mapping[int, Label] = field(default_factory=dict, hash=False)
    unlabeled: Unlabeled = "refuse"

    def __post_init__(self) -> None:
        if self.unlabeled not in ("refuse", "allow"):
            raise ConfigError(f"unlabeled must be 'refuse' or 'allow', not {self.unlabeled!r}")
        for kind, table in (("uid", self.uid), ("gid", self.gid)):
            for key, label in table.items():
                if type(key) is not int or not 0 <= key <= MAX_ID:
                    raise ConfigError(f"{kind} {key!r} is not an id in 0..{MAX_ID}")
                if label.is_wildcard:
                    raise ConfigError(f"{kind} {key}: a peer's label cannot have the user '*'")
        # read-only copies, so a caller's dict cannot change a frozen policy
        object.__setattr__(self, "uid", MappingProxyType(dict(self.uid)))
        object.__setattr__(self, "gid", MappingProxyType(dict(self.gid)))

    @classmethod
    def empty(cls) -> LabelMap:
        """No entries; unlabelled peers allowed (a host without a label policy)."""
        return cls(unlabeled="allow")

    @classmethod
    def load(cls, path: Path) -> LabelMap:
        """Read a TOML policy file; ConfigError naming the file and the problem."""
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ConfigError(f"cannot read label policy {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"label policy {path} is not valid TOML: {e}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"label policy {path} is not UTF-8") from None
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"label policy {path}: {e}") from None

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> LabelMap:
        """Build from parsed TOML: `unlabeled`, `[uid]`, `[gid]` and nothing else."""
        unknown = sorted(set(raw) - {"unlabeled", "uid", "gid"})
        if unknown:
            raise ConfigError(f"unknown setting(s): {', '.join(unknown)}")
        unlabeled = raw.get("unlabeled", "refuse")
        if unlabeled not in ("refuse", "allow"):
            raise ConfigError(f"unlabeled must be 'refuse' or 'allow', not {unlabeled!r}")
        tables = {kind: _id_table(kind, raw.get(kind, {})) for kind in ("uid", "gid")}
        return cls(uid=tables["uid"], gid=tables["gid"], unlabeled=unlabeled)

    def label_for(self, uid: int, gid: int) -> Label | None:
        """The label mapped to `uid`, else to `gid`, else None."""
        found = self.uid.get(uid)
        return found if found is not None else self.gid.get(gid)


def _id_table(kind: str, raw: object) -> dict[int, Label]:
    if not isinstance(raw, dict):
        raise ConfigError(f'[{kind}] must be a table of {kind} = "user:role:type"')
    out: dict[int, Label] = {}
    for key, value in raw.items():
        if not (key.isascii() and key.isdigit()) or int(key) > MAX_ID:
            raise ConfigError(f"[{kind}] key {key!r} is not a numeric {kind} in 0..{MAX_ID}")
        if not isinstance(value, str):
            raise ConfigError(f'[{kind}] {key}: the label must be a string "user:role:type"')
        try:
            label = Label.parse(value)
        except LabelError as e:
            raise ConfigError(f"[{kind}] {key}: {e}") from None
        if label.is_wildcard:
            raise ConfigError(f"[{kind}] {key}: a peer's label cannot have the user '*'")
        if int(key) in out:
            raise ConfigError(f"[{kind}] lists {int(key)} twice")
        out[int(key)] = label
    return out


def peer_context(sock: socket.socket) -> str | None:
    """The kernel's security context for the peer of `sock` (SO_PEERSEC), or None when the
    kernel has no LSM label for it. LabelError when the context cannot be read."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERSEC, PEERSEC_BUFSIZE)
    except OSError as e:
        if e.errno == errno.ENOPROTOOPT:
            return None
        raise LabelError(f"cannot read the peer's security context: {e.strerror}") from None
    try:
        text = raw.rstrip(b"\0").decode("utf-8")
    except UnicodeDecodeError:
        raise LabelError("the peer's security context is not UTF-8") from None
    if not text or text == "unlabeled":
        return None
    return text


def resolve_peer(sock: socket.socket, labels: LabelMap) -> Label | None:
    """The peer's label: its SELinux context, else the map by uid then gid, else None."""
    context = peer_context(sock)
    if context is not None and ":" in context:
        return Label.from_context(context)
    creds = peer_credentials(sock)
    if creds is None or creds.uid is None or creds.gid is None:
        return None
    return labels.label_for(creds.uid, creds.gid)


def _check(allowed: bool) -> None:
    if not allowed:
        raise LabelError("peer refused by the label policy")


def check_vtpm_peer(peer: Label | None, vtpm: Label, labels: LabelMap) -> None:
    """LabelError unless the vTPM labelled `vtpm` may serve `peer`."""
    _check(labels.unlabeled == "allow" if peer is None else vtpm_accepts(peer, vtpm))


def check_manager_peer(peer: Label | None, labels: LabelMap) -> None:
    """LabelError unless the Manager may serve `peer`."""
    _check(labels.unlabeled == "allow" if peer is None else manager_accepts(peer))
