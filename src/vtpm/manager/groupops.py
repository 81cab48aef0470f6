"""Group operations an administrator asks for, each audited: create, update by an owner-signed
request, delete, and the group's attestation (provisioning bundle, host quotes by its AK,
credential activation). The keys and seals themselves are `vtpm.manager.groups.GroupKeys`'.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from vtpm.errors import VtpmError
from vtpm.manager import lookup, provision
from vtpm.manager.groups import GroupKeys
from vtpm.manager.store import GroupRecord, Store
from vtpm.wire.evidence import Bundle, SignedQuote


class GroupOps:
    def __init__(self, store: Store, groups: GroupKeys) -> None:
        self._store = store
        self._groups = groups

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
        """The group's provisioning bundle (its AK is made now if it has none yet)."""
        g = self._groups.ensure_ak(lookup.group(self._store, ref))
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
