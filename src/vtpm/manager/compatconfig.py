"""The front door's configuration: `<data-dir>/compat.json`, written by `vtpm compat enable`.

Without the file the Manager opens no front door. With it, `vtpm manager run` listens on
`socket` for the swtpm-compatible executables (`vtpm.wire.compat`) and makes the vTPMs they ask
for in `group`, labelled from the orchestrator's VM name through `label_template`.

Who may use the front door: root always, and the uids in `allow_uids` (the orchestrator's
users, e.g. libvirt's `tss` or `libvirt-qemu`). The socket is 0600 to root, or 0660 to
`socket_gid` so that those users can reach it at all; each connection's SO_PEERCRED is then
checked against `allow_uids`. The vTPM's own listening sockets are the orchestrator's (it made
them with its permissions): that is the boundary for who talks to the TPM, not a label check.

The file is read once, when the Manager starts; a changed file takes effect at the next
`vtpm manager run`. Names (users, groups) are resolved to numbers when the file is written.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from vtpm import labels as lbl
from vtpm.errors import ConfigError, LabelError
from vtpm.files import read_limited, write_atomic
from vtpm.wire import compat

COMPAT_NAME = "compat.json"
DEFAULT_SOCKET = Path(compat.DEFAULT_SOCKET)
DEFAULT_TEMPLATE = "{name}_u:vm_r:vtpm_t"
NAME_MAX = 48  # of a VM name in a label's user field (MAX_FIELD 64 with the template's `_u`)
_HASH_CHARS = 10
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
FILE_LIMIT = 64 * 1024


def label_name(name: str) -> str:
    """A VM name as a label field: characters outside [A-Za-z0-9_.-] become `_`; a name
    longer than NAME_MAX is cut and ends in a short hash of the whole name (so two long
    names that share a beginning still differ)."""
    safe = _UNSAFE.sub("_", name) or "_"
    if len(safe) <= NAME_MAX:
        return safe
    digest = hashlib.sha256(name.encode()).hexdigest()[:_HASH_CHARS]
    return f"{safe[: NAME_MAX - _HASH_CHARS - 1]}-{digest}"


@dataclass(frozen=True, slots=True)
class CompatConfig:
    group: str  # name or uuid of the group the front door's vTPMs are made in
    socket: Path = DEFAULT_SOCKET
    socket_gid: int | None = None  # given: the socket is 0660 to this group
    allow_uids: tuple[int, ...] = ()  # besides root
    label_template: str = DEFAULT_TEMPLATE

    def __post_init__(self) -> None:
        if not self.group:
            raise ConfigError("compat: a group is needed")
        if not self.socket.is_absolute() or len(str(self.socket).encode()) > 107:
            raise ConfigError(f"compat: socket {self.socket} must be an absolute path <= 107 bytes")
        if "{name}" not in self.label_template:
            raise ConfigError("compat: the label template must contain {name}")
        try:
            self.label("x")
        except (LabelError, ValueError, KeyError, IndexError) as e:
            raise ConfigError(f"compat: label template {self.label_template!r}: {e}") from None

    def label(self, vm_name: str) -> str:
        """The label of the vTPM of VM `vm_name` (LabelError if the template makes none)."""
        text = self.label_template.format(name=label_name(vm_name))
        return str(lbl.Label.parse(text))

    def wildcard(self) -> lbl.Label:
        """The group rule that admits every label of the template (`*:role:type`)."""
        one = lbl.Label.parse(self.label("x"))
        return lbl.Label(lbl.WILDCARD, one.role, one.type)

    def uid_allowed(self, uid: int | None) -> bool:
        return uid is not None and (uid == 0 or uid in self.allow_uids)

    def to_json(self) -> dict[str, object]:
        return {
            "group": self.group,
            "socket": str(self.socket),
            "socket_gid": self.socket_gid,
            "allow_uids": list(self.allow_uids),
            "label_template": self.label_template,
        }

    def save(self, data_dir: Path) -> Path:
        path = data_dir / COMPAT_NAME
        try:
            write_atomic(path, (json.dumps(self.to_json(), indent=2) + "\n").encode(), 0o600)
        except OSError as e:
            raise ConfigError(f"cannot write {path}: {e.strerror}") from None
        return path

    @classmethod
    def load(cls, data_dir: Path) -> CompatConfig | None:
        """The configuration, or None when the data directory has none (no front door)."""
        path = data_dir / COMPAT_NAME
        if not path.exists():
            return None
        try:
            raw = json.loads(read_limited(path, "the front door's configuration", FILE_LIMIT))
        except ValueError as e:
            raise ConfigError(f"{path} is not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} is not a JSON object")
        unknown = set(raw) - {"group", "socket", "socket_gid", "allow_uids", "label_template"}
        if unknown:
            raise ConfigError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
        group, sock = raw.get("group"), raw.get("socket", str(DEFAULT_SOCKET))
        gid, uids = raw.get("socket_gid"), raw.get("allow_uids", [])
        template = raw.get("label_template", DEFAULT_TEMPLATE)
        if not isinstance(group, str) or not isinstance(sock, str):
            raise ConfigError(f"{path}: group and socket must be strings")
        if gid is not None and not _is_id(gid):
            raise ConfigError(f"{path}: socket_gid must be a gid")
        if not isinstance(uids, list) or not all(_is_id(u) for u in uids):
            raise ConfigError(f"{path}: allow_uids must be a list of uids")
        if not isinstance(template, str):
            raise ConfigError(f"{path}: label_template must be a string")
        return cls(group, Path(sock), gid, tuple(uids), template)


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**32 - 2
