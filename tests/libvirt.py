"""A private libvirt for tests: virtlogd + libvirtd (QEMU driver) that never touch the machine's own
libvirt files.

Root's libvirtd is the "system" instance and reads its configuration and keeps its state at fixed
paths (/etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt; swtpm
state under /var/lib/libvirt/swtpm, swtpm logs under /var/log/swtpm). `--config` only moves
libvirtd.conf, not qemu.conf, so both daemons run in a private mount namespace (`unshare -m`)
where temp directories are bind-mounted over those paths. libvirtd.conf puts the client socket in
the temp directory, outside the bind mounts, so `virsh -c qemu:///system?socket=...` reaches it
from the test's own namespace. Everything libvirtd starts (QEMU, swtpm or vtpm's front door)
lives in that namespace too, which is how `private_libvirt` finds and stops leftovers: by the
namespace's identity, never by name. A process that must see the same files as libvirt (a vTPM
Manager that records the state locations libvirt hands out) runs there with `in_namespace()`.

The caller gives PATH (a directory with `swtpm`, `swtpm_setup`, `swtpm_ioctl` first selects the
TPM emulator libvirt runs) and any other environment the emulator needs; libvirt passes its own
environment on to the emulator's processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

LIBVIRTD = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
VIRTLOGD = shutil.which("virtlogd") or "/usr/sbin/virtlogd"
VIRSH = shutil.which("virsh") or "/usr/bin/virsh"
START_TIMEOUT = 60.0


def missing() -> list[str]:
    """What this machine lacks for a private libvirt (installed by ./dev install)."""
    need = {
        "libvirtd (libvirt-daemon-system)": LIBVIRTD,
        "virtlogd (libvirt-daemon-system)": VIRTLOGD,
        "virsh (libvirt-clients)": VIRSH,
        "unshare (util-linux)": shutil.which("unshare") or "",
    }
    gone = [what for what, path in need.items() if not path or not os.access(path, os.X_OK)]
    if os.geteuid() != 0:
        gone.append("root (the system libvirtd runs as root, in a private mount namespace)")
    return gone


@dataclass(frozen=True, slots=True)
class LibvirtDirs:
    """The private directories, as seen from the test (outside the mount namespace)."""

    root: Path

    @property
    def etc(self) -> Path:  # /etc/libvirt
        return self.root / "etc"

    @property
    def run(self) -> Path:  # /run
        return self.root / "run"

    @property
    def lib(self) -> Path:  # /var/lib/libvirt
        return self.root / "lib"

    @property
    def log(self) -> Path:  # /var/log
        return self.root / "log"

    @property
    def cache(self) -> Path:  # /var/cache/libvirt
        return self.root / "cache"

    @property
    def localca(self) -> Path:  # /var/lib/swtpm-localca (swtpm_setup's local CA)
        return self.root / "localca"

    @property
    def sock(self) -> Path:  # libvirtd's client sockets
        return self.root / "sock"

    @property
    def swtpm_state(self) -> Path:
        """/var/lib/libvirt/swtpm: one directory per domain uuid."""
        return self.lib / "swtpm"

    def daemon_log(self) -> str:
        """The tails of libvirtd's and virtlogd's logs and of every QEMU and swtpm log."""
        parts = []
        for f in sorted(self.log.rglob("*.log")):
            text = f.read_text(errors="replace")
            parts.append(f"--- {f.relative_to(self.root)}\n{text[-3000:]}")
        return "\n".join(parts)


@dataclass(frozen=True, slots=True)
class Libvirt:
    uri: str
    env: Mapping[str, str]  # the environment for virsh
    dirs: LibvirtDirs
    pid: int  # libvirtd

    def in_namespace(self) -> list[str]:
        """A command prefix that runs a command in the private libvirt's mount namespace, where
        /var/lib/libvirt/swtpm is the one libvirt uses (for a Manager that must see the state
        locations libvirt hands out)."""
        return ["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", "--"]

    def virsh(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [VIRSH, "-q", "-c", self.uri, *args],
            env=dict(self.env),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(
                f"virsh {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}\n"
                f"{self.dirs.daemon_log()}"
            )
        return res


QEMU_CONF = """\
# written by tests/libvirt.py: a private libvirt for tests
security_driver = "none"
user = "root"
group = "root"
swtpm_user = "root"
swtpm_group = "root"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "logd"
"""

LIBVIRTD_CONF = """\
unix_sock_dir = "{sock}"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

VIRTLOGD_CONF = """\
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
"""

