"""`vtpm group ...`: groups, their owner key, owner-signed changes, and attestation (the
provisioning bundle, credential activation)."""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from vtpm.cli import client
from vtpm.errors import ConfigError
from vtpm.tpm.policy import PcrState, check_pcrs
from vtpm.wire import admin as api
from vtpm.wire import typedjson


def _ownerreq() -> ModuleType:
    # imported on use: every `vtpm` process, each vTPM instance among them, loads this module
    from vtpm.manager import ownerreq  # noqa: PLC0415

    return ownerreq


def parse_pcr_list(text: str) -> list[int]:
    """`0,1,2` or `0-7` or a mix."""
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise ConfigError(f"PCR list {text!r}: expected e.g. 0,1,2 or 0-7") from None
    return list(check_pcrs(out))


def parse_state(text: str) -> PcrState:
    """`PCR=HEX,PCR=HEX...` (SHA-256 values)."""
    values: dict[int, bytes] = {}
    try:
        for part in text.split(","):
            pcr, _, value = part.partition("=")
            values[int(pcr)] = bytes.fromhex(value)
    except ValueError:
        raise ConfigError(f"PCR state {text!r}: expected PCR=HEX[,PCR=HEX...]") from None
    check_pcrs(list(values))
    return PcrState.from_values(values)


def register(sub: Any) -> None:
    grp = sub.add_parser(
        "group",
        help="groups of vTPMs and their trust",
        description="A group has its own key sealed to the hardware TPM, its permitted host PCR "
        "states and vTPM labels, and an owner whose signature alone can change them.",
    )
    gsub = grp.add_subparsers(dest="group_command", metavar="ACTION")
    gsub.required = True

    new = gsub.add_parser(
        "new",
        help="create a group permitting the host's current PCR state",
        description="Create a group. Its key is sealed to the hardware TPM under the current "
        "values of --pcrs (SHA-256 bank), or an owner-approved later state.",
    )
    new.add_argument("name")
    new.add_argument(
        "--owner-key",
        type=Path,
        required=True,
        metavar="PEM",
        help="the owner's ECDSA P-256 public (or private) key, PEM",
    )
    new.add_argument("--pcrs", default="0-7", help="host PCRs the group is sealed to (default 0-7)")
    new.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="LABEL",
        help="permitted vTPM label (user:role:type; user may be *); repeatable",
    )
    new.add_argument(
        "--ak",
        choices=("ecc", "rsa"),
        default="ecc",
        help="the group's attestation key on the hardware TPM: ECC P-256 (default) or RSA 2048",
    )
    client.add_common(new)
    new.set_defaults(func=cmd_new)

    lst = gsub.add_parser("list", help="list groups", description="List groups and their state.")
    client.add_common(lst)
    lst.set_defaults(func=cmd_list)

    show = gsub.add_parser("show", help="one group in full", description="Show one group.")
    show.add_argument("group", help="name or uuid")
    client.add_common(show)
    show.set_defaults(func=cmd_show)

    dele = gsub.add_parser(
        "del",
        help="delete an empty group",
        description="Delete a group that has no vTPMs; its sealed key is erased.",
    )
    dele.add_argument("group", help="name or uuid")
    client.add_common(dele)
    dele.set_defaults(func=cmd_del)

    keygen = gsub.add_parser(
        "keygen",
        help="make an owner key pair",
        description="Write a new ECDSA P-256 owner private key (PEM, 0600) and its public key "
        "beside it as PATH.pub. Keep the private key off the host.",
    )
    keygen.add_argument("path", type=Path)
    keygen.add_argument("--json", action="store_true", help="machine-readable output")
    keygen.set_defaults(func=cmd_keygen)

    sign = gsub.add_parser(
        "sign",
        help="make an owner-signed change request",
        description="Build the group's new PCR states and labels from its current ones and the "
        "changes given, and sign them with the owner's private key (with the next sequence "
        "number). Submit the result with `vtpm group update`.",
    )
    sign.add_argument("group", help="name or uuid")
    sign.add_argument(
        "--key", type=Path, required=True, metavar="PEM", help="the owner's private key"
    )
    sign.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        metavar="JSON",
        help="the group as `vtpm group show --json` printed it (sign offline)",
    )
    sign.add_argument(
        "--seq", type=int, default=None, help="sequence number (default: the group's + 1)"
    )
    sign.add_argument(
        "--add-current",
        action="store_true",
        help="permit the host's current values of the group's PCRs (asks the Manager)",
    )
    sign.add_argument(
        "--pcrs",
        default=None,
        help="PCRs for --add-current (default: those of the group's first state)",
    )
    sign.add_argument(
        "--add-state",
        action="append",
        default=[],
        metavar="PCR=HEX,...",
        help="permit a state given as values; repeatable",
    )
    sign.add_argument(
        "--remove-state",
        action="append",
        type=int,
        default=[],
        metavar="INDEX",
        help="stop permitting the state at INDEX (as `group show` numbers them)",
    )
    sign.add_argument("--add-label", action="append", default=[], metavar="LABEL")
    sign.add_argument("--remove-label", action="append", default=[], metavar="LABEL")
    sign.add_argument(
        "-o", "--output", type=Path, default=None, help="write the request here (default stdout)"
    )
    client.add_common(sign, json_output=False)
    sign.set_defaults(func=cmd_sign)

    update = gsub.add_parser(
        "update",
        help="apply an owner-signed change request",
        description="Submit a request made by `vtpm group sign`. The Manager checks the owner's "
        "signature and the sequence number, applies it, and re-seals (or unlocks) the group.",
    )
    update.add_argument("group", help="name or uuid")
    update.add_argument("request", type=Path)
    client.add_common(update)
    update.set_defaults(func=cmd_update)
    _register_attestation(gsub)


