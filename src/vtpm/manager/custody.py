"""Key custody: the Manager's side of each instance's link (protocol in `vtpm.wire.ipc`).

The Manager knows which vTPM is on a link because it made the socketpair when it spawned the
instance; nothing the instance says changes that. It releases the state key only when:
1. the instance's Hello names the link's own vTPM, and only once per link;
2. the vTPM and its group exist;
3. the vTPM's label is of a type the Manager serves (`vtpm_t`) and the group permits it;
4. the group is unlocked in the current host state (the PCRs are read afresh) and the key
   unwraps under the group key;
5. the vTPM is not open on another link (a vTPM runs at most once);
6. a front-door vTPM with a secret (`vtpm.manager.statesecret`) has that secret held by the
   front-door connection that started it, and it matches; the key granted is then the state
   key mixed with the secret.
1-3 need no TPM (`policy_refusal`, unit-tested); 4 is the hardware TPM's; 5 is `Links.open`.
Every refusal is audited and logged. After the grant, every state write is recorded before it
is acknowledged; the recorded digests decide, at the next start, which blob is current. The
instance's reports of its TPM's health (`TpmHealth`) go to the supervisor, for `vtpm status`.
Its requests for EK and platform certificates (`CertRequest`, when it provisions its EKs) go
to the injected `issue` (the group CA), for the link's own vTPM only.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from vtpm import labels as lbl
from vtpm.errors import RemoteProtocolError, VtpmError
from vtpm.manager.groups import GroupKeys
from vtpm.manager.links import InstanceLink, Links
from vtpm.manager.statesecret import Secrets, matches, mixed_key
from vtpm.manager.store import GroupRecord, Store, VtpmRecord
from vtpm.serving import Codec, ConnectionLostError, events
from vtpm.wire import ipc

log = logging.getLogger(__name__)

# answers a deep quote the guest asked for through its vTPM: the evidence, compact binary
GuestQuote = Callable[[uuid.UUID, ipc.QuoteRequest], bytes]
# issues the vTPM's certificate of a kind (`ektemplates.CERT_KINDS`) for an EK public area
# (TPM2B_PUBLIC): the DER; the group CA's `GroupCa.issue`, wired by `service`
Issue = Callable[[uuid.UUID, str, bytes], bytes]
# called when the instance on a link reports that it serves
Ready = Callable[[], None]
# called when the instance reports that its TPM cannot serve (the reason) or serves again ("")
Health = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Grant:
    key: bytes
    digests: tuple[tuple[str, bytes], ...]


def group_permits(g: GroupRecord, label: lbl.Label) -> bool:
    """Whether group `g`'s label rules admit `label` (the label rule of `vtpm.labels`)."""
    return lbl.group_permits(label, lbl.permitted_digests(g.labels))


def policy_refusal(
    link_uuid: uuid.UUID,
    hello: ipc.Hello,
    granted: bool,
    rec: VtpmRecord | None,
    g: GroupRecord | None,
) -> str:
    """Why checks 1-3 refuse the key (they need no TPM), or ""."""
    if granted or hello.vtpm_uuid != link_uuid:
        return "this link belongs to another vTPM"
    if rec is None:
        return "unknown vTPM"
    if g is None:
        return "the vTPM's group does not exist"
    label = lbl.Label.parse(rec.label)
    if not lbl.manager_accepts(label):
        return f"the Manager serves only labels of type vtpm_t, not {label.type}"
    if not group_permits(g, label):
        return f"group {g.name} does not permit label {label}"
    return ""


