"""The Manager's decisions that need no TPM: key custody's checks 1-3 and a launch's refusal,
each as one table."""

from __future__ import annotations

import uuid

import pytest

from vtpm.manager.custody import policy_refusal
from vtpm.manager.launch import refusal
from vtpm.manager.store import GroupRecord, VtpmRecord
from vtpm.wire import ipc

VTPM = uuid.UUID("11111111-2222-3333-4444-555555555555")
OTHER = uuid.UUID("99999999-2222-3333-4444-555555555555")
GROUP = uuid.UUID("aaaaaaaa-2222-3333-4444-555555555555")


def _group(*labels: str) -> GroupRecord:
    return GroupRecord(GROUP, "guests", b"", 1, (), labels, b"", b"", b"", b"")


def _vtpm(label: str, tpm: str = "2.0") -> VtpmRecord:
    return VtpmRecord(VTPM, GROUP, label, tpm, None, None, ())


GUEST1 = "guest1_u:vm_r:vtpm_t"
CASES = [
    # (hello names, granted already, vTPM record, group record, refusal contains or "")
    (VTPM, False, _vtpm(GUEST1), _group("*:vm_r:vtpm_t"), ""),
    (VTPM, False, _vtpm(GUEST1), _group(GUEST1), ""),
    (OTHER, False, _vtpm(GUEST1), _group(GUEST1), "another vTPM"),
    (VTPM, True, _vtpm(GUEST1), _group(GUEST1), "another vTPM"),
    (VTPM, False, None, _group(GUEST1), "unknown vTPM"),
    (VTPM, False, _vtpm(GUEST1), None, "group does not exist"),
    (VTPM, False, _vtpm("guest1_u:vm_r:guest_t"), _group("*:vm_r:guest_t"), "type vtpm_t"),
    (VTPM, False, _vtpm(GUEST1), _group("guest2_u:vm_r:vtpm_t"), "does not permit"),
    (VTPM, False, _vtpm(GUEST1), _group("*:other_r:vtpm_t"), "does not permit"),
    (VTPM, False, _vtpm(GUEST1), _group(), "does not permit"),
]


@pytest.mark.parametrize(("hello", "granted", "rec", "group", "want"), CASES)
def test_key_custody_policy(
    hello: uuid.UUID,
    granted: bool,
    rec: VtpmRecord | None,
    group: GroupRecord | None,
    want: str,
) -> None:
    why = policy_refusal(VTPM, ipc.Hello(hello), granted, rec, group)
    if want:
        assert want in why
    else:
        assert why == ""


LAUNCH_CASES = [
    # (vTPM record, group unlocked, label the launcher names, refusal contains or "")
    (_vtpm(GUEST1), True, GUEST1, ""),
    (_vtpm(GUEST1), True, None, ""),
    (_vtpm(GUEST1), True, "guest2_u:vm_r:vtpm_t", "has label guest1_u:vm_r:vtpm_t, not guest2"),
    (_vtpm(GUEST1, "1.2"), True, GUEST1, "needs TPM 2.0"),
    (_vtpm(GUEST1), False, GUEST1, "group guests is locked: PCR 0 differs"),
    (_vtpm(GUEST1, "1.2"), False, "guest2_u:vm_r:vtpm_t", "has label"),  # label first
]


@pytest.mark.parametrize(("rec", "unlocked", "label", "want"), LAUNCH_CASES)
def test_launch_refusal(rec: VtpmRecord, unlocked: bool, label: str | None, want: str) -> None:
    why = refusal(rec, _group(GUEST1), unlocked, "PCR 0 differs", label)
    if want:
        assert want in why
    else:
        assert why == ""
