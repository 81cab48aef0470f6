"""TPM 2.0 policy digests, computed in software (SHA-256 policies, SHA-256 PCR bank).

TCG TPM 2.0 Library Part 3: PolicyPCR (23.7), PolicyOR (23.6), PolicyNV (23.9),
PolicyAuthorize (23.16) and Part 1 (19.7, PolicyUpdate); NV public area and names: Part 2
(13.5), Part 1 (16). The Manager seals each group key under

    PolicyOR(epoch(states_root), PolicyAuthorize(owner key, policy_ref))

where `states_root` is the root of an OR tree whose leaves are the PolicyPCR digests of the
group's permitted host PCR states, and `epoch(d)` extends `d` by PolicyNV(the group's approval
counter == the epoch the key was sealed at). PolicyOR takes at most eight branches, so more
states are grouped eight at a time, level by level, until one digest remains; a group of one is
passed up unchanged. The owner approves a new state set by signing
SHA-256(epoch(new states_root) || policy_ref), which lets a locked group be opened through the
PolicyAuthorize branch while the counter still holds that epoch (`vtpm.manager.groups` says why).
Groups from before approval epochs have no counter: their seal and approvals lack `epoch(.)`.

Nothing here touches a TPM; the same functions serve the Manager, the owner's signing tool and
tests.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from vtpm.errors import ConfigError
from vtpm.tpm.constants import (
    DIGEST_SIZES,
    MAX_PCR,
    TPM_ALG,
    TPM_CC,
    TPM_ECC_CURVE,
    TPM_EO,
    TPMA_NV,
    TPMA_OBJECT,
)
from vtpm.tpm.frames import pcr_select

DIGEST_SIZE = DIGEST_SIZES[TPM_ALG.SHA256]  # every policy digest here is SHA-256
ZERO = bytes(DIGEST_SIZE)
MAX_OR_BRANCHES = 8

# sign + userWithAuth: an external key used only to verify the owner's signatures
VERIFY_KEY_ATTRIBUTES = TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.USERWITHAUTH

# Approval counters: one NV counter index per group, in this range (0x01500000.. is the
# Manager's own floor counter). Empty authValue for reading (PolicyNV) and incrementing; no
# dictionary-attack lockout for those empty-auth uses.
APPROVAL_NV_FIRST = 0x01500100
APPROVAL_NV_LAST = 0x015001FF
APPROVAL_NV_ATTRIBUTES = (
    TPMA_NV.TPM_NT_COUNTER | TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA
)
COUNTER_SIZE = 8  # an NV counter is a big-endian UINT64
MAX_EPOCH = 2**64 - 1


def _h(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def check_pcrs(pcrs: Sequence[int]) -> tuple[int, ...]:
    """Sorted, unique PCR indices in 0..23, or ConfigError."""
    out = tuple(sorted(set(pcrs)))
    if not out:
        raise ConfigError("a PCR selection needs at least one PCR")
    if out[0] < 0 or out[-1] > MAX_PCR:
        raise ConfigError(f"PCR indices must be in 0..{MAX_PCR}")
    if len(out) != len(pcrs):
        raise ConfigError("a PCR selection lists a PCR twice")
    return out


def pcr_selection(pcrs: Sequence[int]) -> bytes:
    """TPML_PCR_SELECTION with one SHA-256 bank selecting `pcrs` (3-byte bitmap)."""
    return pcr_select(TPM_ALG.SHA256, list(check_pcrs(pcrs)))


@dataclass(frozen=True, slots=True)
class PcrState:
    """One permitted host PCR state: SHA-256 values of `pcrs`, in index order."""

    pcrs: tuple[int, ...]
    values: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if tuple(sorted(set(self.pcrs))) != self.pcrs:
            raise ConfigError("a PCR state's PCRs must be sorted and unique")
        check_pcrs(self.pcrs)
        if len(self.values) != len(self.pcrs):
            raise ConfigError("a PCR state needs one value per PCR")
        for v in self.values:
            if len(v) != DIGEST_SIZE:
                raise ConfigError(f"a SHA-256 PCR value is {DIGEST_SIZE} bytes, not {len(v)}")

    @classmethod
    def from_values(cls, values: dict[int, bytes]) -> PcrState:
        pcrs = tuple(sorted(values))
        return cls(pcrs, tuple(values[i] for i in pcrs))

    def as_dict(self) -> dict[int, bytes]:
        return dict(zip(self.pcrs, self.values, strict=True))

    def pcr_digest(self) -> bytes:
        """The pcrDigest PolicyPCR compares: SHA-256 of the values concatenated."""
        return _h(*self.values)

    def policy(self) -> bytes:
        """PolicyPCR digest of this state, from an empty policy."""
        return _h(
            ZERO, struct.pack(">I", TPM_CC.PolicyPCR), pcr_selection(self.pcrs), self.pcr_digest()
        )

    def differences(self, current: dict[int, bytes]) -> list[int]:
        """PCRs of this state whose current value differs (missing counts as differing)."""
        return [i for i, v in zip(self.pcrs, self.values, strict=True) if current.get(i) != v]

    def to_json(self) -> dict[str, object]:
        return {"pcrs": list(self.pcrs), "values": [v.hex() for v in self.values]}

    @classmethod
    def from_json(cls, raw: object) -> PcrState:
        try:
            assert isinstance(raw, dict)
            pcrs = tuple(int(i) for i in raw["pcrs"])
            values = tuple(bytes.fromhex(str(v)) for v in raw["values"])
        except (AssertionError, KeyError, TypeError, ValueError):
            raise ConfigError("a PCR state must be {pcrs: [..], values: [hex..]}") from None
        return cls(pcrs, values)


def policy_or(branches: Sequence[bytes]) -> bytes:
    """PolicyOR digest over 2..8 branch digests."""
    if not 2 <= len(branches) <= MAX_OR_BRANCHES:
        raise ConfigError(f"PolicyOR takes 2..{MAX_OR_BRANCHES} branches, not {len(branches)}")
    return _h(ZERO, struct.pack(">I", TPM_CC.PolicyOR), *branches)


def policy_authorize(key_name: bytes, policy_ref: bytes) -> bytes:
    """PolicyAuthorize digest for a signing key's name and a policyRef."""
    return _h(_h(ZERO, struct.pack(">I", TPM_CC.PolicyAuthorize), key_name), policy_ref)


