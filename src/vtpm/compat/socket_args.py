"""`swtpm socket` / `swtpm chardev`: the command line, as a frozen `SocketArgs`.

What orchestrators pass (all of it is parsed here): libvirt `--ctrl type=unixio,path=S,mode=0600
--tpmstate dir=D,mode=0600 --log file=L --terminate --tpm2 [--key pwdfd=N,mode=aes-256-cbc]
[--migration-key pwdfd=M,...] [--migration release-lock-outgoing|incoming]`; Proxmox
`--tpmstate backend-uri=file://V,mode=0600 --pid file=P --daemon --log file=L,level=1,prefix=S`;
Incus `--ctrl type=unixio,path=RELATIVE`; LXD `--ctrl type=unixio,fd=3`; the tpm2-tools harness
`--server port=P --ctrl type=tcp,port=P+1 --flags not-need-init[,startup-clear] [--seccomp ...]`.

Standard library only (parsed before the sockets are bound).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass

from vtpm.compat.options import (
    Kind,
    Parsed,
    Spec,
    Suboptions,
    Treat,
    UsageError,
    parse,
    parse_int,
    parse_mode,
    suboptions,
)

PROGRAM = "swtpm"
DEFAULT_HOST = "127.0.0.1"


class Action(enum.StrEnum):
    RUN = "run"
    VERSION = "version"
    HELP = "help"
    CAPABILITIES = "capabilities"


class ListenKind(enum.StrEnum):
    UNIX = "unixio"
    TCP = "tcp"
    FD = "fd"  # an inherited listening socket, UNIX or TCP


@dataclass(frozen=True, slots=True)
class Listen:
    kind: ListenKind
    path: str = ""  # UNIX: as given (relative to the working directory if relative)
    mode: int = 0o600
    uid: int | None = None
    gid: int | None = None
    host: str = DEFAULT_HOST
    port: int = 0
    fd: int = -1


@dataclass(frozen=True, slots=True)
class StateArg:
    kind: str  # "dir" or "file": the values of `vtpm.wire.compat.StateKind`
    path: str  # absolute
    mode: int = 0o600  # of a state file created here


@dataclass(frozen=True, slots=True)
class SecretSource:
    """Where a passphrase or key comes from: an inherited fd or a file (maybe removed after)."""

    fd: int = -1
    path: str = ""
    remove: bool = False


@dataclass(frozen=True, slots=True)
class LogArg:
    path: str = ""
    fd: int = -1
    level: int = 1
    prefix: str = ""
    truncate: bool = False


@dataclass(frozen=True, slots=True)
class PidArg:
    path: str = ""
    fd: int = -1


@dataclass(frozen=True, slots=True)
class SocketArgs:
    action: Action
    state: StateArg | None = None
    ctrl: Listen | None = None
    server: Listen | None = None
    terminate: bool = False
    startup_clear: bool = False
    daemon: bool = False
    pid: PidArg | None = None
    log: LogArg | None = None
    key: SecretSource | None = None
    migration_key: SecretSource | None = None
    incoming: bool = False
    release_lock_outgoing: bool = False
    runas: str | None = None
    notes: tuple[str, ...] = ()  # ignored options, for the log


_V = Kind.VALUE
SPECS = (
    Spec(("--tpm2",)),
    Spec(("--tpmstate",), _V),
    Spec(("--ctrl",), _V),
    Spec(("--server",), _V),
    Spec(("--port", "-p"), _V),
    Spec(("--fd",), _V),
    Spec(("--pid",), _V),
    Spec(("--log",), _V),
    Spec(("--key",), _V),
    Spec(("--migration-key",), _V),
    Spec(("--migration",), _V),
    Spec(("--flags",), _V),
    Spec(("--terminate", "-t")),
    Spec(("--daemon", "-d")),
    Spec(("--runas", "-r"), _V),
    Spec(("--print-capabilities",)),
    Spec(("--version", "-v")),
    Spec(("--help", "-h")),
    Spec(("--vtpm-proxy",)),
    Spec(
        ("--seccomp",),
        _V,
        Treat.IGNORED,
        "this process runs no TPM code (the vTPM is the Manager's instance process)",
    ),
    Spec(
        ("--locality",),
        _V,
        Treat.IGNORED,
        "localities are the vTPM instance's (it answers SET_LOCALITY and rejects nothing)",
    ),
    Spec(("--chroot",), _V, Treat.REFUSED, "not supported (the vTPM runs in the Manager)"),
    Spec(("--print-states",), Kind.FLAG, Treat.REFUSED, "not supported: state blobs are sealed"),
    Spec(("--print-profiles",), Kind.FLAG, Treat.REFUSED, "TPM profiles are not supported"),
    Spec(("--profile",), _V, Treat.REFUSED, "TPM profiles are not supported"),
    Spec(("--pcap",), _V, Treat.REFUSED, "packet capture is not supported"),
    Spec(("--dev",), _V, Treat.REFUSED, "character devices are not supported"),
)

_LISTEN_KEYS = ("type", "path", "port", "bindaddr", "ifname", "fd", "mode", "uid", "gid")
_REFUSED_LISTEN = {"clientfd": "a connected client socket is not supported; pass fd= (listening)"}


def _listen(text: str, option: str, default_type: str, notes: list[str]) -> Listen:
    extra = ("terminate",) if option == "--ctrl" else ("disconnect",)
    sub = suboptions(text, option, _LISTEN_KEYS + extra, refused=_REFUSED_LISTEN, notes=notes)
    if sub.has("disconnect"):
        notes.append(f"{option}: disconnect ignored (each client keeps its connection)")
    kind = sub.get("type") or default_type
    mode = parse_mode(sub.get("mode") or "0600", option)
    if mode & 0o007:
        raise UsageError(f"{option}: mode {mode:o} lets every user connect; use 0600 or 0660")
    uid = _opt_id(sub, "uid", option)
    gid = _opt_id(sub, "gid", option)
    fd = sub.get("fd")
    if fd is not None:
        return Listen(ListenKind.FD, fd=parse_int(fd, f"{option} fd", 0, 1 << 20))
    if kind == "unixio":
        path = sub.get("path")
        if not path:
            raise UsageError(f"{option}: type=unixio needs path= or fd=")
        return Listen(ListenKind.UNIX, path=path, mode=mode, uid=uid, gid=gid)
    if kind == "tcp":
        port = sub.get("port")
        if port is None:
            raise UsageError(f"{option}: type=tcp needs port= or fd=")
        host = sub.get("bindaddr") or DEFAULT_HOST
        return Listen(
            ListenKind.TCP, host=host.strip("[]"), port=parse_int(port, f"{option} port", 0, 65535)
        )
    raise UsageError(f"{option}: type={kind} is not supported (unixio or tcp)")


def _opt_id(sub: Suboptions, key: str, option: str) -> int | None:
    value = sub.get(key)
    return None if value is None else parse_int(value, f"{option} {key}", 0, 2**32 - 2)


def _state(text: str, notes: list[str]) -> StateArg:
    sub = suboptions(
        text, "--tpmstate", ("dir", "backend-uri", "mode", "lock", "backup", "fsync"), notes=notes
    )
    for key in ("lock", "backup", "fsync"):
        if sub.has(key):
            notes.append(f"--tpmstate {key}: always so here (locked, written atomically, synced)")
    mode = parse_mode(sub.get("mode") or "0600", "--tpmstate")
    uri = sub.get("backend-uri")
    directory = sub.get("dir")
    if directory is not None and uri is not None:
        raise UsageError("--tpmstate: give dir= or backend-uri=, not both")
    if directory is not None:
        return StateArg("dir", _absolute(directory, "--tpmstate dir"), mode)
    if uri is None:
        raise UsageError("--tpmstate needs dir= or backend-uri=")
    return state_uri(uri, "--tpmstate backend-uri", mode)


def state_uri(uri: str, what: str, mode: int = 0o600) -> StateArg:
    """`dir://D`, `file://F` (or a plain directory path) as a state location."""
    for scheme, kind in (("dir://", "dir"), ("file://", "file")):
        if uri.startswith(scheme):
            return StateArg(kind, _absolute(uri[len(scheme) :], what), mode)
    if "://" in uri:
        raise UsageError(
            f"{what}: {uri.partition('://')[0]}:// is not supported (dir:// or file://)"
        )
    return StateArg("dir", _absolute(uri, what), mode)


def _absolute(path: str, what: str) -> str:
    if not path:
        raise UsageError(f"{what}: the path is empty")
    return os.path.abspath(path)


def secret_source(text: str, option: str, notes: list[str]) -> SecretSource:
    keys = ("file", "fd", "pwdfile", "pwdfd", "format", "mode", "remove", "kdf")
    sub = suboptions(text, option, keys, notes=notes)
    mode = sub.get("mode")
    if mode is not None and mode not in ("aes-cbc", "aes-128-cbc", "aes-256-cbc"):
        raise UsageError(f"{option}: mode={mode} is not supported (aes-128-cbc or aes-256-cbc)")
    given = [k for k in ("file", "fd", "pwdfile", "pwdfd") if sub.has(k)]
    if len(given) != 1:
        raise UsageError(f"{option}: give exactly one of file=, fd=, pwdfile=, pwdfd=")
    value = sub.get(given[0]) or ""
    remove = sub.get("remove") in ("", "true")
    if given[0] in ("fd", "pwdfd"):
        return SecretSource(fd=parse_int(value, f"{option} {given[0]}", 0, 1 << 20))
    if not value:
        raise UsageError(f"{option}: {given[0]}= needs a file name")
    return SecretSource(path=value, remove=remove)


def _log(text: str, notes: list[str]) -> LogArg:
    sub = suboptions(text, "--log", ("file", "fd", "level", "prefix", "truncate"), notes=notes)
    level = parse_int(sub.get("level") or "1", "--log level", 0, 1000)
    prefix = sub.get("prefix") or ""
    if sub.get("fd") is not None:
        return LogArg(
            fd=parse_int(sub.get("fd") or "", "--log fd", 0, 1 << 20), level=level, prefix=prefix
        )
    path = sub.get("file")
    if not path:
        raise UsageError("--log needs file= or fd=")
    return LogArg(path=path, level=level, prefix=prefix, truncate=sub.has("truncate"))


def _pid(text: str, notes: list[str]) -> PidArg:
    sub = suboptions(text, "--pid", ("file", "fd"), notes=notes)
    if sub.get("fd") is not None:
        return PidArg(fd=parse_int(sub.get("fd") or "", "--pid fd", 0, 1 << 20))
    path = sub.get("file")
    if not path:
        raise UsageError("--pid needs file= or fd=")
    return PidArg(path=os.path.abspath(path))


def _flags(p: Parsed, notes: list[str]) -> bool:
    startup_clear = False
    for text in p.all("--flags"):
        refused = {
            "startup-state": "not supported (the vTPM resumes its saved state by itself)",
            "startup-deactivated": "not supported",
        }
        known = ("not-need-init", "startup-clear", "startup-none", "disable-auto-shutdown")
        sub = suboptions(text, "--flags", known, refused=refused, notes=notes)
        startup_clear = startup_clear or sub.has("startup-clear")
        if sub.has("disable-auto-shutdown"):
            notes.append("--flags disable-auto-shutdown ignored: the vTPM always stores its state")
    return startup_clear


def _migration(p: Parsed, notes: list[str]) -> tuple[bool, bool]:
    incoming = release = False
    for text in p.all("--migration"):
        sub = suboptions(text, "--migration", ("incoming", "release-lock-outgoing"), notes=notes)
        incoming = incoming or sub.has("incoming")
        release = release or sub.has("release-lock-outgoing")
    if incoming or release:
        # libvirt passes it only for a migration over shared storage, which would need the
        # vTPM's Manager on both hosts: not built yet, so refused rather than ignored
        raise UsageError(
            "--migration: moving a running vTPM to another host needs the vTPM Manager's "
            "host-to-host migration, which this version does not have"
        )
    return incoming, release


def parse_socket_args(argv: list[str]) -> SocketArgs:
    """`argv` after the program name (`socket ...`, `chardev ...`, or an option alone)."""
    words = list(argv)
    mode = words.pop(0) if words and not words[0].startswith("-") else ""
    p = parse(words, SPECS)
    notes = list(p.notes)
    if p.has("--help"):
        return SocketArgs(Action.HELP)
    if p.has("--version"):
        return SocketArgs(Action.VERSION)
    if mode not in ("socket", "chardev", "cuse"):
        raise UsageError(
            f"the first argument must be socket (or chardev, cuse), not {mode or 'missing'!r}"
        )
    if p.has("--print-capabilities"):
        return SocketArgs(Action.CAPABILITIES)
    if mode == "cuse":
        raise UsageError("swtpm cuse is not supported: use swtpm socket")
    if mode == "chardev":
        if p.has("--vtpm-proxy") and not os.path.exists("/dev/vtpmx"):
            raise UsageError(
                "swtpm chardev --vtpm-proxy: this host has no /dev/vtpmx "
                "(the tpm_vtpm_proxy kernel module is not loaded)"
            )
        raise UsageError("swtpm chardev is not supported by vtpm's front door: use swtpm socket")
    if p.positional:
        raise UsageError(f"unexpected argument {p.positional[0]!r}")
    if not p.has("--tpm2"):
        raise UsageError("TPM 1.2 is not supported: pass --tpm2")
    state_text = p.last("--tpmstate")
    if state_text is None:
        raise UsageError("--tpmstate is required (dir=DIR or backend-uri=file://FILE)")
    state = _state(state_text, notes)
    ctrl_text = p.last("--ctrl")
    ctrl = _listen(ctrl_text, "--ctrl", "unixio", notes) if ctrl_text is not None else None
    server: Listen | None = None
    if p.last("--server") is not None:
        server = _listen(p.last("--server") or "", "--server", "tcp", notes)
    elif p.last("--port") is not None:
        server = Listen(ListenKind.TCP, port=parse_int(p.last("--port") or "", "--port", 0, 65535))
    elif p.last("--fd") is not None:
        server = Listen(ListenKind.FD, fd=parse_int(p.last("--fd") or "", "--fd", 0, 1 << 20))
    if ctrl is None and server is None:
        raise UsageError("nothing to serve: give --ctrl and/or --server")
    terminate = p.has("--terminate") or (
        ctrl_text is not None and "terminate" in ctrl_text.split(",")
    )
    incoming, release = _migration(p, notes)
    key = p.last("--key")
    mkey = p.last("--migration-key")
    log = p.last("--log")
    pid = p.last("--pid")
    return SocketArgs(
        Action.RUN,
        state=state,
        ctrl=ctrl,
        server=server,
        terminate=terminate,
        startup_clear=_flags(p, notes),
        daemon=p.has("--daemon"),
        pid=_pid(pid, notes) if pid is not None else None,
        log=_log(log, notes) if log is not None else None,
        key=secret_source(key, "--key", notes) if key is not None else None,
        migration_key=secret_source(mkey, "--migration-key", notes) if mkey is not None else None,
        incoming=incoming,
        release_lock_outgoing=release,
        runas=p.last("--runas"),
        notes=tuple(notes),
    )


HELP = """\
usage: swtpm socket --tpm2 --tpmstate dir=DIR|backend-uri=file://FILE [OPTIONS]

