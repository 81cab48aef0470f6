"""`swtpm_ioctl`: one client of the swtpm control channel (`vtpm.wire.ctrl`), for any vTPM.

`--unix PATH` or `--tcp [HOST]:[PORT]` (default 127.0.0.1:6546) and one command: `-c`
capabilities, `-i` init, `--stop`, `-s` shutdown, `-e` tpmEstablished, `-r LOC` reset it, `-v`
store volatile state, `-C` cancel, `-l LOC` locality, `-h DATA` hash (`-` = stdin), `-g`
configuration flags, `-b SIZE` buffer size, `--info FLAGS`, `--save TYPE FILE` / `--load TYPE
FILE` (TYPE permanent, volatile or savestate). Exit code 0 when the TPM answered success, 1
otherwise (the result code is printed).
"""

from __future__ import annotations

import enum
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vtpm.compat.capabilities import about
from vtpm.compat.options import Kind, Spec, Treat, UsageError, parse, parse_int
from vtpm.errors import VtpmError
from vtpm.wire import ctrl
from vtpm.wire._common import CLOSED, NEED_DATA, Sentinel

PROGRAM = "swtpm_ioctl"
DEFAULT_TCP = ("127.0.0.1", 6546)
TIMEOUT = 60.0
BLOB_TYPES = {
    "permanent": ctrl.StateBlobType.PERMANENT,
    "volatile": ctrl.StateBlobType.VOLATILE,
    "savestate": ctrl.StateBlobType.SAVESTATE,
}


class Op(enum.StrEnum):
    CAPABILITY = "-c"
    INIT = "-i"
    STOP = "--stop"
    SHUTDOWN = "-s"
    ESTABLISHED = "-e"
    RESET_ESTABLISHED = "-r"
    STORE_VOLATILE = "-v"
    CANCEL = "-C"
    LOCALITY = "-l"
    HASH = "-h"
    CONFIG = "-g"
    BUFFER_SIZE = "-b"
    INFO = "--info"
    SAVE = "--save"
    LOAD = "--load"
    VERSION = "--version"
    HELP = "--help"


@dataclass(frozen=True, slots=True)
class IoctlArgs:
    op: Op
    value: str = ""  # the command's argument ("TYPE FILE" for --save / --load)
    unix: str | None = None
    tcp: tuple[str, int] | None = None


_VALUED = {Op.RESET_ESTABLISHED, Op.LOCALITY, Op.HASH, Op.BUFFER_SIZE, Op.INFO}
SPECS = (
    Spec(("--unix",), Kind.VALUE),
    Spec(("--tcp",), Kind.VALUE),
    Spec(
        ("--tpm-device",),
        Kind.VALUE,
        Treat.REFUSED,
        "character devices are not supported; use --unix or --tcp",
    ),
    *(
        Spec(
            (op.value,),
            Kind.PAIR if op in (Op.SAVE, Op.LOAD) else Kind.VALUE if op in _VALUED else Kind.FLAG,
        )
        for op in Op
    ),
)


