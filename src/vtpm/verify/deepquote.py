"""Verify a deep quote: one hardware TPM2_Quote whose qualifyingData is the Merkle root over
DeepQuoteInfo records (`vtpm.wire.deepquote`), and one of those records with its path.

Checks, besides every `quote.*` check of the host quote by the group's AK (its qualified name
from the bundle; `quote.nonce` is not run there, since the host quote's extraData is the
Merkle root that `deep.merkle` checks, and `quote.clock` only with a previous evidence):

    deep.merkle          the root from the info's leaf hash and its path is the host quote's
                         extraData: the AK signed this record, unchanged
    deep.nonce           the info carries the verifier's nonce
    deep.group           the info's group uuid is the bundle's group
    deep.label           the info's label hash is SHA-256 of its label, and the bundle's group
                         permits the label (its hash, or the `*`-user form's hash)
    deep.host_state      the host PCR values are one of the group's permitted states (only when
                         the quote covers every PCR of at least one state)
    deep.uuid            the vTPM uuid is the expected one          } only when the
    deep.group_expected  the group is the expected one (name/uuid)  } expected-values
    deep.label_expected  the label is the expected one              } policy names
    deep.vtpm_pcrs       the vTPM PCR values in the info are the expected ones     } them
    deep.host_pcrs       the host PCR values are the expected ones                 }
    deep.ek              (with an EK certificate) the info's EK name (DeepQuoteInfo version 2)
                         is the TPM name of the certificate's key as a TCG EK, and the
                         certificate's vTPM identity, when it has one, is the info's vTPM; a
                         version 1 info carries no EK binding and fails this check

The bundle is trusted as given here: check it once with `vtpm.verify.bundle.verify_bundle`
(and credential activation) before taking deep quotes on its word.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from cryptography import x509

from vtpm.errors import VerifyError
from vtpm.tpm.attest import parse_attest
from vtpm.tpm.ekcert import find_identity
from vtpm.tpm.hashes import hash_name
from vtpm.tpm.public import parse_public
from vtpm.verify import quote
from vtpm.verify.bundle import GroupInfo
from vtpm.verify.ekident import ek_name
from vtpm.verify.expected import Expected, PcrBanks
from vtpm.verify.verdict import Check, Verdict
from vtpm.wire.deepquote import FLAG_PCRS, DeepQuoteInfo, root_from_path
from vtpm.wire.evidence import Bundle, Evidence

MAX_PATH = 64  # a batch of 2**64 requests


def _short(data: bytes) -> str:
    text = data.hex()
    return text if len(text) <= 24 else text[:24] + "..."


def check_merkle(evidence: Evidence, extra_data: bytes) -> Check:
    if len(evidence.path) > MAX_PATH:
        why = f"a Merkle path of {len(evidence.path)} steps is longer than any batch's"
        return Check("deep.merkle", False, why)
    root = root_from_path(evidence.info.leaf(), evidence.path)
    ok = hmac.compare_digest(root, extra_data)
    steps = len(evidence.path)
    reason = (
        f"the info is leaf of the signed Merkle root ({steps} path steps)"
        if ok
        else f"the root from the info and its {steps}-step path is {_short(root)}, the quote "
        f"signed {_short(extra_data) or '(empty)'}"
    )
    return Check("deep.merkle", ok, reason)


def check_nonce(info: DeepQuoteInfo, nonce: bytes) -> Check:
    ok = hmac.compare_digest(info.nonce, nonce)
    reason = (
        "the info carries the verifier's nonce"
        if ok
        else f"the info's nonce is {_short(info.nonce)}, the verifier sent {_short(nonce)}"
    )
    return Check("deep.nonce", ok, reason)


def check_group(info: DeepQuoteInfo, group: GroupInfo) -> Check:
    ok = info.group_uuid == group.uuid
    reason = (
        f"the vTPM is in group {group.name or group.uuid}"
        if ok
        else f"the info's group is {info.group_uuid}, the bundle's is {group.uuid}"
    )
    return Check("deep.group", ok, reason)


def check_label(info: DeepQuoteInfo, group: GroupInfo) -> Check:
    digest = hashlib.sha256(info.label.encode()).digest()
    if not hmac.compare_digest(digest, info.label_hash):
        return Check("deep.label", False, f"the label hash is not SHA-256 of {info.label!r}")
    if not group.permits(info.label):
        return Check(
            "deep.label",
            False,
            f"group {group.name or group.uuid} does not permit label {info.label!r} "
            f"(permitted: {', '.join(group.labels) or 'none'})",
        )
    return Check("deep.label", True, f"label {info.label!r} is permitted by the group")


def check_host_state(host_pcrs: Mapping[int, bytes], bank: str, group: GroupInfo) -> Check | None:
    """None when the quote covers no permitted state's PCRs (nothing to compare)."""
    if bank != "sha256":
        return None
    covered = [(n, s) for n, s in enumerate(group.pcr_states) if set(s.pcrs) <= set(host_pcrs)]
    if not covered:
        return None
    for n, state in covered:
        if not state.differences(dict(host_pcrs)):
            return Check("deep.host_state", True, f"host PCRs are permitted state #{n}")
    closest = min(covered, key=lambda ns: len(ns[1].differences(dict(host_pcrs))))
    differing = ",".join(str(i) for i in closest[1].differences(dict(host_pcrs)))
    return Check(
        "deep.host_state",
        False,
        f"host PCRs are none of the group's {len(group.pcr_states)} permitted states "
        f"(closest #{closest[0]} differs in PCR {differing})",
    )


