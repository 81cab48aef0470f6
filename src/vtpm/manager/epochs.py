"""Approval epochs: each group's NV counter on the hardware TPM, which revokes old approvals.

Every policy that opens a group key (the PCR branch of its seal and every state set the owner
approves) ends in PolicyNV(counter == epoch), see `vtpm.tpm.policy`. The Manager increments
the counter only when it applies an owner request, so the approvals and seals of every earlier
epoch stop satisfying the policy at the TPM (`vtpm.manager.groups` has the protocol).

Why a TPMA_NV_COUNTER index (rather than PolicyAuthorizeNV, or an ordinary NV index):
- the TPM lets it only grow: written by TPM2_NV_Increment alone, never set. A counter undefined
  and defined again starts above the highest value any counter on the TPM has held, and its
  name (handle, attributes, size: all fixed here) comes back the same, so nothing anyone with
  TPM access can do brings an old epoch back. PolicyAuthorizeNV would need an index the Manager
  writes with the approved digest: a compromised Manager could write an old one back, and TPMs
  before Library rev 1.38 lack the command.
- Non-orderly: each increment reaches NV at once (an orderly counter may lose increments on
  a power cut, which would un-revoke). NV wear: one write per applied owner request and one
  at creation, nothing per start or key release.
- Empty authValue, no DA: any process that can send commands to the TPM can read it or push
  it forward (revoke every approval of the group: a denial of service the owner ends by
  signing for the new epoch), never back.

Indices live at `policy.APPROVAL_NV_FIRST..LAST`. A new group takes the lowest one no group
records; one left defined by a deleted group or a crash before the database write is adopted
(its value means nothing to the new group, whose approvals carry its own policyRef); an index
with other attributes (not ours) is skipped. Every read and increment first checks that the
index's name is the one the owner's approvals bind.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import Any

from tpm2_pytss import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC, TSS2_Exception

from vtpm.errors import HwTpmError
from vtpm.manager.hwtpm import HardwareTpm
from vtpm.tpm import policy
from vtpm.tpm.policy import Epoch

log = logging.getLogger(__name__)

_RC_FMT1 = 0x080
_RC_HANDLE = 0x00B
_LAYER_MASK = 0xFF0000


def _absent(e: TSS2_Exception) -> bool:
    """The TPM said the handle names nothing (TPM_RC_HANDLE on a handle parameter)."""
    rc = int(e.rc)
    return not rc & _LAYER_MASK and bool(rc & _RC_FMT1) and rc & 0x3F == _RC_HANDLE


def _ours(ectx: Any, tr: Any, handle: int) -> bool:
    _public, name = ectx.nv_read_public(tr)
    return bytes(name) == policy.approval_nv_name(handle)


def _value(ectx: Any, tr: Any) -> int:
    return int.from_bytes(bytes(ectx.nv_read(tr, policy.COUNTER_SIZE, 0, auth_handle=tr)), "big")


class ApprovalCounters:
    """The groups' approval counters. Thread-safe through `HardwareTpm.run`."""

    def __init__(self, hw: HardwareTpm) -> None:
        self.hw = hw

    def _on(self, what: str, handle: int, fn: Callable[[Any, Any], int]) -> int:
        policy.check_approval_nv(handle)

        def op(ectx: Any) -> int:
            try:
                tr = ectx.tr_from_tpmpublic(handle)
            except TSS2_Exception as e:
                if _absent(e):
                    raise HwTpmError(
                        f"approval counter 0x{handle:08x} is not defined on the hardware TPM"
                    ) from None
                raise
            try:
                if not _ours(ectx, tr, handle):
                    raise HwTpmError(
                        f"NV index 0x{handle:08x} on the hardware TPM is not a vtpm approval "
                        "counter (its name differs)"
                    )
                return fn(ectx, tr)
            finally:
                ectx.tr_close(tr)

        return self.hw.run(what, op)

    def read(self, handle: int) -> int:
        """The counter's current value: the group's epoch."""
        return self._on("reading an approval counter", handle, _value)

    def increment(self, handle: int) -> int:
        """Advance the counter by one (revoking the epoch it held); its new value."""

        def fn(ectx: Any, tr: Any) -> int:
            ectx.nv_increment(tr, auth_handle=tr)
            return _value(ectx, tr)

        value = self._on("incrementing an approval counter", handle, fn)
        log.info("approval counter 0x%08x is now at epoch %d", handle, value)
        return value

    def allocate(self, taken: Collection[int]) -> Epoch:
        """A counter for a new group (defined now, or a leftover of ours adopted), at its
        current epoch; `taken`: the handles groups already record."""

        def op(ectx: Any) -> Epoch | None:
            for handle in range(policy.APPROVAL_NV_FIRST, policy.APPROVAL_NV_LAST + 1):
                if handle not in taken:
                    got = self._claim(ectx, handle)
                    if got is not None:
                        return got
            return None

        epoch = self.hw.run("allocating an approval counter", op)
        if epoch is None:
            first, last = policy.APPROVAL_NV_FIRST, policy.APPROVAL_NV_LAST
            raise HwTpmError(f"no free approval counter at NV 0x{first:08x}..0x{last:08x}")
        return epoch

    @staticmethod
    def _claim(ectx: Any, handle: int) -> Epoch | None:
        try:
            tr = ectx.tr_from_tpmpublic(handle)
        except TSS2_Exception as e:
            if not _absent(e):
                raise
            public, _ = TPMS_NV_PUBLIC.unmarshal(policy.approval_nv_public(handle, written=False))
            tr = ectx.nv_define_space(None, TPM2B_NV_PUBLIC(public))
            log.info("defined approval counter 0x%08x on the hardware TPM", handle)
        try:
            pub, _name = ectx.nv_read_public(tr)
            unwritten = bytes(pub.nvPublic.marshal()) == policy.approval_nv_public(
                handle, written=False
            )
            if unwritten:  # defined, never incremented (a crash right after the define)
                ectx.nv_increment(tr, auth_handle=tr)
            elif not _ours(ectx, tr, handle):
                log.info("NV index 0x%08x is someone else's; skipping it", handle)
                return None
            return Epoch(handle, _value(ectx, tr))
        finally:
            ectx.tr_close(tr)
