"""A group's provisioning bundle: what a verifier needs to trust the group's attestation key.

The bundle (`vtpm.wire.evidence.Bundle`) holds the group object {uuid, name, seq, labels,
pcr_states, owner_pub}, the AK's public area, name and qualified name, the hardware TPM's EK
public area and certificate (if the TPM has one), the Manager's uuid, and a configuration
quote: TPM2_Quote by the AK over the PCRs of the group's first permitted state with
extraData = config_digest(group object). The quote ties the AK to this group configuration
and to a host PCR state; the EK, through MakeCredential/ActivateCredential, to the TPM.
With the group's CA (`vtpm.manager.ca`), the bundle also carries the CA key's public area, its
certificate and the AK's TPM2_Certify of the key: what a verifier needs to take a vTPM's EK
certificate back to the AK.
"""

from __future__ import annotations

from typing import Any

from vtpm.manager.attestation import AttestationTpm
from vtpm.manager.hwtpm import SealedObject
from vtpm.manager.store import GroupRecord
from vtpm.wire.evidence import Bundle, config_digest


def group_object(g: GroupRecord) -> dict[str, Any]:
    """The group as the bundle states it, and as config_digest hashes it."""
    return {
        "uuid": str(g.uuid),
        "name": g.name,
        "seq": g.seq,
        "labels": list(g.labels),
        "pcr_states": [s.to_json() for s in g.pcr_states],
        "owner_pub": g.owner_pub.decode(),
    }


def build_bundle(g: GroupRecord, tpm: AttestationTpm, manager_uuid: str) -> Bundle:
    """The provisioning bundle of `g`, whose attestation key must exist already."""
    ak = SealedObject(g.ak_public, g.ak_private)
    group = group_object(g)
    pub = tpm.ak_public(ak)
    quote = tpm.quote(ak, config_digest(group), g.pcr_states[0].pcrs)
    ca = g.ca
    return Bundle(
        group=group,
        ak_alg=g.ak_alg,
        ak_public=pub.public,
        ak_name=pub.name,
        ak_qualified_name=pub.qualified_name,
        ek_public=tpm.ek_public(),
        ek_certificate=tpm.ek_certificate(),
        config_quote=quote,
        manager_uuid=manager_uuid,
        ca_public=None if ca is None else ca.public,
        ca_certificate=None if ca is None else ca.certificate,
        ca_certify_attest=None if ca is None else ca.certify_attest,
        ca_certify_signature=None if ca is None else ca.certify_signature,
    )
