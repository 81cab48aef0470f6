"""Start the guest: QEMU with the measured kernel, command line and initrd, on its vTPM.

The command line (defaults first, the user's `--qemu` arguments last, so they win where QEMU
lets a later option replace an earlier one):

    qemu-system-x86_64 -machine q35 -accel kvm -accel tcg -m 256 -display none -vga none
        -bios /usr/share/qemu/qboot.rom
        -kernel K [-initrd I] -append C [-name N] [-smp V]
        -chardev socket,id=vtpm0,path=CTRL -tpmdev emulator,id=vtpm0,chardev=vtpm0
        -device tpm-tis,tpmdev=vtpm0
        -daemonize -pidfile P   <user arguments>

Options QEMU accumulates rather than replaces are left out when the user gives their own:
`-accel` (also for -enable-kvm), `-bios`, `-display` (also for -nographic, -vnc, ...) and
with it `-vga none`: qboot (QEMU 7.2's) hands Linux a broken memory map when a VGA device and
a TPM are both present (a 256 MiB guest sees 68 MiB and dies out of memory, measured here), and
a guest without a display needs no VGA.

Firmware: qboot (Debian's qemu-system-data ships it) loads the kernel and initrd and measures
nothing, so PCR 4 and 5 hold exactly the launch's measurements. SeaBIOS, QEMU's default, logs
its own events into PCR 4/5 as well (boot and option-ROM events, a separator); with it, or
with OVMF, the guest's PCR 4/5 combine both logs and no longer equal the launch's reference
values. With qboot, nobody sends TPM2_Startup before Linux, which sends TPM2_Startup(CLEAR)
itself when its first command is answered TPM_RC_INITIALIZE; that Startup is what applies the
launch.

QEMU runs with -daemonize: its first process exits 0 only once the machine is set up (the TPM
backend connected to the vTPM's control socket included) and the guest runs, or non-zero with
the reason on stderr and no guest left. So the launcher knows for certain whether a guest is
running.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vtpm.errors import ConfigError, LaunchError
from vtpm.launch.digests import GuestFiles

QEMU = "qemu-system-x86_64"
DEFAULT_FIRMWARE = Path("/usr/share/qemu/qboot.rom")
DEFAULT_MEMORY = 256
START_TIMEOUT = 60.0
ACCEL_OPTIONS = frozenset({"-accel", "-enable-kvm"})
DISPLAY_OPTIONS = frozenset({"-display", "-nographic", "-vnc", "-sdl", "-spice", "-curses"})


@dataclass(frozen=True, slots=True)
class GuestSpec:
    files: GuestFiles
    ctrl_socket: Path
    name: str | None = None
    memory: int | None = None
    vcpus: int | None = None
    firmware: Path | None = DEFAULT_FIRMWARE  # None: QEMU's default (SeaBIOS), which measures
    qemu: str = QEMU
    extra: tuple[str, ...] = ()


def _escape(value: str) -> str:
    """A value inside a QEMU option list: commas are doubled."""
    return value.replace(",", ",,")


def qemu_argv(spec: GuestSpec, pidfile: Path | None = None) -> list[str]:
    user = set(spec.extra)
    argv = [spec.qemu, "-machine", "q35"]
    if not user & ACCEL_OPTIONS:
        argv += ["-accel", "kvm", "-accel", "tcg"]
    argv += ["-m", str(spec.memory or DEFAULT_MEMORY)]
    if not user & DISPLAY_OPTIONS:
        argv += ["-display", "none"]
        if "-vga" not in user:
            argv += ["-vga", "none"]  # see the module's note on qboot
    if spec.firmware is not None and "-bios" not in user:
        argv += ["-bios", str(spec.firmware)]
    argv += ["-kernel", str(spec.files.kernel)]
    if spec.files.initrd is not None:
        argv += ["-initrd", str(spec.files.initrd)]
    argv += ["-append", spec.files.cmdline]
    if spec.name:
        argv += ["-name", _escape(spec.name)]
    if spec.vcpus:
        argv += ["-smp", str(spec.vcpus)]
    argv += [
        "-chardev",
        f"socket,id=vtpm0,path={_escape(str(spec.ctrl_socket))}",
        "-tpmdev",
        "emulator,id=vtpm0,chardev=vtpm0",
        "-device",
        "tpm-tis,tpmdev=vtpm0",
    ]
    if pidfile is not None:
        argv += ["-daemonize", "-pidfile", str(pidfile)]
    return argv + list(spec.extra)


def check(spec: GuestSpec) -> None:
    """What can be checked before the vTPM is touched: QEMU and its firmware are there."""
    if shutil.which(spec.qemu) is None:
        raise ConfigError(f"{spec.qemu} is not installed (Debian: qemu-system-x86)")
    if spec.firmware is not None and "-bios" not in spec.extra and not spec.firmware.is_file():
        raise ConfigError(
            f"firmware {spec.firmware} is missing (Debian: qemu-system-data ships qboot)"
        )


def start(spec: GuestSpec, timeout: float = START_TIMEOUT) -> tuple[int, list[str]]:
    """Start the guest; (QEMU's pid, its argv), or LaunchError with no QEMU left running."""
    with tempfile.TemporaryDirectory(prefix="vtpm-launch-") as tmp:
        pidfile = Path(tmp) / "qemu.pid"
        argv = qemu_argv(spec, pidfile)
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            raise LaunchError(f"cannot run {argv[0]}: {e.strerror}") from None
        try:
            _out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            _kill_daemon(pidfile)
            raise LaunchError(f"QEMU did not start the guest within {timeout:.0f} s") from None
        if proc.returncode != 0:
            _kill_daemon(pidfile)
            lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            raise LaunchError(f"QEMU did not start the guest: {why}")
        pid = _read_pid(pidfile)
        if pid is None:
            raise LaunchError("QEMU reported success but wrote no pid file")
        return pid, argv


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _kill_daemon(pidfile: Path) -> None:
    """Kill the QEMU daemon this launch started, if one is left (its pid file is ours)."""
    pid = _read_pid(pidfile)
    if pid is None:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\x00")
    except OSError:
        return
    if str(pidfile).encode() in cmdline:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def extra_args(values: Sequence[str]) -> tuple[str, ...]:
    """`--qemu` values: each is split like a shell would (`--qemu "-serial file:x"`)."""
    out: list[str] = []
    for v in values:
        try:
            out += shlex.split(v)
        except ValueError as e:
            raise ConfigError(f"--qemu {v!r}: {e}") from None
    return tuple(out)