def check_ek(info: DeepQuoteInfo, cert: x509.Certificate) -> Check:
    """The deep quote is of the vTPM whose EK `cert` certifies."""
    if info.version < 2:
        return Check("deep.ek", False, "a version 1 deep quote carries no EK binding")
    if not info.ek_name:
        return Check("deep.ek", False, "the deep quote names no EK: the vTPM has no certified EK")
    try:
        template, name = ek_name(cert)
        ident = find_identity(cert)
    except VerifyError as e:
        return Check("deep.ek", False, f"the EK certificate: {e}")
    if not hmac.compare_digest(name, info.ek_name):
        return Check(
            "deep.ek",
            False,
            f"the certificate's key as a TCG {template} EK is named {_short(name)}, the deep "
            f"quote signed the EK name {_short(info.ek_name)}: another vTPM's EK certificate",
        )
    if ident is not None and ident.vtpm_uuid != info.vtpm_uuid:
        why = (
            f"the certificate is for vTPM {ident.vtpm_uuid}, the deep quote is of {info.vtpm_uuid}"
        )
        return Check("deep.ek", False, why)
    return Check("deep.ek", True, f"the deep quote is of the vTPM whose {template} EK is certified")


def compare_pcrs(check_id: str, got: Mapping[int, bytes], bank: str, want: PcrBanks) -> Check:
    """The PCR values `got` (bank `bank`) against the expected banks `want`."""
    problems: list[str] = []
    for want_bank, values in want.items():
        if want_bank != bank:
            problems.append(f"expected {want_bank} values, the evidence has {bank}")
            continue
        for index, value in sorted(values.items()):
            have = got.get(index)
            if have is None:
                problems.append(f"PCR {index} is not in the evidence")
            elif not hmac.compare_digest(have, value):
                problems.append(f"PCR {index} is {_short(have)}, expected {_short(value)}")
    if problems:
        return Check(check_id, False, "; ".join(problems))
    count = sum(len(v) for v in want.values())
    return Check(check_id, True, f"{count} PCR value(s) as expected")


def expected_checks(
    info: DeepQuoteInfo, evidence: Evidence, group: GroupInfo, expected: Expected
) -> list[Check]:
    out: list[Check] = []
    if expected.vtpm_uuid is not None:
        ok = info.vtpm_uuid == expected.vtpm_uuid
        why = f"the vTPM is {info.vtpm_uuid}" + ("" if ok else f", expected {expected.vtpm_uuid}")
        out.append(Check("deep.uuid", ok, why))
    if expected.group is not None:
        ok = expected.group in (group.name, str(group.uuid))
        why = f"group {group.name} ({group.uuid})" + ("" if ok else f", expected {expected.group}")
        out.append(Check("deep.group_expected", ok, why))
    if expected.label is not None:
        ok = info.label == expected.label
        why = f"label {info.label!r}" + ("" if ok else f", expected {expected.label!r}")
        out.append(Check("deep.label_expected", ok, why))
    if expected.vtpm_pcrs is not None:
        if not info.flags & FLAG_PCRS:
            out.append(Check("deep.vtpm_pcrs", False, "the info carries no vTPM PCR values"))
        else:
            bank = hash_name(info.pcr_bank)
            out.append(compare_pcrs("deep.vtpm_pcrs", info.pcr_dict(), bank, expected.vtpm_pcrs))
    if expected.host_pcrs is not None:
        host = evidence.host
        out.append(compare_pcrs("deep.host_pcrs", host.pcrs, host.pcr_bank, expected.host_pcrs))
    return out


def verify_deep_quote(
    evidence: Evidence,
    bundle: Bundle,
    *,
    nonce: bytes,
    expected: Expected | None = None,
    previous: Evidence | None = None,
    ek_certificate: x509.Certificate | None = None,
) -> Verdict:
    """Every check of one deep quote (and `deep.ek` with an EK certificate). Raises VerifyError
    when the bundle's AK or group, or the host quote's bytes, do not parse."""
    ak = parse_public(bundle.ak_public)
    group = GroupInfo.from_json(bundle.group)
    host = evidence.host
    att = parse_attest(host.attest)
    prev = parse_attest(previous.host.attest) if previous is not None else None
    checks = quote.quote_checks(
        att,
        host.attest,
        host.signature,
        ak,
        host.pcrs,
        host.pcr_bank,
        None,
        bundle.ak_qualified_name,
        prev,
    )
    info = evidence.info
    checks += [
        check_merkle(evidence, att.extra_data),
        check_nonce(info, nonce),
        check_group(info, group),
        check_label(info, group),
    ]
    state = check_host_state(host.pcrs, host.pcr_bank, group)
    if state is not None:
        checks.append(state)
    if expected is not None:
        checks += expected_checks(info, evidence, group, expected)
    if ek_certificate is not None:
        checks.append(check_ek(info, ek_certificate))
    return Verdict(tuple(checks))
