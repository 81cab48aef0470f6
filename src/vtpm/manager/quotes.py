"""Deep quotes: asked on the host (the Manager reads the running vTPM's PCRs over its link)
or by the guest through its vTPM (the PCR values come with the request).

The vTPM's uuid, group, label and EK name in the quoted DeepQuoteInfo come from the Manager's
records, never from the asker. The EK name is that of the vTPM's certified EK ("ek-rsa2048"
when it has one, else its first certified EK kind), so a verifier holding the EK certificate
can tie the quote to it; empty when the vTPM has no certified EK. The group must be
unlocked; the host PCRs default to those of the group's first permitted state. Batching is
`vtpm.manager.deepquote.DeepQuoter`'s.

Fail closed: a group found locked is checked again with a fresh PCR read (it may have been
locked only by a hardware TPM outage that is over); a hardware TPM known to be down refuses
at once. A quote refused for the guest is audited.
"""

from __future__ import annotations

import uuid

from vtpm.errors import LocalProtocolError, ManagerError, RequestError, VtpmError
from vtpm.manager import lookup
from vtpm.manager.deepquote import DeepQuoter
from vtpm.manager.groups import GroupKeys
from vtpm.manager.links import Links
from vtpm.manager.store import Store
from vtpm.tpm.constants import TPM_ALG
from vtpm.wire import ipc
from vtpm.wire.deepquote import DeepQuoteInfo
from vtpm.wire.evidence import Evidence, encode_evidence

PcrValues = tuple[tuple[int, bytes], ...]
PREFERRED_EK = "ek-rsa2048"


def certified_ek_name(store: Store, vtpm_uuid: uuid.UUID) -> bytes:
    """The name of the EK a deep quote binds: ek-rsa2048, else the first EK kind recorded."""
    eks = [c for c in store.certs(vtpm_uuid) if c.kind.startswith("ek-") and c.ek_name]
    for cert in eks:
        if cert.kind == PREFERRED_EK:
            return cert.ek_name
    return eks[0].ek_name if eks else b""


class DeepQuotes:
    def __init__(self, store: Store, groups: GroupKeys, quoter: DeepQuoter, links: Links) -> None:
        self._store = store
        self._groups = groups
        self._quoter = quoter
        self._links = links

    def quote(
        self,
        vtpm_uuid: uuid.UUID,
        nonce: bytes,
        host_pcrs: tuple[int, ...],
        bank: int,
        values: PcrValues,
    ) -> Evidence:
        """One deep quote (batched with whatever else is asked at the same time)."""
        rec = lookup.vtpm(self._store, vtpm_uuid)
        g = lookup.group(self._store, str(rec.group_uuid))
        st = self._groups.status(g.uuid)
        if not st.unlocked:
            self._groups.refresh()
            st = self._groups.status(g.uuid)
        if not st.unlocked:
            raise ManagerError(f"deep quote refused: group {g.name} is locked: {st.reason}")
        if not host_pcrs:
            host_pcrs = g.pcr_states[0].pcrs
        try:
            info = DeepQuoteInfo(
                nonce, rec.uuid, g.uuid, rec.label, bank, values,
                ek_name=certified_ek_name(self._store, rec.uuid),
            )  # fmt: skip
        except LocalProtocolError as e:
            raise RequestError(f"deep quote: {e}") from None
        return self._quoter.request(g.uuid, info, tuple(sorted(set(host_pcrs))))

    def on_host(
        self,
        vtpm_uuid: uuid.UUID,
        nonce: bytes,
        host_pcrs: tuple[int, ...],
        vtpm_pcrs: tuple[int, ...],
    ) -> Evidence:
        """A deep quote asked on the host: the running instance reports its PCR values."""
        link = self._links.get(vtpm_uuid)
        if link is None:
            raise ManagerError(f"vTPM {vtpm_uuid} is not running: start it to quote it")
        values = link.read_pcrs(vtpm_pcrs) if vtpm_pcrs else ()
        return self.quote(vtpm_uuid, nonce, host_pcrs, TPM_ALG.SHA256, values)

    def for_guest(self, vtpm_uuid: uuid.UUID, req: ipc.QuoteRequest) -> bytes:
        """A deep quote the guest asked for through its vTPM: the evidence, compact binary."""
        try:
            ev = self.quote(vtpm_uuid, req.nonce, req.host_pcrs, req.bank, req.pcrs)
        except VtpmError as e:
            self._store.audit("guest", "quote.deep", str(vtpm_uuid), "refused", {"why": str(e)})
            raise
        self._store.audit("guest", "quote.deep", str(vtpm_uuid), "ok", {"batch": ev.batch_size})
        return encode_evidence(ev)