def _tcp(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, ""
    return (
        host.strip("[]") or DEFAULT_TCP[0],
        parse_int(port, "--tcp port", 1, 65535) if port else DEFAULT_TCP[1],
    )


def parse_ioctl_args(argv: Sequence[str]) -> IoctlArgs:
    p = parse(argv, SPECS)
    if p.has("--help"):
        return IoctlArgs(Op.HELP)
    if p.has("--version"):
        return IoctlArgs(Op.VERSION)
    ops = [op for op in Op if p.has(op.value)]
    if len(ops) != 1:
        raise UsageError(
            "give exactly one command (see --help)"
            if not ops
            else f"one command at a time, not {' and '.join(ops)}"
        )
    unix, tcp = p.last("--unix"), p.last("--tcp")
    if p.positional:
        raise UsageError(
            f"{p.positional[0]}: character devices are not supported; "
            "use --unix PATH or --tcp HOST:PORT"
        )
    if (unix is None) == (tcp is None):
        raise UsageError("give --unix PATH or --tcp [HOST]:[PORT]")
    return IoctlArgs(
        ops[0], p.last(ops[0].value) or "", unix, _tcp(tcp) if tcp is not None else None
    )


class Channel:
    """One control-channel connection; `call` sends a request and returns its answer."""

    def __init__(self, args: IoctlArgs) -> None:
        if args.unix is not None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            where: str | tuple[str, int] = args.unix
        else:
            assert args.tcp is not None
            family = socket.AF_INET6 if ":" in args.tcp[0] else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            where = args.tcp
        self.sock.settimeout(TIMEOUT)
        try:
            self.sock.connect(where)
        except OSError as e:
            self.sock.close()
            raise UsageError(f"cannot connect to {where}: {e.strerror or e}") from None
        self.codec = ctrl.ControlClientConnection()

    def call(self, request: ctrl.Request) -> ctrl.Response:
        self.sock.sendall(self.codec.send(request))
        while True:
            ev = self.codec.next_event()
            if ev is NEED_DATA:
                data = self.sock.recv(65536)
                if not data:
                    raise UsageError("the TPM closed the control channel without answering")
                self.codec.receive_data(data)
                continue
            if ev is CLOSED:
                raise UsageError("the TPM closed the control channel without answering")
            assert not isinstance(ev, Sentinel)
            return ev

    def close(self) -> None:
        self.sock.close()


def _locality(text: str) -> int:
    return parse_int(text, "locality", 0, 4)


def _simple(op: Op, value: str) -> ctrl.Request:
    requests: dict[Op, Callable[[], ctrl.Request]] = {
        Op.CAPABILITY: ctrl.GetCapability,
        Op.INIT: lambda: ctrl.Init(0),
        Op.STOP: ctrl.Stop,
        Op.SHUTDOWN: ctrl.Shutdown,
        Op.ESTABLISHED: ctrl.GetTpmEstablished,
        Op.RESET_ESTABLISHED: lambda: ctrl.ResetTpmEstablished(_locality(value)),
        Op.STORE_VOLATILE: ctrl.StoreVolatile,
        Op.CANCEL: ctrl.CancelTpmCmd,
        Op.LOCALITY: lambda: ctrl.SetLocality(_locality(value)),
        Op.CONFIG: ctrl.GetConfig,
        Op.BUFFER_SIZE: lambda: ctrl.SetBufferSize(parse_int(value, "-b", 0, 2**32 - 1)),
        Op.INFO: lambda: ctrl.GetInfo(parse_int(value, "--info", 0, 2**64 - 1)),
    }
    return requests[op]()


def _describe(resp: ctrl.Response) -> str:
    match resp:
        case ctrl.CapabilityResult(caps=caps):
            return f"capabilities: {caps:#010x}"
        case ctrl.EstablishedResult(established=est):
            return f"tpmEstablished: {int(est)}"
        case ctrl.ConfigResult(flags=flags):
            return f"configuration flags: {flags:#x}"
        case ctrl.BufferSizeResult(size=size, minimum=lo, maximum=hi):
            return f"buffer size: {size} (minimum {lo}, maximum {hi})"
        case ctrl.InfoResult(data=data):
            return data.rstrip(b"\0").decode("utf-8", "replace")
    return ""


def _hash(ch: Channel, value: str) -> ctrl.Response:
    data = sys.stdin.buffer.read() if value == "-" else value.encode()
    first = ch.call(ctrl.HashStart())
    if first.result:
        return first
    for i in range(0, len(data), ctrl.MAX_HASH_DATA):
        got = ch.call(ctrl.HashData(data[i : i + ctrl.MAX_HASH_DATA]))
        if got.result:
            return got
    return ch.call(ctrl.HashEnd())


def _blob(value: str) -> tuple[int, str]:
    kind, _, path = value.partition(" ")
    if kind not in BLOB_TYPES:
        raise UsageError(f"blob type {kind!r}: one of {', '.join(BLOB_TYPES)}")
    return BLOB_TYPES[kind], path


def _save(ch: Channel, value: str) -> ctrl.Response:
    kind, path = _blob(value)
    data = b""
    while True:
        got = ch.call(ctrl.GetStateBlob(0, kind, len(data)))
        if got.result or not isinstance(got, ctrl.StateBlobResult):
            return got
        data += got.data
        if len(data) >= got.total_length or not got.data:
            break
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return got


def _load(ch: Channel, value: str) -> ctrl.Response:
    kind, path = _blob(value)
    with open(path, "rb") as f:
        data = f.read()
    return ch.call(ctrl.SetStateBlob(0, kind, data))


def ioctl(args: IoctlArgs) -> tuple[int, str]:
    """Run the command; (exit code, what to print)."""
    ch = Channel(args)
    try:
        if args.op is Op.HASH:
            resp = _hash(ch, args.value)
        elif args.op is Op.SAVE:
            resp = _save(ch, args.value)
        elif args.op is Op.LOAD:
            resp = _load(ch, args.value)
        else:
            resp = ch.call(_simple(args.op, args.value))
    finally:
        ch.close()
    if resp.result != 0:
        return 1, f"{args.op.value}: the TPM answered result {resp.result:#x}"
    return 0, _describe(resp)


HELP = """\
usage: swtpm_ioctl --unix PATH | --tcp [HOST]:[PORT] COMMAND

vtpm's swtpm_ioctl: one request on a vTPM's control channel.
  -c                  the control channel's capabilities
  -i                  initialise the TPM (resumes saved volatile state)
  --stop              stop the TPM, keep the process
  -s                  shut the TPM down (it stores its state and the process exits)
  -e                  the tpmEstablished bit;   -r LOC   reset it from locality LOC
  -v                  store the volatile state; -C       cancel the running command
  -l LOC              set the locality (0-4)
  -h DATA             hash DATA ('-': standard input)
  -g                  configuration flags;      -b SIZE  set (0: query) the buffer size
  --info FLAGS        implementation information (JSON)
  --save TYPE FILE    write a state blob (permanent, volatile, savestate) to FILE (sealed)
  --load TYPE FILE    load a state blob from FILE
  --version  --help
Exit code 0 when the TPM answered success, 1 otherwise.
"""


def run(argv: list[str], out: Callable[[str], None]) -> int:
    try:
        args = parse_ioctl_args(argv)
        if args.op in (Op.HELP, Op.VERSION):
            about("help" if args.op is Op.HELP else "version", "swtpm_ioctl-compatible", HELP)
            return 0
        code, text = ioctl(args)
    except (UsageError, VtpmError, OSError) as e:
        out(f"{PROGRAM}: error: {getattr(e, 'strerror', None) or e}")
        return 1
    if text:
        (print if code == 0 else out)(text)
    return code


def main() -> int:
    """The `swtpm_ioctl` executable of the compat directory."""

    def out(line: str) -> None:
        sys.stderr.write(line + "\n")

    try:
        return run(sys.argv[1:], out)
    except KeyboardInterrupt:
        return 130
