"""A bounded big-endian reader for the TPM structures a verifier parses (TCG TPM 2.0 Library,
Part 1, 18: marshalling is big-endian, a TPM2B is a u16 size and that many bytes).

Every defect is one `VerifyError` naming the structure, the field and the offset; a size read
from the input is checked against the caller's maximum before it is used.
"""

from __future__ import annotations

from vtpm.errors import VerifyError


class Reader:
    """Reads `data` front to back; every defect is a VerifyError naming `what`."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        if not isinstance(data, bytes | bytearray | memoryview):
            raise VerifyError(f"{what}: expected bytes, not {type(data).__name__}")
        self._data = bytes(data)
        self._pos = 0
        self._what = what

    @property
    def pos(self) -> int:
        return self._pos

    def fail(self, message: str) -> VerifyError:
        return VerifyError(f"{self._what}: {message}")

    def take(self, n: int, field: str) -> bytes:
        if n > len(self._data) - self._pos:
            raise self.fail(f"truncated at offset {self._pos} reading {field}")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "big")

    def u64(self, field: str) -> int:
        return int.from_bytes(self.take(8, field), "big")

    def tpm2b(self, field: str, maximum: int) -> bytes:
        size = self.u16(f"{field}.size")
        if size > maximum:
            raise self.fail(f"{field} is {size} bytes; at most {maximum} are allowed")
        return self.take(size, field)

    def end(self) -> None:
        extra = len(self._data) - self._pos
        if extra:
            raise self.fail(f"{extra} bytes after the end of the structure")
