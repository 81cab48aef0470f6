"""`vtpm new|list|show|del|start|stop|accept-state|status|audit`: vTPMs held by the Manager."""

from __future__ import annotations

import argparse
import uuid
from typing import Any

from vtpm.cli import client
from vtpm.cli.ek_cmd import parse_eks
from vtpm.endpoints import Endpoint, Frontend, FrontendKind
from vtpm.wire import admin as api

_ID = client.bounded_int(api.Id)


def _owner(text: str) -> tuple[int, int]:
    uid, sep, gid = text.partition(":")
    try:
        return _ID(uid), _ID(gid) if sep else _ID(uid)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"UID[:GID]: {e}") from None


def register(sub: Any) -> None:
    new = sub.add_parser(
        "new",
        help="create a vTPM in a group",
        description="Create a vTPM: a fresh state key, wrapped under the group's key. Frontends "
        "as for `vtpm instance run` (unix:PATH, tcp:PORT, tcp:HOST:PORT); without any, a "
        "control socket for QEMU under the data directory's run/.",
    )
    new.add_argument("--group", required=True, help="group name or uuid")
    new.add_argument("--label", required=True, help="security label user:role:type")
    new.add_argument("--tpm", choices=["2.0", "1.2"], default="2.0")
    new.add_argument("--uuid", type=uuid.UUID, default=None)
    new.add_argument(
        "--owner",
        type=_owner,
        default=None,
        metavar="UID[:GID]",
        help="owner of the frontend sockets (GID given: mode 0660)",
    )
    new.add_argument(
        "--ctrl",
        action="append",
        default=[],
        metavar="SOCKET",
        help="swtpm-compatible control channel (QEMU -tpmdev emulator)",
    )
    new.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="SOCKET",
        help="raw TPM socket (tcti swtpm)",
    )
    new.add_argument(
        "--mssim",
        action="append",
        default=[],
        metavar="tcp:[HOST:]PORT",
        help="Microsoft simulator protocol (tcti mssim), ports PORT and PORT+1",
    )
    new.add_argument(
        "--ek",
        type=parse_eks,
        default=api.DEFAULT_EKS,
        metavar="KINDS",
        help="EKs provisioned at its first start, comma-separated: rsa2048, ecc256, ecc384, "
        f"platform (a platform certificate), or none (default {','.join(api.DEFAULT_EKS)}; "
        "TPM 1.2: none)",
    )
    new.add_argument("--start", action="store_true", help="start it at once")
    client.add_common(new)
    new.set_defaults(func=cmd_new)

    lst = sub.add_parser("list", help="list vTPMs", description="List vTPMs.")
    lst.add_argument("--group", default=None, help="only this group's")
    client.add_common(lst)
    lst.set_defaults(func=cmd_list)

    for name, helptext, func in (
        ("show", "one vTPM in full", cmd_show),
        ("start", "start a vTPM's instance (stays running across Manager restarts)", cmd_start),
        ("stop", "stop a vTPM's instance (state stored)", cmd_stop),
        ("del", "delete a vTPM: its key and state are erased", cmd_del),
    ):
        p = sub.add_parser(
            name, help=helptext, description=helptext[0].upper() + helptext[1:] + "."
        )
        p.add_argument("uuid")
        client.add_common(p)
        p.set_defaults(func=func)

    accept = sub.add_parser(
        "accept-state",
        help="accept, once, the state on disk that the Manager does not record",
        description="At the vTPM's next start, accept the state blobs on disk that open under "
        "its key but are not the ones the Manager recorded (an older copy put back on purpose: "
        "what the TPM held after it is lost), and record them. Audited.",
    )
    accept.add_argument("uuid")
    client.add_common(accept)
    accept.set_defaults(func=cmd_accept_state)

    status = sub.add_parser(
        "status", help="running state of vTPMs", description="Running state of one vTPM or all."
    )
    status.add_argument("uuid", nargs="?", default=None)
    client.add_common(status)
    status.set_defaults(func=cmd_status)

    audit = sub.add_parser(
        "audit",
        help="the Manager's audit log",
        description="Administrative changes, accepted and refused.",
    )
    audit.add_argument("--limit", type=client.bounded_int(api.Limit), default=50)
    client.add_common(audit)
    audit.set_defaults(func=cmd_audit)