class KeyCustody:
    """Serves key-custody links (the supervisor runs `serve` in a thread per instance)."""

    def __init__(
        self,
        store: Store,
        groups: GroupKeys,
        links: Links,
        guest_quote: GuestQuote,
        issue: Issue,
        secrets: Secrets | None = None,
    ) -> None:
        self._secrets = secrets or Secrets()
        self._store = store
        self._groups = groups
        self._links = links
        self._guest_quote = guest_quote
        self._issue = issue

    def serve(
        self, vtpm_uuid: uuid.UUID, sock: socket.socket, ready: Ready, health: Health
    ) -> None:
        link = InstanceLink(sock)
        codec: Codec[ipc.Event] = link.codec
        granted = False
        try:
            for ev in events(sock, codec):
                if isinstance(ev, ipc.Hello):
                    reply: ipc.ManagerEvent | None = self._hello(vtpm_uuid, ev, granted, link)
                    granted = granted or isinstance(reply, ipc.KeyGrant)
                elif not granted:
                    reply = ipc.Refused("say Hello first")
                else:
                    reply = self._after_grant(vtpm_uuid, link, ev, ready, health)
                if reply is not None:
                    link.send(reply)
        except RemoteProtocolError as e:
            log.error("vTPM %s: key-custody link dropped: %s", vtpm_uuid, e)
        except (ConnectionLostError, OSError) as e:
            log.info("vTPM %s: key-custody link closed: %s", vtpm_uuid, e)
        finally:
            link.closed()
            if granted:
                self._links.close(vtpm_uuid, link)

    # the grant ----------------------------------------------------------------------------

    def _hello(
        self, vtpm_uuid: uuid.UUID, hello: ipc.Hello, granted: bool, link: InstanceLink
    ) -> ipc.ManagerEvent:
        decision = self.decide(vtpm_uuid, hello, granted, link)
        if isinstance(decision, str):
            target = str(vtpm_uuid)
            self._store.audit("instance", "key.release", target, "refused", {"why": decision})
            log.warning("vTPM %s: key not released: %s", vtpm_uuid, decision)
            return ipc.Refused(decision)
        log.info("vTPM %s: state key released to its instance", vtpm_uuid)
        return ipc.KeyGrant(decision.key, decision.digests)

    def decide(
        self, vtpm_uuid: uuid.UUID, hello: ipc.Hello, granted: bool, link: InstanceLink
    ) -> Grant | str:
        """The grant, or the reason for refusing it (see the module's rules)."""
        rec = self._store.vtpm(vtpm_uuid)
        g = None if rec is None else self._store.group(str(rec.group_uuid))
        why = policy_refusal(vtpm_uuid, hello, granted, rec, g)
        if why:
            return why
        assert rec is not None and g is not None
        self._groups.refresh()
        if not self._groups.status(g.uuid).unlocked:
            return f"group {g.name} is locked: {self._groups.status(g.uuid).reason}"
        try:
            key = self._groups.unwrap_state_key(g.uuid, vtpm_uuid, rec.wrapped_key)
        except VtpmError as e:
            return str(e)
        loc = self._store.location(vtpm_uuid)
        if loc is not None and loc.secret_check:
            secret = self._secrets.get(vtpm_uuid)
            if secret is None:
                return "the vTPM's state needs its secret, which only its front door brings"
            if not matches(key, secret, loc.secret_check):
                return "the vTPM's secret does not match"
            key = mixed_key(key, secret)
        if not self._links.open(vtpm_uuid, link):
            return "the vTPM is open already (a vTPM runs at most once)"
        digests = tuple((d.name, d.digest) for d in self._store.state_digests(vtpm_uuid))
        return Grant(key, digests)

    # after the grant ------------------------------------------------------------------------

    def _after_grant(
        self, vtpm_uuid: uuid.UUID, link: InstanceLink, ev: ipc.Event, ready: Ready, health: Health
    ) -> ipc.ManagerEvent | None:
        """What an instance said after its Hello; the answer, if one is due now."""
        if isinstance(ev, ipc.StateWritten):
            self._store.record_state(vtpm_uuid, ev.name, ev.counter, ev.digest)
            return ipc.Ack()
        if isinstance(ev, ipc.StateDeleted):
            self._store.forget_state(vtpm_uuid, ev.name)
            return ipc.Ack()
        if isinstance(ev, ipc.CertRequest):
            return self._certificate(vtpm_uuid, ev)
        if isinstance(ev, ipc.QuoteRequest):  # answered from its own thread when quoted
            threading.Thread(
                target=self._quote_for_guest,
                args=(vtpm_uuid, link, ev),
                name=f"quote-{vtpm_uuid}",
                daemon=True,
            ).start()
        elif isinstance(ev, ipc.PcrReply):
            link.pcr_replies.put(ev)
        elif isinstance(ev, ipc.Ready):
            ready()
        elif isinstance(ev, ipc.TpmHealth):
            # the instance's words end on an administrator's terminal: printable only
            reason = "".join(c if c.isprintable() else "?" for c in ev.reason)
            if ev.failed:
                log.error("vTPM %s: its TPM cannot serve: %s", vtpm_uuid, reason)
            else:
                log.warning("vTPM %s: its TPM serves again", vtpm_uuid)
            health(reason or "unknown failure" if ev.failed else "")
        elif isinstance(ev, ipc.Goodbye):
            log.info("vTPM %s: instance stopped in order", vtpm_uuid)
        else:
            raise RemoteProtocolError(f"{type(ev).__name__} on a key-custody link")
        return None

    def _certificate(self, vtpm_uuid: uuid.UUID, req: ipc.CertRequest) -> ipc.ManagerEvent:
        """The instance provisions its EKs (`instance.ekprov`): the CA's certificate, or why
        not. Only the link's own vTPM is certified (the link says which vTPM it is)."""
        try:
            der = self._issue(vtpm_uuid, req.kind, req.ek_public)
            reply: ipc.ManagerEvent = ipc.CertReply(der)
        except VtpmError as e:
            log.warning("vTPM %s: %s certificate refused: %s", vtpm_uuid, req.kind, e)
            self._store.audit("instance", "vtpm.cert", str(vtpm_uuid), "refused", {"why": str(e)})
            return ipc.Refused(str(e).encode()[: ipc.MAX_REASON].decode(errors="ignore"))
        self._store.audit("instance", "vtpm.cert", str(vtpm_uuid), "ok", {"kind": req.kind})
        log.info("vTPM %s: %s certificate issued", vtpm_uuid, req.kind)
        return reply

    def _quote_for_guest(
        self, vtpm_uuid: uuid.UUID, link: InstanceLink, req: ipc.QuoteRequest
    ) -> None:
        try:
            reply: ipc.ManagerEvent = ipc.QuoteReply(self._guest_quote(vtpm_uuid, req))
        except VtpmError as e:
            log.warning("vTPM %s: deep quote for the guest refused: %s", vtpm_uuid, e)
            reply = ipc.Refused(str(e).encode()[: ipc.MAX_REASON].decode(errors="ignore"))
        with contextlib.suppress(OSError):
            link.send(reply)
