"""Frozen dataclasses to JSON and back, driven by their type annotations (no I/O).

The admin protocol (`vtpm.wire.admin`) states each request and result once, as a dataclass; this
module is the one place that turns such a value into the JSON carried by `AdminRequest` /
`AdminReply` and checks JSON from a peer against the annotations on the way back. A field's
annotation decides its form:

  str, bool, float          themselves (a bool is never an int, an int may stand for a float)
  int                       a JSON integer; `Annotated[int, Bounds(lo, hi)]` bounds it
  bytes                     lowercase hex
  uuid.UUID                 its canonical text
  enum (str or int values)  its value
  tuple[X, ...]             a list; dict[str, X] an object
  X | None                  null or X
  a dataclass               an object with exactly its field names (fields with defaults may
                            be left out)
  a class with `to_json()` and a classmethod `from_json(raw)`: whatever those say
  Document                  any JSON value, passed through (a document another module parses)

Decoding raises `DecodeError` naming the path of the offending value (`args.frontends[1]`);
the caller turns it into the error of its side (a bad request, or a Manager that answered
outside the protocol). Encoding trusts its input: it was built through the same types.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from vtpm.errors import VtpmError
from vtpm.wire.ipc_json import JSONValue

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Bounds:
    """`Annotated[int, Bounds(lo, hi)]`: an integer in lo..hi."""

    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class _PassThrough:
    """Marks a value that is any JSON, checked by whoever reads it."""


Document = Annotated[JSONValue, _PassThrough()]


class DecodeError(VtpmError):
    """A JSON value does not have the form its annotation asks for."""


def encode(value: object) -> JSONValue:
    """The JSON form of `value` (a dataclass, or any form listed above)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value.value if isinstance(value, enum.Enum) else value
    if isinstance(value, enum.Enum):
        out: JSONValue = value.value
        return out
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, tuple | list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    to_json = getattr(value, "to_json", None)
    if to_json is not None:
        return typing.cast("JSONValue", to_json())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def decode(raw: object, tp: type[T], where: str) -> T:
    """`raw` (parsed JSON) as a value of `tp`; DecodeError naming `where` when it is not."""
    return typing.cast("T", _decode(raw, tp, where))


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        # JSONValue refers to itself by name: let that name resolve wherever it is used
        hints = typing.get_type_hints(cls, localns={"JSONValue": JSONValue}, include_extras=True)
        _HINTS[cls] = hints
    return hints


def _fail(where: str, what: str) -> DecodeError:
    return DecodeError(f"{where}: {what}")


def _decode(raw: object, tp: Any, where: str) -> object:
    if tp is Any:
        return raw
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(tp)
        if any(isinstance(m, _PassThrough) for m in meta):
            return raw
        value = _decode(raw, base, where)
        for m in meta:
            if isinstance(m, Bounds) and isinstance(value, int) and not m.lo <= value <= m.hi:
                raise _fail(where, f"{value} is outside {m.lo}..{m.hi}")
        return value
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(tp)
        if raw is None and type(None) in options:
            return None
        rest = [o for o in options if o is not type(None)]
        if len(rest) == 1:
            return _decode(raw, rest[0], where)
        raise _fail(where, "ambiguous union in the protocol's types")  # not used by the types
    if origin is tuple:
        item, _dots = typing.get_args(tp)
        if not isinstance(raw, list):
            raise _fail(where, "expected a list")
        return tuple(_decode(v, item, f"{where}[{i}]") for i, v in enumerate(raw))
    if origin is dict:
        _key, item = typing.get_args(tp)
        if not isinstance(raw, dict):
            raise _fail(where, "expected an object")
        return {str(k): _decode(v, item, f"{where}.{k}") for k, v in raw.items()}
    if tp is type(None):
        if raw is not None:
            raise _fail(where, "expected null")
        return None
    if not isinstance(tp, type):
        raise _fail(where, f"no JSON form for {tp!r}")
    return _decode_class(raw, tp, where)


_SCALARS: dict[type, Callable[[object], bool]] = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _decode_class(raw: object, tp: type, where: str) -> object:
    if issubclass(tp, enum.Enum):
        try:
            return tp(raw)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in tp)
            raise _fail(where, f"{raw!r} is not one of {allowed}") from None
    check = _SCALARS.get(tp)
    if check is not None:
        if not check(raw):
            raise _fail(where, f"expected {'a number' if tp is float else tp.__name__}")
        return float(typing.cast("float", raw)) if tp is float else raw
    if tp is bytes:
        if not isinstance(raw, str):
            raise _fail(where, "expected hex")
        try:
            return bytes.fromhex(raw)
        except ValueError:
            raise _fail(where, "expected hex") from None
    if tp is uuid.UUID:
        if isinstance(raw, str):
            try:
                return uuid.UUID(raw)
            except ValueError:
                pass
        raise _fail(where, f"{str(raw)[:80]!r} is not a uuid")
    from_json = getattr(tp, "from_json", None)
    if from_json is not None:
        try:
            return from_json(raw)
        except VtpmError as e:
            raise _fail(where, str(e)) from None
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(raw, tp, where)
    raise _fail(where, f"no JSON form for {tp.__name__}")


def _decode_dataclass(raw: object, tp: type, where: str) -> object:
    if not isinstance(raw, dict):
        raise _fail(where, "expected an object")
    fields = {f.name: f for f in dataclasses.fields(tp)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise _fail(where, f"unknown field(s) {', '.join(unknown)}")
    hints = _hints(tp)
    values: dict[str, object] = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _decode(raw[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _fail(where, f"missing field {name}")
    try:
        return tp(**values)
    except VtpmError as e:  # the type's own checks
        raise _fail(where, str(e)) from None
