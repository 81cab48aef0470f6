"""swtpm standing in for the host's hardware TPM where there is no /dev/tpmrm0.

The simulator runs as a child of the Manager in its own session, so a Manager killed with -9
leaves it running. It then plays a hardware TPM that did not reboot: the next Manager finds it
through `<state_dir>/simulator.json` ({pid, port}) and adopts it, PCR values and all. A pid is
only trusted (adopted or signalled) after /proc/PID/cmdline shows it is a swtpm serving this
state directory on the recorded port, since pids are reused.

A new simulator takes the recorded port again when it is free, so a restarted simulator keeps
the TCTI string and a connected HardwareTpm reaches it by reconnecting.

Dying and coming back: when the simulator dies under a running Manager, the Manager's
HardwareTpm calls `revive` at its next recovery attempt (see `vtpm.manager.hwtpm`): a simulator
someone else started meanwhile is adopted, else a new one is started on the same state. swtpm
locks its state directory (`.lock`), so a second swtpm on the same state fails with "Could not
lock access to lockfile"; that is what a Manager used to hit when the record still named the
dead pid while another swtpm (restarted by hand) served the state. So before starting one, the
Manager looks for a live swtpm of its own user serving this state directory (/proc): with a
record naming a dead simulator it adopts that one (and rewrites the record); with no record at
all it refuses, naming the pid, since nothing says that swtpm was ever handed to a Manager.
It never starts a second swtpm on one state, and never signals a process it did not verify.

Manufacture (EKs and their certificates, at the first start) is `vtpm.manager.simulator_setup`'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

from vtpm.errors import HwTpmError
from vtpm.files import write_atomic
from vtpm.manager import simulator_setup

log = logging.getLogger(__name__)

RECORD_NAME = "simulator.json"
LOG_NAME = "swtpm.log"
STDERR_NAME = "swtpm.stderr"
HOST = "127.0.0.1"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
PORT_RANGE = (20000, 60000)
PORT_ATTEMPTS = 3
LOG_TAIL_BYTES = 2000
STATE_NAME = simulator_setup.STATE_NAME


def _port_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # as swtpm binds: connections of a killed simulator left in TIME_WAIT do not block the port
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((HOST, port))
    except OSError:
        return False
    finally:
        s.close()
    return True


def _pair_free(port: int) -> bool:
    return 0 < port < 65535 and port % 2 == 0 and _port_free(port) and _port_free(port + 1)


def _random_pair() -> int:
    for _ in range(200):
        port = random.randrange(PORT_RANGE[0], PORT_RANGE[1], 2)  # noqa: S311 - not a secret
        if _pair_free(port):
            return port
    raise HwTpmError(f"no free TCP port pair on {HOST} for the TPM simulator")


def _answers(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def _server_port(argv: list[str]) -> int | None:
    """The TCP port a swtpm argv of ours serves on (its `--server type=tcp,port=N,...`)."""
    for arg in argv:
        if arg.startswith("type=tcp,port=") and arg.endswith(f",bindaddr={HOST}"):
            digits = arg.removeprefix("type=tcp,port=").removesuffix(f",bindaddr={HOST}")
            if digits.isdigit() and 0 < int(digits) < 65535:
                return int(digits)
    return None


class Simulator:
    """One swtpm process serving `state_dir` on 127.0.0.1 (data port P, control port P+1)."""

    def __init__(self, state_dir: Path, *, manufacture: bool = True) -> None:
        self.state_dir = state_dir
        self.manufacture = manufacture
        self.tcti = ""
        self.port = 0
        self.pid = 0
        self.reused = False
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def record_path(self) -> Path:
        return self.state_dir / RECORD_NAME

    @property
    def ca_certificate(self) -> Path:
        """The local CA that issued the simulator's EK and platform certificates (PEM)."""
        return self.state_dir / simulator_setup.CA_DIR / simulator_setup.CA_CERT

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> str:
        """Adopt the recorded live simulator or start a new one; return its TCTI string."""
        if self._proc is not None or self.reused:
            raise HwTpmError("this simulator is already started")
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)
        record = self._read_record()
        if self._adopt(record):
            return self.tcti
        if self.manufacture and not (self.state_dir / STATE_NAME).exists():
            simulator_setup.manufacture(self.state_dir)
        preferred = record[1] if record is not None else 0
        failure = ""
        for attempt in range(PORT_ATTEMPTS):
            port = preferred if attempt == 0 and _pair_free(preferred) else _random_pair()
            failure = self._launch(port)
            if not failure:
                self._write_record()
                log.info("started TPM simulator (pid %d, port %d)", self.pid, self.port)
                return self.tcti
        raise HwTpmError(f"the TPM simulator did not start: {failure}")

    def stop(self) -> None:
        """Terminate the simulator (SIGTERM, SIGKILL after a timeout) and drop its record."""
        pid, port = self.pid, self.port
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    log.warning("TPM simulator pid %d ignored SIGTERM; killing it", pid)
                    proc.kill()
                    proc.wait()
        elif pid and self._is_our_swtpm(pid, port):
            self._signal_and_wait(pid, port)
        record = self._read_record()
        if record is not None and record[0] == pid:
            with contextlib.suppress(FileNotFoundError):
                self.record_path.unlink()
        self.reused = False

    def revive(self, restart: bool = True) -> str:
        """Make sure a simulator serves the state and return its TCTI: this one while it
        answers, else one someone else started (adopted), else, if `restart`, a new one (the
        hardware TPM's `revive` hook; HwTpmError when none can serve)."""
        if self._alive():
            return self.tcti
        proc = self._proc
        if proc is not None and proc.poll() is None:  # alive but deaf: never two on one state
            if not restart:
                return self.tcti
            log.warning("the TPM simulator (pid %d) does not answer; killing it", proc.pid)
            proc.kill()
            proc.wait()
        self._proc = None
        self.reused = False
        if self._adopt(self._read_record()):
            return self.tcti
        if not restart:
            return self.tcti
        log.warning(
            "the TPM simulator (pid %d, port %d) is gone; starting it again", *self._where()
        )
        return self.start()

    def _where(self) -> tuple[int, int]:
        return self.pid, self.port

    def _alive(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None and _answers(self.port)
        return self.reused and self._is_our_swtpm(self.pid, self.port) and _answers(self.port)

    def _adopt(self, record: tuple[int, int] | None) -> bool:
        """Adopt the live simulator serving this state (see the module doc), if there is one."""
        if record is not None:
            pid, port = record
            if self._is_our_swtpm(pid, port) and _answers(port):
                log.info("adopting the running TPM simulator (pid %d, port %d)", pid, port)
                self._set(pid, port)
                self.reused = True
                return True
            log.debug("recorded simulator pid %d is gone", pid)
        return self._adopt_unrecorded(record is not None)

    def _adopt_unrecorded(self, had_record: bool) -> bool:
        """Adopt a live swtpm of ours serving this state that the record does not name (see
        the module doc); False when there is none. Raises HwTpmError when one holds the state
        but cannot be adopted: starting another would only fail on swtpm's lock."""
        found = self._find_running()
        if found is None:
            return False
        pid, port = found
        if not had_record:
            raise HwTpmError(
                f"the TPM simulator did not start: swtpm pid {pid} already serves "
                f"{self.state_dir} (port {port}) but {RECORD_NAME} is missing; stop it or "
                "write its record"
            )
        if not _answers(port) or not _answers(port + 1):
            raise HwTpmError(
                f"swtpm pid {pid} holds the TPM simulator state {self.state_dir} but does not "
                f"answer on port {port}; stop it"
            )
        log.warning("adopting TPM simulator pid %d (port %d), started by someone else", pid, port)
        self._set(pid, port)
        self.reused = True
        self._write_record()
        return True

    def _find_running(self) -> tuple[int, int] | None:
        """A live swtpm of this user serving this state directory over TCP: (pid, port)."""
        try:
            pids = [int(n) for n in os.listdir("/proc") if n.isdigit()]
        except OSError:
            return None
        for pid in pids:
            argv = _cmdline(pid)
            port = _server_port(argv) if argv else None
            if port is not None and self._is_our_swtpm(pid, port):
                return pid, port
        return None

    def __enter__(self) -> Simulator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # helpers ---------------------------------------------------------------------------------

    def _set(self, pid: int, port: int) -> None:
        self.pid = pid
        self.port = port
        self.tcti = f"swtpm:host={HOST},port={port}"

    def _argv(self, port: int) -> list[str]:
        return [
            "swtpm",
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={self.state_dir}",
            "--server",
            f"type=tcp,port={port},bindaddr={HOST}",
            "--ctrl",
            f"type=tcp,port={port + 1},bindaddr={HOST}",
            "--flags",
            "not-need-init,startup-clear",
            "--log",
            f"file={self.state_dir / LOG_NAME}",
        ]

    def _launch(self, port: int) -> str:
        """Start swtpm on `port`; return "" once it answers, else why it failed."""
        stderr_path = self.state_dir / STDERR_NAME
        with stderr_path.open("ab") as stderr:
            try:
                proc = subprocess.Popen(
                    self._argv(port),
                    stdin=subprocess.DEVNULL,
                    stdout=stderr,
                    stderr=stderr,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as e:
                raise HwTpmError(f"cannot run swtpm: {e.strerror}") from None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return f"swtpm exited with status {proc.returncode}; {self._log_tail()}"
            # both ports (tcti-swtpm uses the control port too), and still our process: a
            # swtpm that lost a port to another program exits, and something else may answer
            if _answers(port, timeout=0.2) and _answers(port + 1, 0.2) and proc.poll() is None:
                self._proc = proc
                self._set(proc.pid, port)
                return ""
            time.sleep(0.02)
        proc.kill()
        proc.wait()
        tail = self._log_tail()
        return f"swtpm did not answer on port {port} within {START_TIMEOUT:.0f} s; {tail}"

    def _log_tail(self) -> str:
        parts = []
        for name in (STDERR_NAME, LOG_NAME):
            try:
                with (self.state_dir / name).open("rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
                    text = f.read().decode(errors="replace").strip()
            except OSError:
                continue
            if text:
                parts.append(f"{name}: {text}")
        return " | ".join(parts) if parts else "swtpm logged nothing"

    def _is_our_swtpm(self, pid: int, port: int) -> bool:
        """Whether `pid` is a swtpm of this user serving this state on `port` (another user's
        process could carry the same command line, and pids are reused)."""
        argv = _cmdline(pid)
        return (
            bool(argv)
            and Path(argv[0]).name == "swtpm"
            and f"dir={self.state_dir}" in argv
            and f"type=tcp,port={port},bindaddr={HOST}" in argv
            and _owner(pid) == os.geteuid()
        )

    def _signal_and_wait(self, pid: int, port: int) -> None:
        """Stop a simulator that is not our child (adopted): we can signal it, not reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            if not self._is_our_swtpm(pid, port):
                return
            time.sleep(0.02)
        log.warning("TPM simulator pid %d ignored SIGTERM; killing it", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def _read_record(self) -> tuple[int, int] | None:
        try:
            raw = json.loads(self.record_path.read_text())
            pid, port = raw["pid"], raw["port"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError):
            log.warning("ignoring unreadable simulator record %s", self.record_path)
            return None
        if not isinstance(pid, int) or not isinstance(port, int) or pid <= 0 or port <= 0:
            log.warning("ignoring malformed simulator record %s", self.record_path)
            return None
        return pid, port

    def _write_record(self) -> None:
        write_atomic(self.record_path, json.dumps({"pid": self.pid, "port": self.port}).encode())
