"""`vtpm quote --deep` (on the host, through the Manager) and `vtpm guest-quote` (from inside
a guest, through its own vTPM's vendor command, over any TCTI)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vtpm.cli import client
from vtpm.cli.group_cmd import parse_pcr_list
from vtpm.errors import ConfigError, ManagerError, TpmResponseError
from vtpm.instance import vendor
from vtpm.wire import admin as api
from vtpm.wire.evidence import decode_evidence


def _nonce(text: str) -> bytes:
    try:
        nonce = bytes.fromhex(text)
    except ValueError:
        raise ConfigError("--nonce must be hex") from None
    if not 1 <= len(nonce) <= vendor.MAX_NONCE:
        raise ConfigError(f"--nonce must be 1..{vendor.MAX_NONCE} bytes")
    return nonce


def register(sub: Any) -> None:
    q = sub.add_parser(
        "quote",
        help="a deep quote of a vTPM, asked on the host",
        description="Ask the Manager for a deep quote of a running vTPM: the vTPM's PCR values, "
        "its uuid, group and label and the nonce, bound to the host's PCRs by one hardware-TPM "
        "quote with the group's attestation key. Verify it with `vtpm verify --bundle "
        "--evidence --nonce`.",
    )
    q.add_argument("--deep", required=True, metavar="UUID", help="the vTPM to quote")
    q.add_argument("--nonce", required=True, help="the verifier's nonce, hex (1..64 bytes)")
    q.add_argument(
        "--pcrs",
        default=None,
        help="host PCRs to quote (default: those of the group's first permitted state)",
    )
    q.add_argument("--vtpm-pcrs", default="0-23", help="vTPM PCRs to include (default 0-23)")
    q.add_argument("-o", "--output", type=Path, default=None, help="write the evidence here")
    client.add_common(q)
    q.set_defaults(func=cmd_quote)

    g = sub.add_parser(
        "guest-quote",
        help="a deep quote asked from inside the guest",
        description="Send the vendor-specific deep-quote command (TPM_CC 0x20000101) to this "
        "guest's vTPM over a TCTI and write the evidence as JSON. Inside a guest use "
        "device:/dev/tpm0 (the kernel's resource manager, /dev/tpmrm0, refuses unknown "
        "command codes).",
    )
    g.add_argument("--tcti", required=True, help="e.g. device:/dev/tpm0 or swtpm:port=2321")
    g.add_argument("--nonce", required=True, help="hex, 1..64 bytes")
    g.add_argument("--pcrs", default="", help="host PCRs (default: the group's)")
    g.add_argument("--vtpm-pcrs", default="0-23", help="vTPM PCRs to include (default 0-23)")
    g.add_argument("-o", "--output", type=Path, default=None, help="write the evidence here")
    g.set_defaults(func=cmd_guest_quote)


def _write(args: argparse.Namespace, evidence: dict[str, Any]) -> int:
    text = json.dumps(evidence, indent=2, sort_keys=True)
    if args.output is not None:
        client.write_output(args.output, (text + "\n").encode())
        print(f"deep-quote evidence written to {args.output}", file=sys.stderr)
        return 0
    print(text)
    return 0


def cmd_quote(args: argparse.Namespace) -> int:
    ev = client.call(
        args,
        api.QuoteDeep(
            uuid=client.vtpm_uuid(args.deep),
            nonce=_nonce(args.nonce),
            pcrs=tuple(parse_pcr_list(args.pcrs)) if args.pcrs else (),
            vtpm_pcrs=tuple(parse_pcr_list(args.vtpm_pcrs)) if args.vtpm_pcrs else (),
        ),
    )
    if args.json and args.output is None:
        return client.emit(args, ev, "")
    return _write(args, ev.to_json())


def cmd_guest_quote(args: argparse.Namespace) -> int:
    # imported here: only this command needs the TSS
    from tpm2_pytss import TCTILdr  # noqa: PLC0415
    from tpm2_pytss.TSS2_Exception import TSS2_Exception  # noqa: PLC0415

    name, _, conf = args.tcti.partition(":")
    command = vendor.command(
        _nonce(args.nonce),
        parse_pcr_list(args.pcrs) if args.pcrs else [],
        parse_pcr_list(args.vtpm_pcrs) if args.vtpm_pcrs else [],
    )
    try:
        tcti = TCTILdr(name, conf or None)
        try:
            tcti.transmit(command)
            response = bytes(tcti.receive())
        finally:
            tcti.finalize()
    except TSS2_Exception as e:
        raise ManagerError(f"talking to the vTPM over {args.tcti} failed: {e}") from None
    try:
        evidence = decode_evidence(vendor.parse_response(response))
    except (TpmResponseError, ValueError) as e:
        raise ManagerError(str(e)) from None
    return _write(args, evidence.to_json())
