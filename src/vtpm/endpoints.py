"""Where a vTPM or the Manager listens, as typed values: `Endpoint` and `Frontend`.

Text forms (the command line, the Manager's records, the admin protocol):
- an endpoint is `unix:/path`, `tcp:PORT` (127.0.0.1), `tcp:HOST:PORT` (IPv6 in brackets) or
  `fd:N`: a listening stream socket (UNIX or TCP) this process inherited as descriptor N, bound
  by the process that started it (the front door), which owns its path;
- a frontend is `KIND=ENDPOINT` with KIND one of `ctrl` (the swtpm control channel, QEMU's
  `-tpmdev emulator`), `server` (raw TPM frames, tcti swtpm) or `mssim` (the Microsoft
  simulator protocol, TCP only; it uses PORT and PORT+1).
Parsing refuses anything else with a `ConfigError` naming the text; `str()` gives the text back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from vtpm.errors import ConfigError

EXPECTED = "expected unix:PATH, tcp:[HOST:]PORT or fd:N"
MAX_FD = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Endpoint:
    """`unix:/path`, `tcp:HOST:PORT` (or `tcp:PORT`, meaning 127.0.0.1) or `fd:N`."""

    kind: str
    path: str = ""
    host: str = ""
    port: int = 0
    fd: int = -1  # kind "fd": the inherited listening socket's descriptor

    def __post_init__(self) -> None:
        if self.kind not in ("unix", "tcp", "fd"):
            raise ConfigError(f"unknown socket kind {self.kind!r}")
        if self.kind == "tcp" and not 0 <= self.port <= 65535:
            raise ConfigError(f"TCP port {self.port} is out of range")
        if self.kind == "fd" and not 0 <= self.fd <= MAX_FD:
            raise ConfigError(f"descriptor {self.fd} is out of range")

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        kind, sep, rest = text.partition(":")
        if not sep or not rest:
            raise ConfigError(f"socket {text!r}: {EXPECTED}")
        if kind == "fd":
            if not rest.isascii() or not rest.isdigit():
                raise ConfigError(f"socket {text!r}: descriptor {rest!r} is not a number")
            return cls("fd", fd=int(rest))
        if kind == "unix":
            return cls("unix", path=rest)
        if kind == "tcp":
            host, sep, port = rest.rpartition(":")
            host = host.strip("[]") if sep else "127.0.0.1"
            try:
                return cls("tcp", host=host or "127.0.0.1", port=int(port))
            except ValueError:
                raise ConfigError(f"socket {text!r}: port {port!r} is not a number") from None
        raise ConfigError(f"socket {text!r}: {EXPECTED}")

    def with_port_offset(self, offset: int) -> Endpoint:
        if self.kind != "tcp":
            raise ConfigError("a port offset needs a TCP socket")
        return Endpoint("tcp", host=self.host, port=self.port + offset)

    def __str__(self) -> str:
        if self.kind == "fd":
            return f"fd:{self.fd}"
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


class FrontendKind(enum.StrEnum):
    CTRL = "ctrl"
    SERVER = "server"
    MSSIM = "mssim"


@dataclass(frozen=True, slots=True)
class Frontend:
    """One protocol served on one endpoint."""

    kind: FrontendKind
    endpoint: Endpoint

    def __post_init__(self) -> None:
        if self.kind is FrontendKind.MSSIM and self.endpoint.kind != "tcp":
            raise ConfigError(f"frontend {self}: the simulator protocol runs on TCP only")

    @classmethod
    def parse(cls, text: str) -> Frontend:
        kind, sep, where = text.partition("=")
        if not sep or kind not in FrontendKind.__members__.values():
            raise ConfigError(
                f"frontend {text[:200]!r}: expected KIND=SOCKET with KIND one of "
                f"{', '.join(FrontendKind)}"
            )
        return cls(FrontendKind(kind), Endpoint.parse(where))

    def __str__(self) -> str:
        return f"{self.kind}={self.endpoint}"

    def to_json(self) -> str:
        return str(self)

    @classmethod
    def from_json(cls, raw: object) -> Frontend:
        if not isinstance(raw, str):
            raise ConfigError("a frontend is a string KIND=SOCKET")
        return cls.parse(raw)
