"""The Manager IPC's JSON rules (AdminRequest / AdminReply bodies, see `vtpm.wire.ipc`).

Sent canonically: sorted keys, no blanks, UTF-8 rather than \\u escapes. Read leniently as to
layout, strictly as to content: no key twice in an object, no NaN or Infinity, integers within
MIN_JSON_INT..MAX_JSON_INT, containers nested at most MAX_JSON_DEPTH deep, strings that are
valid Unicode. `check_json` is the content rule for values we build (LocalProtocolError);
`load_object` reads peer bytes (RemoteProtocolError).
"""

from __future__ import annotations

import json
import math
from typing import Final, TypeAlias

from vtpm.errors import LocalProtocolError, RemoteProtocolError

MAX_JSON_DEPTH: Final = 32
MIN_JSON_INT: Final = -(2**63)
MAX_JSON_INT: Final = 2**64 - 1

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None


def check_text(what: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LocalProtocolError(f"{what} is not valid Unicode") from exc


def check_json(what: str, value: object) -> None:
    """Plain JSON data within the bounds, or LocalProtocolError. Iterative: depth is data."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        kind = type(item)
        if item is None or kind is bool:
            continue
        if isinstance(item, int) and kind is int:
            if not MIN_JSON_INT <= item <= MAX_JSON_INT:
                raise LocalProtocolError(f"{what}: integer {item} is out of range")
        elif isinstance(item, float) and kind is float:
            if not math.isfinite(item):
                raise LocalProtocolError(f"{what}: {item} is not a JSON number")
        elif isinstance(item, str) and kind is str:
            check_text(what, item)
        elif isinstance(item, list | dict) and kind in (list, dict):
            if depth >= MAX_JSON_DEPTH:
                raise LocalProtocolError(f"{what} is nested more than {MAX_JSON_DEPTH} deep")
            if isinstance(item, dict):
                for key, member in item.items():
                    if type(key) is not str:
                        raise LocalProtocolError(f"{what}: object key {key!r} is not a string")
                    check_text(what, key)
                    stack.append((member, depth + 1))
            else:
                stack.extend((member, depth + 1) for member in item)
        else:
            raise LocalProtocolError(f"{what}: {kind.__name__} is not JSON data")


def dump_json(what: str, obj: dict[str, JSONValue]) -> bytes:
    """The canonical UTF-8 bytes of `obj`; LocalProtocolError if it is not JSON data."""
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:  # args mutated after construction
        raise LocalProtocolError(f"{what} cannot be encoded as JSON: {exc}") from exc


# the json module's hooks: their ValueError never leaves `load_object`
def _no_constants(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("an object names a key twice")
    return obj


def load_object(body: bytes, what: str) -> dict[str, object]:
    """The JSON object in peer bytes; RemoteProtocolError if they are not one."""
    try:
        value = json.loads(
            body.decode("utf-8"), parse_constant=_no_constants, object_pairs_hook=_unique_keys
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise RemoteProtocolError(f"{what} is not UTF-8 JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} is not a JSON object")
    return value


def expect_keys(obj: dict[str, object], keys: set[str], what: str) -> None:
    if obj.keys() != keys:
        raise RemoteProtocolError(f"{what} has keys {sorted(obj)}, not {sorted(keys)}")