def authorization_hash(approved_policy: bytes, policy_ref: bytes) -> bytes:
    """aHash: what the authorizing key signs to approve `approved_policy`."""
    return _h(approved_policy, policy_ref)


def check_approval_nv(handle: int) -> int:
    """`handle` if it is in the approval-counter range, or ConfigError."""
    if type(handle) is not int or not APPROVAL_NV_FIRST <= handle <= APPROVAL_NV_LAST:
        raise ConfigError(
            f"an approval counter is an NV index in 0x{APPROVAL_NV_FIRST:08x}.."
            f"0x{APPROVAL_NV_LAST:08x}, not {handle!r}"
        )
    return handle


def approval_nv_public(handle: int, *, written: bool = True) -> bytes:
    """Marshalled TPMS_NV_PUBLIC of an approval counter (`written`: once incremented, which
    is how the TPM names it from then on)."""
    attributes = APPROVAL_NV_ATTRIBUTES | (TPMA_NV.WRITTEN if written else 0)
    return struct.pack(
        ">IHIHH", check_approval_nv(handle), TPM_ALG.SHA256, attributes, 0, COUNTER_SIZE
    )


def nv_name(nv_public: bytes) -> bytes:
    """TPM name of an NV index with a SHA-256 nameAlg: nameAlg || SHA-256(TPMS_NV_PUBLIC)."""
    return struct.pack(">H", TPM_ALG.SHA256) + _h(nv_public)


def approval_nv_name(handle: int) -> bytes:
    """The name PolicyNV binds: that of the approval counter at `handle`, written."""
    return nv_name(approval_nv_public(handle))


def policy_nv(previous: bytes, name: bytes, operand_b: bytes, offset: int = 0) -> bytes:
    """PolicyNV digest: NV data at `offset` equal (TPM_EO_EQ) to `operand_b`, after
    `previous`."""
    args = _h(operand_b, struct.pack(">HH", offset, TPM_EO.EQ))
    return _h(previous, struct.pack(">I", TPM_CC.PolicyNV), args, name)


def check_epoch(epoch: int) -> int:
    if type(epoch) is not int or not 0 <= epoch <= MAX_EPOCH:
        raise ConfigError(f"an approval epoch is an integer in 0..2**64-1, not {epoch!r}")
    return epoch


def epoch_operand(epoch: int) -> bytes:
    """The counter value PolicyNV compares, as the TPM stores it."""
    return check_epoch(epoch).to_bytes(COUNTER_SIZE, "big")