def _describe(v: api.VtpmView) -> str:
    run = v.run
    lines = [
        f"vTPM {v.uuid}",
        f"  group {v.group}, label {v.label}, TPM {v.tpm}",
        f"  state: {run.state}"
        + (f" (pid {run.pid})" if run.pid else "")
        + (f": {run.failed}" if run.failed else "")
        + (f", TPM failed: {run.tpm_failed}" if run.tpm_failed else ""),
        f"  frontends: {', '.join(str(f) for f in v.frontends)}",
        f"  state dir: {v.state_dir}",
    ]
    if v.owner_uid is not None:
        lines.append(f"  socket owner: {v.owner_uid}:{v.owner_gid}")
    for name, digest in sorted(v.state_blobs.items()):
        lines.append(f"  {name}: sha256 {digest}")
    return "\n".join(lines)


def cmd_new(args: argparse.Namespace) -> int:
    frontends = [Frontend(FrontendKind.CTRL, Endpoint.parse(x)) for x in args.ctrl]
    frontends += [Frontend(FrontendKind.SERVER, Endpoint.parse(x)) for x in args.server]
    frontends += [Frontend(FrontendKind.MSSIM, Endpoint.parse(x)) for x in args.mssim]
    v = client.call(
        args,
        api.VtpmNew(
            group=args.group,
            label=args.label,
            tpm=args.tpm,
            uuid=args.uuid,
            owner_uid=None if args.owner is None else args.owner[0],
            owner_gid=None if args.owner is None else args.owner[1],
            frontends=tuple(frontends),
            start=args.start,
            eks=args.ek,
        ),
    )
    return client.emit(args, v, _describe(v))


def cmd_list(args: argparse.Namespace) -> int:
    vs = client.call(args, api.VtpmList(group=args.group))
    rows = [[str(v.uuid), v.group, v.label, v.tpm, v.run.state] for v in vs]
    return client.emit(args, vs, client.table(rows, ["UUID", "GROUP", "LABEL", "TPM", "STATE"]))


def cmd_show(args: argparse.Namespace) -> int:
    v = client.call(args, api.VtpmShow(client.vtpm_uuid(args.uuid)))
    return client.emit(args, v, _describe(v))


def cmd_start(args: argparse.Namespace) -> int:
    v = client.call(args, api.VtpmStart(client.vtpm_uuid(args.uuid)))
    return client.emit(args, v, f"vTPM {v.uuid} {v.run.state}")


def cmd_stop(args: argparse.Namespace) -> int:
    v = client.call(args, api.VtpmStop(client.vtpm_uuid(args.uuid)))
    return client.emit(args, v, f"vTPM {v.uuid} stopped, state stored")


def cmd_del(args: argparse.Namespace) -> int:
    u = client.vtpm_uuid(args.uuid)
    client.call(args, api.VtpmDel(u))
    return client.emit(args, {"uuid": str(u)}, f"vTPM {u} deleted: key and state erased")


def cmd_accept_state(args: argparse.Namespace) -> int:
    v = client.call(args, api.VtpmAcceptState(client.vtpm_uuid(args.uuid)))
    return client.emit(args, v, f"vTPM {v.uuid}: its next start accepts the state in {v.state_dir}")


def cmd_status(args: argparse.Namespace) -> int:
    if args.uuid is not None:
        return cmd_show(args)
    vs = client.call(args, api.VtpmList())
    rows = [
        [
            str(v.uuid),
            "running, TPM failed" if v.run.tpm_failed else v.run.state,
            str(v.run.pid or "-"),
            str(v.run.restarts),
            v.run.failed or v.run.tpm_failed,
        ]
        for v in vs
    ]
    text = client.table(rows, ["UUID", "STATE", "PID", "RESTARTS", "REASON"])
    return client.emit(args, vs, text)


def cmd_audit(args: argparse.Namespace) -> int:
    entries = client.call(args, api.Audit(limit=args.limit))
    rows = [[str(e.id), e.actor, e.action, e.target, e.outcome, e.detail] for e in entries]
    text = client.table(rows, ["ID", "ACTOR", "ACTION", "TARGET", "OUTCOME", "DETAIL"])
    return client.emit(args, entries, text)
