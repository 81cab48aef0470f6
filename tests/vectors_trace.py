"""Reader of the captured QEMU/SeaBIOS <-> swtpm trace in tests/vectors/ (captured bytes of
real peers: the codec tests decode these, they never come from our encoder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TRACE = Path(__file__).parent / "vectors" / "qemu-seabios-to-swtpm.trace"
_KINDS = {
    "Ctrl Cmd:": ("ctrl", "cmd"),
    "Ctrl Rsp:": ("ctrl", "rsp"),
    "SWTPM_IO_Read:": ("data", "cmd"),
    "SWTPM_IO_Write:": ("data", "rsp"),
}


@dataclass(frozen=True, slots=True)
class Record:
    channel: str  # "ctrl" or "data"
    direction: str  # "cmd" (to the TPM) or "rsp"
    data: bytes


def records() -> list[Record]:
    out: list[Record] = []
    current: tuple[str, str] | None = None
    buf = bytearray()
    for line in TRACE.read_text().splitlines():
        text = line.strip()
        kind = next((v for k, v in _KINDS.items() if text.startswith(k)), None)
        if kind is not None:
            if current is not None:
                out.append(Record(*current, bytes(buf)))
            current, buf = kind, bytearray()
        elif current is not None and text:
            buf += bytes.fromhex(text)
    if current is not None:
        out.append(Record(*current, bytes(buf)))
    return out


def select(channel: str, direction: str) -> list[bytes]:
    return [r.data for r in records() if r.channel == channel and r.direction == direction]


def splits(data: bytes) -> list[list[bytes]]:
    """Ways to cut `data` into reads: at every single point, and one byte at a time."""
    cuts = [[data[:i], data[i:]] for i in range(1, len(data))]
    return [*cuts, [data[i : i + 1] for i in range(len(data))]]
