"""xl-style guest configuration files (the Xen `xl.cfg` syntax), for `vtpm launch --config`.

Syntax (xl.cfg(5), libxlu's grammar): `KEY = VALUE` settings, one per line or separated by `;`;
`#` starts a comment; VALUE is a "double" or 'single' quoted string (backslash escapes \\\\,
\\", \\', \\n, \\t), a decimal or 0x number, or a [list, of, values] that may span lines and may
end with a comma. `KEY += VALUE` appends to a string or list. A key given twice keeps the last.

Keys used for a measured launch, as in Xen's pv-grub guests:

    kernel  = "/boot/vmlinuz"           the kernel (required)
    ramdisk = "/boot/initrd.img"        the initrd
    cmdline = "console=ttyS0 quiet"     the kernel command line; when absent, xl's older form
    root    = "/dev/vda1"               "root=<root> <extra>" is used
    extra   = "console=ttyS0"
    name    = "guest1"                  memory = 256 (MiB)          vcpus = 2
    vtpm    = ["backend=vtpmmgr,uuid=<vTPM uuid>"]   the guest's one vTPM (keys backend, uuid)

Relative file names are taken relative to the configuration file's directory. Other keys are
accepted and ignored (they configure things a vTPM launch does not measure); malformed syntax
is refused with the line number.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

from vtpm.errors import ConfigError
from vtpm.files import read_limited

MAX_CONFIG_BYTES = 1 << 20
VTPM_KEYS = frozenset({"backend", "uuid"})
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}
_TOKEN = re.compile(
    r"""(?P<space>[ \t\r]+)|(?P<comment>\#[^\n]*)|(?P<newline>\n)|(?P<semi>;)
      |(?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      |(?P<number>0[xX][0-9a-fA-F]+|[0-9]+)|(?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
      |(?P<op>\+=|=|\[|\]|,)""",
    re.VERBOSE,
)

Value: TypeAlias = str | int | list["Value"]


@dataclass(frozen=True, slots=True)
class GuestConfig:
    """What a measured launch takes from an xl guest configuration."""

    kernel: Path
    ramdisk: Path | None = None
    cmdline: str = ""
    name: str | None = None
    memory: int | None = None
    vcpus: int | None = None
    vtpm_uuid: uuid.UUID | None = None


def _tokens(text: str, where: str) -> Iterator[tuple[str, str, int]]:
    line, pos = 1, 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ConfigError(f"{where}:{line}: unexpected {text[pos]!r}")
        kind, value = m.lastgroup or "", m.group()
        pos = m.end()
        if kind == "newline":
            yield ("end", value, line)
            line += 1
        elif kind == "semi":
            yield ("end", value, line)
        elif kind not in ("space", "comment"):
            yield (kind, value, line)
    yield ("end", "", line)


def _unquote(token: str, where: str) -> str:
    out, body, i = [], token[1:-1], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            esc = body[i + 1]
            if esc not in _ESCAPES:
                raise ConfigError(f"{where}: unknown escape \\{esc} in a string")
            out.append(_ESCAPES[esc])
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


class _Parser:
    def __init__(self, text: str, where: str) -> None:
        self._toks = list(_tokens(text, where))
        self._i = 0
        self._where = where

    def _peek(self) -> tuple[str, str, int]:
        return self._toks[self._i]

    def _next(self) -> tuple[str, str, int]:
        tok = self._toks[self._i]
        self._i = min(self._i + 1, len(self._toks) - 1)
        return tok

    def _fail(self, line: int, what: str) -> ConfigError:
        return ConfigError(f"{self._where}:{line}: {what}")

    def settings(self) -> dict[str, Value]:
        out: dict[str, Value] = {}
        while self._i < len(self._toks) - 1:
            kind, text, line = self._next()
            if kind == "end":
                continue
            if kind != "ident":
                raise self._fail(line, f"expected a setting name, found {text!r}")
            _k, op, line = self._next()
            if op not in ("=", "+="):
                raise self._fail(line, f"expected = or += after {text}")
            value = self._value()
            if op == "+=" and text in out:
                out[text] = _append(out[text], value, self._fail(line, f"cannot += to {text}"))
            else:
                out[text] = value
            kind, rest, line = self._next()
            if kind != "end":
                raise self._fail(line, f"unexpected {rest!r} after the value of {text}")
        return out

    def _value(self) -> Value:
        kind, text, line = self._next()
        if kind == "string":
            return _unquote(text, f"{self._where}:{line}")
        if kind == "number":
            return int(text, 0)
        if text == "[":
            return self._list(line)
        raise self._fail(line, f"expected a value, found {text!r}")

    def _list(self, line: int) -> list[Value]:
        """After `[`: values separated by commas (a trailing one allowed), over any lines."""
        items: list[Value] = []
        while True:
            self._skip_newlines()
            kind, text, _at = self._peek()
            if text == "]":
                self._next()
                return items
            if kind == "end":
                raise self._fail(line, "a list is not closed with ]")
            items.append(self._value())
            self._skip_newlines()
            kind, text, at = self._next()
            if text == "]":
                return items
            if kind == "end":
                raise self._fail(line, "a list is not closed with ]")
            if text != ",":
                raise self._fail(at, f"expected , or ] in a list, found {text!r}")

    def _skip_newlines(self) -> None:
        while self._peek()[0] == "end" and self._peek()[1] == "\n":
            self._next()


def _append(old: Value, new: Value, err: ConfigError) -> Value:
    if isinstance(old, str) and isinstance(new, str):
        return old + new
    if isinstance(old, list) and isinstance(new, list):
        return old + new
    raise err


def parse(text: str, where: str = "<config>") -> dict[str, Value]:
    """The settings of an xl configuration text; ConfigError naming the line."""
    return _Parser(text, where).settings()


def _str(settings: dict[str, Value], key: str, where: str) -> str | None:
    value = settings.get(key)
    if value is None or isinstance(value, str):
        return value
    raise ConfigError(f"{where}: {key} must be a string")


def _int(settings: dict[str, Value], key: str, where: str) -> int | None:
    value = settings.get(key)
    if value is None or (isinstance(value, int) and value > 0):
        return value
    raise ConfigError(f"{where}: {key} must be a positive number")


def _vtpm(settings: dict[str, Value], where: str) -> uuid.UUID | None:
    specs = settings.get("vtpm")
    if specs is None:
        return None
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise ConfigError(f'{where}: vtpm must be a list of strings like ["uuid=..."]')
    if len(specs) != 1:
        raise ConfigError(f"{where}: a guest has exactly one vTPM, the config lists {len(specs)}")
    spec = str(specs[0])
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in VTPM_KEYS:
            raise ConfigError(f"{where}: vtpm entry {spec!r}: expected backend=... and uuid=...")
        fields[key.strip()] = value.strip()
    if "uuid" not in fields:
        raise ConfigError(f"{where}: vtpm entry {spec!r} names no uuid")
    try:
        return uuid.UUID(fields["uuid"])
    except ValueError:
        raise ConfigError(f"{where}: vtpm uuid {fields['uuid']!r} is not a uuid") from None


def load(path: Path) -> GuestConfig:
    """Read a guest configuration file."""
    data = read_limited(path, "guest config", MAX_CONFIG_BYTES)
    try:
        text = data.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"guest config {path} is not UTF-8") from None
    return from_settings(parse(text, str(path)), path.parent, str(path))


def from_settings(settings: dict[str, Value], base: Path, where: str) -> GuestConfig:
    kernel = _str(settings, "kernel", where)
    if not kernel:
        raise ConfigError(f"{where}: no kernel = ... setting")
    ramdisk = _str(settings, "ramdisk", where)
    cmdline = _str(settings, "cmdline", where)
    if cmdline is None:
        root, extra = _str(settings, "root", where), _str(settings, "extra", where) or ""
        cmdline = f"root={root} {extra}".rstrip() if root else extra
    return GuestConfig(
        kernel=base / kernel,
        ramdisk=base / ramdisk if ramdisk else None,
        cmdline=cmdline,
        name=_str(settings, "name", where),
        memory=_int(settings, "memory", where),
        vcpus=_int(settings, "vcpus", where),
        vtpm_uuid=_vtpm(settings, where),
    )
