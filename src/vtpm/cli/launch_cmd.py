"""`vtpm launch`: a measured launch of a guest on a fresh vTPM, and its reference values.

    vtpm launch [UUID] (--kernel K [--initrd I] [--append CMDLINE] | --config guest.cfg)
                [--vtpm-label LABEL] [--qemu ARGS]... [--firmware FILE|default] [--no-guest]
    vtpm launch reference (--kernel K [--initrd I] [--append CMDLINE] | --config guest.cfg)
                -o expected.json [--bank sha256]

Order of a launch, so that a refusal leaves nothing behind: the files are read and measured and
QEMU and its firmware are found (nothing touched yet); the Manager checks the vTPM's label,
version and group (`vtpm.launch`; still nothing touched), then restarts the vTPM's instance with
the launch armed; only then is QEMU started. If QEMU does not come up, the launch is withdrawn
(`vtpm.launch.cancel`: the instance runs again without it) and no QEMU is left.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

from vtpm.cli import client
from vtpm.endpoints import FrontendKind
from vtpm.errors import ConfigError, LaunchError, VtpmError
from vtpm.launch import digests, guest
from vtpm.launchrecord import (
    LaunchRecord,
    Measurement,
    banks_of,
    digests_json,
    label_refusal,
    write_atomic,
)
from vtpm.platform import xlcfg
from vtpm.tpm.constants import HASH_NAMES, TPM_ALG
from vtpm.verify.eventlog import policy_entry
from vtpm.verify.expected import FORMAT as POLICY_FORMAT
from vtpm.wire import admin as api
from vtpm.wire import typedjson

REFERENCE = "reference"
BANKS_BY_NAME = {name: alg for alg, name in HASH_NAMES.items()}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "launch",
        help="measured launch: a guest on a fresh vTPM, kernel in PCR 4, cmdline+initrd in PCR 5",
        usage="vtpm launch [UUID] (--kernel K [--initrd I] [--append CMDLINE] | --config CFG) "
        "[--vtpm-label LABEL] [--qemu ARGS] [--no-guest]\n"
        "       vtpm launch reference (--kernel K ... | --config CFG) -o EXPECTED.json",
        description="Measured launch. The vTPM (a Manager's, by uuid) is restarted fresh; its "
        "instance extends the kernel's digest into PCR 4 and the command line's, then the "
        "initrd's into PCR 5 (SHA-1/256/384/512, every active bank) right after the guest's "
        "first TPM2_Startup(CLEAR), and logs each extend in a TCG event log beside the vTPM; "
        "then QEMU boots the guest attached to the vTPM's control socket. `vtpm launch "
        "reference` computes the expected PCR 4/5 values from the files alone and writes a "
        "policy for `vtpm verify`.",
    )
    p.add_argument(
        "target",
        nargs="?",
        default=None,
        metavar="UUID|reference",
        help="the vTPM (default: the uuid in the config's vtpm=[...] line), or `reference`",
    )
    p.add_argument("--kernel", type=Path, help="the guest kernel (measured into PCR 4)")
    p.add_argument("--initrd", type=Path, help="the initrd (measured into PCR 5)")
    p.add_argument(
        "--append",
        default=None,
        metavar="CMDLINE",
        help="the kernel command line (measured into PCR 5; default empty)",
    )
    p.add_argument(
        "--config",
        type=Path,
        help="xl-style guest config: kernel=, ramdisk=, extra= (or cmdline=), name=, memory=, "
        'vcpus=, vtpm=["uuid=..."]',
    )
    p.add_argument(
        "--vtpm-label",
        default=None,
        metavar="LABEL",
        help="refuse unless the vTPM's label is exactly LABEL (checked before anything changes)",
    )
    p.add_argument(
        "--qemu",
        action="append",
        default=[],
        metavar="ARGS",
        help='extra QEMU arguments, split like a shell would: --qemu "-serial file:con.log"; '
        "they come last, so they win where QEMU lets a later option replace an earlier one",
    )
    p.add_argument(
        "--firmware",
        default=str(guest.DEFAULT_FIRMWARE),
        metavar="FILE|default",
        help="QEMU firmware (default qboot, which measures nothing, so PCR 4/5 hold only the "
        "launch); `default` keeps QEMU's own (SeaBIOS, which adds its own PCR 4/5 events)",
    )
    p.add_argument(
        "--no-guest",
        action="store_true",
        help="prepare the vTPM only (fresh, measurements pending until the first "
        "TPM2_Startup(CLEAR)); start no QEMU",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="(reference) where to write the expected-values policy",
    )
    p.add_argument(
        "--bank",
        default="sha256",
        choices=sorted(BANKS_BY_NAME),
        help="(reference) the bank of the policy's PCR values (default sha256, the one deep "
        "quotes carry); the event list has every bank",
    )
    client.add_common(p)
    p.set_defaults(func=cmd_launch)


# arguments ----------------------------------------------------------------------------------


def _guest_files(args: argparse.Namespace) -> tuple[digests.GuestFiles, xlcfg.GuestConfig | None]:
    if args.config is not None:
        if args.kernel is not None or args.initrd is not None or args.append is not None:
            raise ConfigError("give --config or --kernel/--initrd/--append, not both")
        cfg = xlcfg.load(args.config)
        return digests.GuestFiles(cfg.kernel, cfg.ramdisk, cfg.cmdline), cfg
    if args.kernel is None:
        raise ConfigError("give the guest: --kernel K [--initrd I] [--append CMDLINE], or --config")
    return digests.GuestFiles(args.kernel, args.initrd, args.append or ""), None


def _vtpm_uuid(args: argparse.Namespace, cfg: xlcfg.GuestConfig | None) -> uuid.UUID:
    named = cfg.vtpm_uuid if cfg is not None else None
    if args.target is None:
        if named is None:
            raise ConfigError("name the vTPM: vtpm launch UUID ..., or vtpm=[...] in the config")
        return named
    try:
        u = uuid.UUID(args.target)
    except ValueError:
        raise ConfigError(f"{args.target!r} is not a vTPM uuid (or `reference`)") from None
    if named is not None and named != u:
        raise ConfigError(f"the config's vtpm line names {named}, not {u}")
    return u


def _describe(measurements: tuple[Measurement, ...], expected: dict[int, dict[int, bytes]]) -> str:
    lines = [
        f"  PCR {m.pcr} <- {m.event_data}  (sha256 {(m.digest(TPM_ALG.SHA256) or b'').hex()})"
        for m in measurements
    ]
    sha256 = expected.get(TPM_ALG.SHA256, {})
    lines += [f"  expected sha256 PCR {p}: {v.hex()}" for p, v in sorted(sha256.items())]
    return "\n".join(lines)


# reference ----------------------------------------------------------------------------------


def reference_policy(measurements: tuple[Measurement, ...], bank: str) -> dict[str, object]:
    """The `vtpm verify` policy: the bank's expected PCR 4/5 values and the launch's events."""
    banks = banks_of(measurements)
    expected = digests.expected_pcrs(measurements, banks)
    alg = BANKS_BY_NAME[bank]
    return {
        "format": POLICY_FORMAT,
        "vtpm_pcrs": digests_json({alg: expected[alg]}),
        "event_log": policy_entry([m.event(banks) for m in measurements]),
    }


def cmd_reference(args: argparse.Namespace) -> int:
    if args.output is None:
        raise ConfigError("vtpm launch reference needs -o EXPECTED.json")
    files, _cfg = _guest_files(args)
    measurements = digests.measure(files)
    policy = reference_policy(measurements, args.bank)
    try:
        write_atomic(args.output, (json.dumps(policy, indent=2) + "\n").encode(), 0o644)
    except OSError as e:
        raise ConfigError(f"cannot write {args.output}: {e.strerror}") from None
    expected = digests.expected_pcrs(measurements)
    text = f"wrote {args.output}\n{_describe(measurements, expected)}"
    return client.emit(args, {"output": str(args.output), "policy": policy}, text)


# launch -------------------------------------------------------------------------------------


def _ctrl_socket(view: api.VtpmView) -> Path:
    for f in view.frontends:
        if f.kind is FrontendKind.CTRL and f.endpoint.kind == "unix":
            return Path(f.endpoint.path)
    raise ConfigError(
        f"vTPM {view.uuid} has no ctrl=unix: frontend for QEMU's -tpmdev emulator "
        "(vtpm new gives one by default, or --ctrl unix:PATH)"
    )


def cmd_launch(args: argparse.Namespace) -> int:
    if args.target == REFERENCE:
        return cmd_reference(args)
    if args.output is not None:
        raise ConfigError("-o is for `vtpm launch reference`")
    files, cfg = _guest_files(args)
    vtpm_uuid = _vtpm_uuid(args, cfg)
    measurements = digests.measure(files)
    spec: guest.GuestSpec | None = None
    if not args.no_guest:
        spec = guest.GuestSpec(
            files=files,
            ctrl_socket=Path(),
            name=cfg.name if cfg is not None else None,
            memory=cfg.memory if cfg is not None else None,
            vcpus=cfg.vcpus if cfg is not None else None,
            firmware=None if args.firmware == "default" else Path(args.firmware),
            extra=guest.extra_args(args.qemu),
        )
        guest.check(spec)
        view = client.call(args, api.VtpmShow(vtpm_uuid))
        why = label_refusal(vtpm_uuid, view.label, args.vtpm_label)
        if why:  # first, before any other complaint; the Manager checks again
            raise LaunchError(f"launch refused: {why}")
        spec = dataclasses.replace(spec, ctrl_socket=_ctrl_socket(view))
    elif args.qemu:
        raise ConfigError("--qemu makes no sense with --no-guest")

    record = typedjson.encode(LaunchRecord(measurements))
    result = client.call(args, api.VtpmLaunch(vtpm_uuid, record, args.vtpm_label))
    placed = LaunchRecord.from_json(result.record)
    expected = digests.expected_pcrs(measurements)
    out: dict[str, Any] = {
        "vtpm": str(vtpm_uuid),
        "label": result.vtpm.label,
        "launch_file": result.launch_file,
        "event_log": str(placed.event_log),
        "measurements": [m.to_json() for m in measurements],
        "expected_pcrs": digests_json(expected),
        "guest": None,
    }
    text = (
        f"vTPM {vtpm_uuid}: measured launch armed, applied at each TPM2_Startup(CLEAR)\n"
        f"{_describe(measurements, expected)}\n  event log: {placed.event_log}"
    )
    if spec is not None:
        try:
            pid, argv = guest.start(spec)
        except LaunchError as e:
            try:
                client.call(args, api.VtpmLaunchCancel(vtpm_uuid))
            except VtpmError as again:
                raise LaunchError(f"{e} (and withdrawing the launch failed: {again})") from None
            raise
        out["guest"] = {"pid": pid, "argv": argv}
        text += f"\nguest started: QEMU pid {pid}"
    return client.emit(args, out, text)