def epoch_policy(states_root: bytes, approval_nv: int, epoch: int) -> bytes:
    """`states_root`, then PolicyNV(approval counter at `approval_nv` == `epoch`): valid only
    while the counter holds that value."""
    return policy_nv(states_root, approval_nv_name(approval_nv), epoch_operand(epoch))


@dataclass(frozen=True, slots=True)
class Epoch:
    """An approval counter (its NV handle) and the value a policy requires it to hold."""

    nv: int
    value: int

    def __post_init__(self) -> None:
        check_approval_nv(self.nv)
        check_epoch(self.value)

    def policy(self, states_root: bytes) -> bytes:
        return epoch_policy(states_root, self.nv, self.value)

    def operand(self) -> bytes:
        return epoch_operand(self.value)

    def next(self) -> Epoch:
        """The epoch the counter holds after one more increment."""
        return Epoch(self.nv, self.value + 1)

    def to_json(self) -> dict[str, object]:
        return {"nv": self.nv, "value": self.value}

    @classmethod
    def from_json(cls, raw: object) -> Epoch:
        if not isinstance(raw, dict) or set(raw) != {"nv", "value"}:
            raise ConfigError("an approval epoch is {nv: handle, value: count}")
        return cls(raw["nv"], raw["value"])


def at_epoch(states_root: bytes, epoch: Epoch | None) -> bytes:
    """The PCR branch of a seal, or an approved policy: `states_root`, then PolicyNV at
    `epoch` (unchanged for a group without an approval counter: `epoch` None)."""
    return states_root if epoch is None else epoch.policy(states_root)


def seal_policy(states_root: bytes, authorize: bytes) -> bytes:
    """The authPolicy of a group's sealed key: its PCR states (at an epoch, see
    `epoch_policy`), or an owner-approved set."""
    return policy_or([states_root, authorize])


@dataclass(frozen=True, slots=True)
class OrTree:
    """PolicyOR tree over leaf digests, eight wide."""

    leaves: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.leaves:
            raise ConfigError("a policy needs at least one permitted PCR state")

    @classmethod
    def of_states(cls, states: Sequence[PcrState]) -> OrTree:
        return cls(tuple(s.policy() for s in states))

    def _levels(self) -> list[list[bytes]]:
        levels = [list(self.leaves)]
        while len(levels[-1]) > 1:
            cur = levels[-1]
            nxt = []
            for i in range(0, len(cur), MAX_OR_BRANCHES):
                chunk = cur[i : i + MAX_OR_BRANCHES]
                nxt.append(chunk[0] if len(chunk) == 1 else policy_or(chunk))
            levels.append(nxt)
        return levels

    @property
    def root(self) -> bytes:
        return self._levels()[-1][0]

    def path(self, index: int) -> list[tuple[bytes, ...]]:
        """The branch lists to hand PolicyOR, bottom-up, after the leaf `index` is satisfied."""
        if not 0 <= index < len(self.leaves):
            raise IndexError(index)
        out: list[tuple[bytes, ...]] = []
        for level in self._levels()[:-1]:
            start = index - index % MAX_OR_BRANCHES
            chunk = tuple(level[start : start + MAX_OR_BRANCHES])
            if len(chunk) > 1:
                out.append(chunk)
            index //= MAX_OR_BRANCHES
        return out


def ecc_p256_verify_public(x: bytes, y: bytes) -> bytes:
    """TPMT_PUBLIC of an external ECC P-256 ECDSA-SHA256 verification key (marshalled)."""
    if len(x) != 32 or len(y) != 32:
        raise ConfigError("an ECC P-256 point has 32-byte coordinates")
    return (
        struct.pack(">HHI", TPM_ALG.ECC, TPM_ALG.SHA256, VERIFY_KEY_ATTRIBUTES)
        + struct.pack(">H", 0)  # authPolicy: empty
        + struct.pack(">H", TPM_ALG.NULL)  # symmetric: none
        + struct.pack(">HH", TPM_ALG.ECDSA, TPM_ALG.SHA256)  # scheme
        + struct.pack(">H", TPM_ECC_CURVE.NIST_P256)
        + struct.pack(">H", TPM_ALG.NULL)  # kdf
        + struct.pack(">H", 32)
        + x
        + struct.pack(">H", 32)
        + y
    )


def object_name(tpmt_public: bytes) -> bytes:
    """TPM name of an object with a SHA-256 nameAlg: nameAlg || SHA-256(TPMT_PUBLIC)."""
    return struct.pack(">H", TPM_ALG.SHA256) + _h(tpmt_public)
