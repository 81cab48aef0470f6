"""`vtpm ek [show] UUID`: a vTPM's EK and platform certificates and its group CA's, from the
Manager; `vtpm ek provision UUID`: give a vTPM made before it had them its EKs and certificates.

The certificates are public: anyone allowed on the admin socket may read them, and the
Manager also keeps them as files in `<data-dir>/vtpms/<uuid>.certs/`. `vtpm ek ACTION UUID`
names the action on a vTPM's endorsement (the table `ACTIONS`; "show" is the default).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vtpm.cli import client
from vtpm.errors import ConfigError
from vtpm.tpm.ekcert import CERT_KINDS
from vtpm.wire import admin as api

CA_NAME = "group-ca"
FILE_MODE = 0o644


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ek",
        help="a vTPM's EK and platform certificates and its group CA certificate",
        description="Print or write the EK certificates (ek-rsa2048, ek-ecc256, ek-ecc384), the "
        "platform certificate and the group CA certificate of a vTPM, as its group CA in the "
        "hardware TPM issued them. `openssl verify -CAfile group-ca.pem ek-rsa2048.pem` checks "
        "one against the CA; `vtpm verify --bundle` takes the CA back to the hardware TPM.",
    )
    p.add_argument(
        "words", nargs="+", metavar="[ACTION] UUID", help="the vTPM (ACTION: show, provision)"
    )
    p.add_argument(
        "--ek",
        type=parse_eks,
        default=api.DEFAULT_EKS,
        metavar="KINDS",
        help="provision: the EKs (rsa2048, ecc256, ecc384, platform; default "
        f"{','.join(api.DEFAULT_EKS)}). The instance restarts once (a running guest sees a "
        "TPM reset); EKs and certificates already there are kept",
    )
    p.add_argument("--format", choices=("pem", "der"), default="pem", help="default pem")
    p.add_argument(
        "--kind",
        default=None,
        help=f"only this certificate: {', '.join(CERT_KINDS)} or {CA_NAME}",
    )
    p.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="write <kind>.pem|der and group-ca.pem|der there instead of printing",
    )
    client.add_common(p)
    p.set_defaults(func=cmd_ek)


def parse_eks(text: str) -> tuple[str, ...]:
    """`--ek KINDS`: comma-separated, or `none`."""
    return () if text == "none" else tuple(n.strip() for n in text.split(",") if n.strip())


def _encode(der: bytes, fmt: str) -> bytes:
    if fmt == "der":
        return der
    return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)


def _selected(view: api.CertsView, kind: str | None) -> dict[str, bytes]:
    every = dict(sorted(view.certificates.items()))
    if view.ca_certificate:
        every[CA_NAME] = view.ca_certificate
    if kind is None:
        return every
    if kind not in (*CERT_KINDS, CA_NAME):
        raise ConfigError(f"--kind {kind}: use one of {', '.join((*CERT_KINDS, CA_NAME))}")
    if kind not in every:
        raise ConfigError(f"the vTPM has no {kind} certificate (not issued yet)")
    return {kind: every[kind]}


def _write(out_dir: Path, files: dict[str, bytes], fmt: str) -> list[Path]:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create {out_dir}: {e.strerror}") from None
    written = []
    for name, der in files.items():
        path = out_dir / f"{name}.{fmt}"
        client.write_output(path, _encode(der, fmt))
        path.chmod(FILE_MODE)
        written.append(path)
    return written


def cmd_show(args: argparse.Namespace, vtpm: str) -> int:
    view = client.call(args, api.VtpmCerts(client.vtpm_uuid(vtpm)))
    files = _selected(view, args.kind)
    if not files:
        raise ConfigError(f"vTPM {vtpm} has no certificates (its group has no CA yet)")
    if args.out_dir is not None:
        written = _write(args.out_dir, files, args.format)
        return client.emit(args, view, "\n".join(str(p) for p in written))
    if args.json:
        return client.emit(args, view, "")
    if args.format == "der":
        if len(files) != 1:
            raise ConfigError("DER holds one certificate: give --kind, or --out-dir")
        sys.stdout.buffer.write(next(iter(files.values())))
        return 0
    for name, der in files.items():
        sys.stdout.write(f"# {name}\n{_encode(der, 'pem').decode()}")
    return 0


def cmd_provision(args: argparse.Namespace, vtpm: str) -> int:
    v = client.call(args, api.VtpmEkProvision(client.vtpm_uuid(vtpm), args.ek))
    return client.emit(
        args, v, f"vTPM {v.uuid}: EKs provisioned ({','.join(args.ek)}), {v.run.state}"
    )


# `vtpm ek ACTION UUID`: action -> what it does with the vTPM named
ACTIONS: dict[str, Callable[[argparse.Namespace, str], int]] = {
    "show": cmd_show,
    "provision": cmd_provision,
}


def cmd_ek(args: argparse.Namespace) -> int:
    words: list[str] = args.words
    if len(words) == 1:
        return cmd_show(args, words[0])
    if len(words) == 2 and words[0] in ACTIONS:
        return ACTIONS[words[0]](args, words[1])
    raise ConfigError(f"usage: vtpm ek [{'|'.join(ACTIONS)}] UUID")