# Runs as the namespace's first process: bind-mounts the private directories, starts virtlogd,
# then becomes libvirtd. $R is the private root.
LAUNCH = """\
set -e
mount --make-rprivate /
mount --bind "$R/etc" /etc/libvirt
mount --bind "$R/run" /run
mount --bind "$R/lib" /var/lib/libvirt
mount --bind "$R/log" /var/log
mount --bind "$R/cache" /var/cache/libvirt
if [ -d /var/lib/swtpm-localca ]; then mount --bind "$R/localca" /var/lib/swtpm-localca; fi
"$VIRTLOGD" --pid-file "$R/virtlogd.pid" --config /etc/libvirt/virtlogd.conf &
exec "$LIBVIRTD" --pid-file "$R/libvirtd.pid" --config /etc/libvirt/libvirtd.conf
"""


def _write_config(dirs: LibvirtDirs) -> None:
    for d in (
        dirs.etc / "qemu",
        dirs.etc / "secrets",
        dirs.run / "libvirt",
        dirs.lib / "qemu",
        dirs.lib / "swtpm",
        dirs.log / "libvirt" / "qemu",
        dirs.log / "swtpm" / "libvirt" / "qemu",
        dirs.cache / "qemu",
        dirs.localca,
        dirs.sock,
    ):
        d.mkdir(parents=True, exist_ok=True)
    (dirs.etc / "qemu.conf").write_text(QEMU_CONF)
    (dirs.etc / "libvirtd.conf").write_text(LIBVIRTD_CONF.format(sock=dirs.sock))
    (dirs.etc / "virtlogd.conf").write_text(VIRTLOGD_CONF)
    (dirs.etc / "libvirt.conf").write_text("")


def _mnt_ns(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/mnt").st_ino
    except OSError:
        return None


def namespace_pids(ns: int) -> list[int]:
    """Every process in mount namespace `ns` (ours: only what the private libvirt started)."""
    pids = (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit())
    return [pid for pid in pids if _mnt_ns(pid) == ns]


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def _stop_namespace(ns: int, libvirtd: subprocess.Popen[bytes]) -> list[str]:
    """Stops libvirtd, then whatever is left in its namespace (QEMU, swtpm, virtlogd): TERM,
    then KILL after 10 s. Returns the leftovers it found (besides libvirtd and virtlogd)."""
    if libvirtd.poll() is None:
        libvirtd.send_signal(signal.SIGTERM)
        try:
            libvirtd.wait(timeout=20)
        except subprocess.TimeoutExpired:
            libvirtd.kill()
            libvirtd.wait()
    leftovers = []
    for pid in namespace_pids(ns):
        cmd = _cmdline(pid)
        if "virtlogd" not in cmd:
            leftovers.append(f"{pid}: {cmd[:200]}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (pids := namespace_pids(ns)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return leftovers


@contextlib.contextmanager
def private_libvirt(path: str, env: Mapping[str, str] | None = None) -> Iterator[Libvirt]:
    """virtlogd + libvirtd, privately, with `path` as their PATH and `env` added to their
    environment (inherited by the swtpm processes libvirt starts); yields once `virsh` answers.
    On the way out both are stopped, and any QEMU or swtpm left behind is ended."""
    gone = missing()
    if gone:
        raise RuntimeError(f"a private libvirt needs {', '.join(gone)}")
    dirs = LibvirtDirs(Path(tempfile.mkdtemp(prefix="lv-", dir="/tmp")))  # short socket paths
    _write_config(dirs)
    daemon_env = {
        k: v for k, v in os.environ.items() if k in ("LANG", "LC_ALL", "PYTHONPATH", "TMPDIR")
    }
    daemon_env.update(env or {})
    daemon_env.update(
        PATH=path, HOME=str(dirs.root), R=str(dirs.root), LIBVIRTD=LIBVIRTD, VIRTLOGD=VIRTLOGD
    )
    stderr = dirs.root / "libvirtd.stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", LAUNCH],
            env=daemon_env,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=err,
            start_new_session=True,
        )
    uri = f"qemu:///system?socket={dirs.sock}/libvirt-sock"
    virsh_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C"}
    lv = Libvirt(uri, virsh_env, dirs, proc.pid)
    ns: int | None = None
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if ns is None:
                own = _mnt_ns(os.getpid())
                cur = _mnt_ns(proc.pid)
                ns = cur if cur != own else None
            if proc.poll() is not None:
                raise RuntimeError(
                    f"libvirtd exited ({proc.returncode}): {stderr.read_text(errors='replace')}\n"
                    f"{dirs.daemon_log()}"
                )
            if lv.virsh("version", check=False, timeout=30).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"libvirtd did not answer within {START_TIMEOUT:.0f} s: "
                    f"{stderr.read_text(errors='replace')}\n{dirs.daemon_log()}"
                )
            time.sleep(0.2)
        yield lv
    finally:
        if ns is None:
            proc.kill()
            proc.wait()
        else:
            _stop_namespace(ns, proc)
        shutil.rmtree(dirs.root, ignore_errors=True)
