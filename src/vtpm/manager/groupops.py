"""Group operations an administrator asks for, each audited: create, update by an owner-signed
request, delete, and the group's attestation (provisioning bundle, host quotes by its AK,
credential activation). The keys and seals themselves are `vtpm.manager.groups.GroupKeys`';
the group CA is `vtpm.manager.ca.GroupCa`'s, made with the group (and, for a group from before
CAs, at its first provisioning while it is unlocked).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from vtpm.errors import ManagerError, VtpmError
from vtpm.manager import lookup, provision
from vtpm.manager.ca import GroupCa
from vtpm.manager.groups import GroupKeys
from vtpm.manager.store import GroupRecord, Store
from vtpm.wire.evidence import Bundle, SignedQuote

log = logging.getLogger(__name__)


class GroupOps:
    def __init__(self, store: Store, groups: GroupKeys, ca: GroupCa | None = None) -> None:
        self._store = store
        self._groups = groups
        self._ca = ca if ca is not None else GroupCa(store, groups)

    def new(
        self,
        name: str,
        owner_pem: bytes,
        pcrs: Sequence[int],
        labels: Sequence[str],
        actor: str,
        ak_alg: str = "ecc",
    ) -> GroupRecord:
        g = self._groups.create(name, owner_pem, pcrs, labels, ak_alg)
        try:
            g = self._ca.ensure(g)  # unlocked: it was just made
        except VtpmError as e:  # the group works without; its first provisioning tries again
            log.warning("group %s (%s): no CA yet: %s", name, g.uuid, e)
        detail: dict[str, object] = {
            "name": name,
            "pcrs": list(pcrs),
            "labels": list(labels),
            "ak": ak_alg,
        }
        self._store.audit(actor, "group.new", str(g.uuid), "ok", detail)
        return g

    def update(self, ref: str, request: bytes, actor: str) -> GroupRecord:
        g = lookup.group(self._store, ref)
        try:
            new = self._groups.apply_owner_request(g, request)
        except VtpmError as e:
            self._store.audit(actor, "group.update", str(g.uuid), "refused", {"why": str(e)})
            raise
        detail: dict[str, object] = {
            "seq": new.seq,
            "states": len(new.pcr_states),
            "labels": list(new.labels),
        }
        self._store.audit(actor, "group.update", str(g.uuid), "ok", detail)
        return new

    def delete(self, ref: str, actor: str) -> None:
        g = lookup.group(self._store, ref)
        self._store.delete_group(g.uuid)
        self._groups.forget(g.uuid)
        self._store.audit(actor, "group.del", str(g.uuid), "ok", {"name": g.name})

    # attestation (vtpm.manager.attestation, vtpm.manager.provision) -------------------------

    def provision(self, ref: str) -> Bundle:
        """The group's provisioning bundle (its AK is made now if it has none yet, its CA too
        if the group is unlocked; a locked group without a CA gets a bundle without one)."""
        g = self._groups.ensure_ak(lookup.group(self._store, ref))
        try:
            g = self._ca.ensure(g)
        except ManagerError as e:
            log.warning("group %s: provisioning bundle without a CA: %s", g.name, e)
        manager_uuid = self._store.meta("manager_uuid") or ""
        return provision.build_bundle(g, self._groups.attestation, manager_uuid)

    def host_quote(
        self, group_uuid: uuid.UUID, qualifying_data: bytes, pcrs: Sequence[int]
    ) -> SignedQuote:
        """TPM2_Quote of the host `pcrs` by the group's AK (thread-safe)."""
        g = self._groups.ensure_ak(lookup.group(self._store, str(group_uuid)))
        return self._groups.attestation.quote(self._groups.ak(g), qualifying_data, pcrs)

    def activate_credential(
        self, ref: str, credential_blob: bytes, encrypted_secret: bytes, *, actor: str
    ) -> bytes:
        """The secret a verifier sealed to the EK and the group's AK name (MakeCredential);
        SealError, opaque, when the TPM refuses."""
        g = self._groups.ensure_ak(lookup.group(self._store, ref))
        try:
            secret = self._groups.attestation.activate_credential(
                self._groups.ak(g), credential_blob, encrypted_secret
            )
        except VtpmError as e:
            self._store.audit(actor, "group.activate", str(g.uuid), "refused", {"why": str(e)})
            raise
        self._store.audit(actor, "group.activate", str(g.uuid), "ok", {})
        return secret
