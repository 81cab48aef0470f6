"""swtpm standing in for the host's hardware TPM where there is no /dev/tpmrm0.

The simulator runs as a child of the Manager in its own session, so a Manager killed with -9
leaves it running. It then plays a hardware TPM that did not reboot: the next Manager finds it
through `<state_dir>/simulator.json` ({pid, port}) and adopts it, PCR values and all. A pid is
only trusted (adopted or signalled) after /proc/PID/cmdline shows it is a swtpm serving this
state directory on the recorded port, since pids are reused.

A new simulator takes the recorded port again when it is free, so a restarted simulator keeps
the TCTI string and a connected HardwareTpm reaches it by reconnecting.

Manufacture: the first start (no TPM state yet) runs `swtpm_setup --createek --create-ek-cert
--create-platform-cert`, as a TPM vendor would, so the simulator has EKs, an RSA EK certificate
at NV 0x01c00002 and a platform certificate. The certificates come from `swtpm_localca` with a
configuration and a small local CA (ECC P-256, made here) under `<state_dir>/ca`; the system's
/etc/swtpm* files and /var/lib/swtpm-localca are never read or written. If swtpm_setup is
missing or fails, the simulator starts unprovisioned (no EK certificate) with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vtpm.errors import HwTpmError
from vtpm.files import write_atomic

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
STATE_NAME = "tpm2-00.permall"  # swtpm's permanent state: present once the TPM is manufactured
CA_DIR = "ca"
SETUP_CONF = "swtpm_setup.conf"
SETUP_LOG = "swtpm_setup.log"
SETUP_TIMEOUT = 120.0
CA_CERT = "issuercert.pem"
CA_KEY = "signkey.pem"
CA_YEARS = 20


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


def _write_local_ca(ca_dir: Path) -> None:
    """A self-signed ECC P-256 CA (key 0600) for swtpm_localca to sign certificates with."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vtpm TPM simulator local CA")])
    now = datetime.datetime.now(datetime.UTC)
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365 * CA_YEARS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(ca_dir / CA_KEY, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, pem)
    finally:
        os.close(fd)
    (ca_dir / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))


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
        return self.state_dir / CA_DIR / CA_CERT

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
        if self.manufacture and not (self.state_dir / STATE_NAME).exists():
            self._manufacture()
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

    # manufacture -----------------------------------------------------------------------------

    def _manufacture(self) -> None:
        """EKs and their certificates, as a vendor provisions a TPM (see the module doc)."""
        ca_dir = self.state_dir / CA_DIR
        ca_dir.mkdir(mode=0o700, exist_ok=True)
        if not (ca_dir / CA_KEY).exists() or not (ca_dir / CA_CERT).exists():
            _write_local_ca(ca_dir)
        localca_conf = ca_dir / "swtpm-localca.conf"
        localca_conf.write_text(
            f"statedir = {ca_dir}\n"
            f"signingkey = {ca_dir / CA_KEY}\n"
            f"issuercert = {ca_dir / CA_CERT}\n"
            f"certserial = {ca_dir / 'certserial'}\n"
        )
        localca_options = ca_dir / "swtpm-localca.options"
        localca_options.write_text(
            "--platform-manufacturer vtpm\n--platform-version 2.0\n--platform-model simulator\n"
        )
        setup_conf = self.state_dir / SETUP_CONF
        setup_conf.write_text(
            "create_certs_tool = swtpm_localca\n"
            f"create_certs_tool_config = {localca_conf}\n"
            f"create_certs_tool_options = {localca_options}\n"
        )
        argv = [
            "swtpm_setup",
            "--tpm2",
            "--tpmstate",
            str(self.state_dir),
            "--createek",
            "--create-ek-cert",
            "--create-platform-cert",
            "--pcr-banks",
            "-",  # leave every bank active, as an unprovisioned swtpm has them
            "--not-overwrite",
            "--config",
            str(setup_conf),
            "--logfile",
            str(self.state_dir / SETUP_LOG),
        ]
        try:
            res = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=SETUP_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            why = f"{e}"
        else:
            if res.returncode == 0:
                log.info("manufactured the TPM simulator: EKs and an EK certificate")
                return
            why = f"exit status {res.returncode}: {res.stderr.decode(errors='replace').strip()}"
        log.warning(
            "swtpm_setup failed (%s; see %s); the TPM simulator starts without EK certificates",
            why,
            self.state_dir / SETUP_LOG,
        )
        with contextlib.suppress(FileNotFoundError):
            (self.state_dir / STATE_NAME).unlink()  # half-made: start from a blank TPM

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
        write_atomic(self.record_path, json.dumps({"pid": self.pid, "port": self.port}).encode())