def _register_attestation(gsub: Any) -> None:
    prov = gsub.add_parser(
        "provision",
        help="the group's provisioning bundle for verifiers",
        description="Print (or write) the group's provisioning bundle: the group, its "
        "attestation key, the hardware TPM's EK and EK certificate, and a quote by the AK of "
        "the group's configuration. A verifier checks it once and then trusts deep quotes.",
    )
    prov.add_argument("group", help="name or uuid")
    prov.add_argument(
        "-o", "--output", type=Path, default=None, help="write the bundle here (default stdout)"
    )
    client.add_common(prov)
    prov.set_defaults(func=cmd_provision)

    act = gsub.add_parser(
        "activate",
        help="prove the group's AK and the EK share a TPM (ActivateCredential)",
        description="Recover the secret a verifier encrypted with TPM2_MakeCredential to the "
        "hardware TPM's EK and the group's AK name, and print it (hex).",
    )
    act.add_argument("group", help="name or uuid")
    act.add_argument(
        "--credential-blob",
        type=Path,
        required=True,
        metavar="FILE",
        help="marshalled TPM2B_ID_OBJECT, or tpm2_makecredential's output file (which holds "
        "the encrypted secret too)",
    )
    act.add_argument(
        "--encrypted-secret",
        type=Path,
        default=None,
        metavar="FILE",
        help="marshalled TPM2B_ENCRYPTED_SECRET",
    )
    client.add_common(act)
    act.set_defaults(func=cmd_activate)


def _describe(g: api.GroupView) -> str:
    s = g.status
    lines = [
        f"group {g.name}  uuid {g.uuid}",
        f"  status: {'unlocked' if s.unlocked else 'LOCKED: ' + s.reason}",
        f"  sequence {g.seq}, owner-approved states: {'yes' if g.owner_approved else 'no'}",
        f"  approval epoch: {_epoch_text(g)}",
        f"  attestation key: {(g.ak or 'none yet (made on first need)').upper()}",
        f"  labels: {', '.join(g.labels) or '(none)'}",
        f"  vTPMs: {g.vtpms}",
        "  permitted host PCR states (SHA-256):",
    ]
    for i, st in enumerate(g.pcr_states):
        mark = " (current)" if s.matched_state == i else ""
        lines.append(f"    #{i}{mark}")
        for index, value in zip(st.pcrs, st.values, strict=True):
            lines.append(f"      PCR {index:2d} {value.hex()}")
    for pcr, now in s.differing_pcrs.items():
        lines.append(f"  host PCR {pcr} is now {now}")
    return "\n".join(lines)


def _epoch_text(g: api.GroupView) -> str:
    e = g.approval_epoch
    if e is None:
        return "none (approvals not revocable by the TPM yet)"
    return f"{e.value} (NV counter 0x{e.nv:08x}; the next request approves {e.value + 1})"


def cmd_new(args: argparse.Namespace) -> int:
    key = _ownerreq().load_public_key(_read(args.owner_key, private_ok=True))
    g = client.call(
        args,
        api.GroupNew(
            name=args.name,
            owner_pub=_ownerreq().public_pem(key).decode(),
            pcrs=tuple(parse_pcr_list(args.pcrs)),
            labels=tuple(args.label),
            ak=args.ak,
        ),
    )
    return client.emit(args, g, _describe(g))


def _read(path: Path, *, private_ok: bool = False) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    if private_ok and b"PRIVATE KEY" in data:
        pem: bytes = _ownerreq().public_pem(_ownerreq().load_private_key(path))
        return pem
    return data


def cmd_list(args: argparse.Namespace) -> int:
    groups = client.call(args, api.GroupList())
    rows = [
        [
            g.name,
            str(g.uuid),
            "unlocked" if g.status.unlocked else "LOCKED",
            str(g.vtpms),
            str(len(g.pcr_states)),
            ",".join(g.labels),
        ]
        for g in groups
    ]
    text = client.table(rows, ["NAME", "UUID", "STATUS", "VTPMS", "STATES", "LABELS"])
    return client.emit(args, groups, text)


