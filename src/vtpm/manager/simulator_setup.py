"""Manufacture of the swtpm simulator that stands in for the hardware TPM (`simulator`).

The first start (no TPM state yet) runs `swtpm_setup --createek --create-ek-cert
--create-platform-cert`, as a TPM vendor would, so the simulator has EKs, an RSA EK certificate
at NV 0x01c00002 and a platform certificate. The certificates come from `swtpm_localca` with a
configuration and a small local CA (ECC P-256, made here) under `<state_dir>/ca`; the system's
/etc/swtpm* files and /var/lib/swtpm-localca are never read or written. If swtpm_setup is
missing or fails, the simulator starts unprovisioned (no EK certificate) with a warning.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

STATE_NAME = "tpm2-00.permall"  # swtpm's permanent state: present once the TPM is manufactured
CA_DIR = "ca"
SETUP_CONF = "swtpm_setup.conf"
SETUP_LOG = "swtpm_setup.log"
SETUP_TIMEOUT = 120.0
CA_CERT = "issuercert.pem"
CA_KEY = "signkey.pem"
CA_YEARS = 20


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


def manufacture(state_dir: Path) -> None:
    """EKs and their certificates, as a vendor provisions a TPM (see the module doc)."""
    ca_dir = state_dir / CA_DIR
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
    setup_conf = state_dir / SETUP_CONF
    setup_conf.write_text(
        "create_certs_tool = swtpm_localca\n"
        f"create_certs_tool_config = {localca_conf}\n"
        f"create_certs_tool_options = {localca_options}\n"
    )
    argv = [
        "swtpm_setup",
        "--tpm2",
        "--tpmstate",
        str(state_dir),
        "--createek",
        "--create-ek-cert",
        "--create-platform-cert",
        "--pcr-banks",
        "-",  # leave every bank active, as an unprovisioned swtpm has them
        "--not-overwrite",
        "--config",
        str(setup_conf),
        "--logfile",
        str(state_dir / SETUP_LOG),
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
        state_dir / SETUP_LOG,
    )
    with contextlib.suppress(FileNotFoundError):
        (state_dir / STATE_NAME).unlink()  # half-made: start from a blank TPM
