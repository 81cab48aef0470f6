"""swtpm standing in for the host's hardware TPM where there is no /dev/tpmrm0.

The simulator runs as a child of the Manager in its own session, so a Manager killed with -9
leaves it running. It then plays a hardware TPM that did not reboot: the next Manager finds it
through `<state_dir>/simulator.json` ({pid, port}) and adopts it, PCR values and all. A pid is
only trusted (adopted or signalled) after /proc/PID/cmdline shows it is a swtpm serving this
state directory on the recorded port, since pids are reused.

A new simulator takes the recorded port again when it is free, so a restarted simulator keeps
the TCTI string and a connected HardwareTpm reaches it by reconnecting.
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Simulator:
    """One swtpm process serving `state_dir` on 127.0.0.1 (data port P, control port P+1)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.tcti = ""
        self.port = 0
        self.pid = 0
        self.reused = False
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def record_path(self) -> Path:
        return self.state_dir / RECORD_NAME

    # lifecycle -------------------------------------------------------------------------------

    def start(self) -> str:
        """Adopt the recorded live simulator or start a new one; return its TCTI string."""
        if self._proc is not None or self.reused:
            raise HwTpmError("this simulator is already started")
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)
        record = self._read_record()
        if record is not None:
            pid, port = record
            if self._is_our_swtpm(pid, port) and _answers(port):
                log.info("adopting the running TPM simulator (pid %d, port %d)", pid, port)
                self._set(pid, port)
                self.reused = True
                return self.tcti
            log.debug("recorded simulator pid %d is gone; starting a new one", pid)
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
            if _answers(port, timeout=0.2):
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
        argv = _cmdline(pid)
        return (
            bool(argv)
            and Path(argv[0]).name == "swtpm"
            and f"dir={self.state_dir}" in argv
            and f"type=tcp,port={port},bindaddr={HOST}" in argv
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
        data = json.dumps({"pid": self.pid, "port": self.port}).encode()
        tmp = self.record_path.with_name(f".{RECORD_NAME}.{os.getpid()}.tmp")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.record_path)
        _fsync_dir(self.state_dir)