def cmd_show(args: argparse.Namespace) -> int:
    g = client.call(args, api.GroupShow(args.group))
    return client.emit(args, g, _describe(g))


def cmd_del(args: argparse.Namespace) -> int:
    client.call(args, api.GroupDel(args.group))
    return client.emit(args, None, f"group {args.group} deleted")


def cmd_keygen(args: argparse.Namespace) -> int:
    key = _ownerreq().generate_private_key(args.path)
    pub_path = args.path.with_name(args.path.name + ".pub")
    pub_path.write_bytes(_ownerreq().public_pem(key))
    return client.emit(
        args,
        {"private_key": str(args.path), "public_key": str(pub_path)},
        f"owner key written to {args.path} (0600); public key {pub_path}",
    )


def cmd_sign(args: argparse.Namespace) -> int:
    key = _ownerreq().load_private_key(args.key)
    if args.source is not None:
        try:
            raw = json.loads(_read(args.source))
        except ValueError:
            raise ConfigError(f"{args.source} is not JSON") from None
        doc = raw.get("result", raw) if isinstance(raw, dict) else None
        try:
            g = typedjson.decode(doc, api.GroupView, str(args.source))
        except typedjson.DecodeError as e:
            raise ConfigError(f"{args.source} does not describe a group: {e}") from None
    else:
        g = client.call(args, api.GroupShow(args.group))
    states = list(g.pcr_states)
    labels = list(g.labels)
    group_uuid = g.uuid
    seq = g.seq + 1 if args.seq is None else args.seq
    for index in sorted(set(args.remove_state), reverse=True):
        if not 0 <= index < len(states):
            raise ConfigError(f"--remove-state {index}: the group has states 0..{len(states) - 1}")
        del states[index]
    if args.add_current:
        pcrs = (
            parse_pcr_list(args.pcrs) if args.pcrs else list(states[0].pcrs if states else range(8))
        )
        values = client.call(args, api.PcrsRead(tuple(pcrs)))
        states.append(PcrState.from_values({int(k): bytes.fromhex(v) for k, v in values.items()}))
    states += [parse_state(s) for s in args.add_state]
    labels = [x for x in labels if x not in args.remove_label]
    labels += [x for x in args.add_label if x not in labels]
    if not states:
        raise ConfigError("the request would leave the group with no permitted PCR state")
    # the epoch this request will open: once applied, the TPM refuses every earlier approval
    epoch = None if g.approval_epoch is None else g.approval_epoch.next()
    request = _ownerreq().sign_request(key, group_uuid, seq, states, labels, epoch)
    if args.output is None:
        sys.stdout.write(request.decode() + "\n")
    else:
        args.output.write_bytes(request)
        print(
            f"signed request for group {g.name} (sequence {seq}, "
            f"{'' if epoch is None else f'epoch {epoch.value}, '}"
            f"{len(states)} state(s), {len(labels)} label(s)) written to {args.output}",
            file=sys.stderr,
        )
    return 0


def cmd_update(args: argparse.Namespace) -> int:
    request = _read(args.request).decode(errors="replace")
    g = client.call(args, api.GroupUpdate(args.group, request))
    return client.emit(args, g, _describe(g))


def cmd_provision(args: argparse.Namespace) -> int:
    bundle = client.call(args, api.GroupProvision(args.group))
    doc = json.dumps(bundle.to_json(), indent=2, sort_keys=True)
    if args.output is not None:
        client.write_output(args.output, (doc + "\n").encode())
        ek = "with" if bundle.ek_certificate else "without"
        text = (
            f"bundle of group {bundle.group.get('name')} ({bundle.ak_alg.upper()} AK, "
            f"EK {ek} certificate) written to {args.output}"
        )
        return client.emit(args, bundle, text)
    return client.emit(args, bundle, doc)


_TOOLS_MAGIC = 0xBADCC0DE  # tpm2_makecredential's output: magic, version 1, ID object, secret


def _split_tools_credential(data: bytes) -> tuple[bytes, bytes] | None:
    if len(data) < 8 or struct.unpack(">II", data[:8]) != (_TOOLS_MAGIC, 1):
        return None
    body = data[8:]
    if len(body) < 2:
        raise ConfigError("the credential file is truncated")
    end = 2 + struct.unpack(">H", body[:2])[0]
    return body[:end], body[end:]


def cmd_activate(args: argparse.Namespace) -> int:
    blob = _read(args.credential_blob)
    split = _split_tools_credential(blob)
    if split is not None:
        if args.encrypted_secret is not None:
            raise ConfigError(
                f"{args.credential_blob} holds the encrypted secret already; drop "
                "--encrypted-secret"
            )
        blob, secret = split
    elif args.encrypted_secret is None:
        raise ConfigError("--encrypted-secret FILE is needed with a TPM2B_ID_OBJECT blob")
    else:
        secret = _read(args.encrypted_secret)
    out = client.call(args, api.GroupActivate(args.group, blob, secret))
    return client.emit(args, out, out.secret.hex())