vtpm's swtpm-compatible front door. It binds the sockets it is given, then asks the vTPM
Manager (socket $VTPM_COMPAT_SOCKET, default /run/vtpm/compat.sock) to run the vTPM recorded
for this state location on them. It holds no key; it exits with the vTPM.

  --tpm2                          required (TPM 1.2 is not supported)
  --tpmstate dir=DIR[,mode=M]     the state directory (created 0700 if missing)
  --tpmstate backend-uri=dir://DIR | backend-uri=file://FILE[,mode=M]
  --ctrl type=unixio,path=P[,mode=0600|0660][,uid=U][,gid=G][,terminate]
  --ctrl type=unixio,fd=N | type=tcp,port=P[,bindaddr=A] | fd=N
  --server type=tcp,port=P[,bindaddr=A] | type=unixio,path=P | fd=N  (also -p P, --fd N)
  --flags not-need-init,startup-clear  --terminate  --daemon  --runas USER
  --pid file=F|fd=N               written once the vTPM serves, by the process that stays
  --log file=F|fd=N[,level=N][,prefix=S][,truncate]
  --key pwdfd=N|pwdfile=F|fd=N|file=F[,mode=aes-256-cbc]   a passphrase for the Manager
  --migration-key pwdfd=N|...     --migration incoming,release-lock-outgoing
  --print-capabilities  --version  --help
Ignored (logged): --seccomp, --locality. Refused: --chroot, --print-states, --profile, --pcap.
"""
