"""Group keys: sealed to the hardware TPM, unlocked only in a permitted host state.

Each group has a random 32-byte key that exists on disk only as a hardware-TPM sealed object
whose policy is `PolicyOR(epoch(states_root), PolicyAuthorize(owner))` (see `vtpm.tpm.policy`).
At start, and again before every key release, the Manager reads the host PCRs:
- if they match one of the group's permitted states and the key was sealed under that list at
  the current approval epoch, the PCR branch opens it;
- if the owner has since signed a new list (the key is still sealed under the old one), the
  owner's approval opens it through the PolicyAuthorize branch and the key is sealed again under
  the new list;
- otherwise the group is locked: its key is dropped from memory, nothing of it is served, and
  the reason (which PCRs differ from the closest permitted state, their current values) is kept
  for `status`. Nothing is lost: the sealed key and every vTPM stay as they are.
A key in memory is only as good as the last PCR read: when a read fails (the hardware TPM is
unreachable), every group is locked and every cached key dropped, so nothing is released from
memory on the strength of an older read; the next successful read unseals them again.
vTPM state keys are stored wrapped (AES-256-GCM) under a key derived from the group key.

Revocation by the TPM (approval epochs, `vtpm.manager.epochs`). Each group has an NV counter
on the hardware TPM (`approval_nv`); its value is the group's epoch, and both branches of the
seal require it: the PCR branch was sealed at one epoch, and each owner approval names one.
Applying owner request N (which must name epoch E+1, E being the counter now):
 1. reseal the key (if in memory) under request N's states at E+1, and write the group (seq,
    states, approval, sealed key) to the database in one transaction: the commit point;
 2. increment the counter to E+1: from then on every approval and every seal of epoch <= E,
    wherever a copy of it is kept, fails PolicyNV at the TPM, so a state the owner removed no
    longer opens the key, even for a Manager that skips its own checks.
A crash between 1 and 2 leaves a stored approval for E+1 with the counter at E; the next
unseal or request sees that (the owner's signature verifies for E+1) and does step 2 then. A
crash before 1 changes nothing. A compromised Manager can push the counter forward (revoking
everything: the group stays locked until the owner signs for the new epoch) but never back,
and cannot make an approval for a past epoch, or a seal of one, open the key again. What it can
still do is what any holder of the key in memory can: use it while the host is in a permitted
state. A group from before counters (approval_nv 0) keeps its old seal until the Manager first
holds its key; it then gets a counter, is sealed anew under it (with a policyRef no old approval
was signed for), and its old approval is dropped. Copies of its old sealed blob stay openable
in the states they were sealed for: re-create the group to be rid of those.

Each group also has an attestation key (AK) on the hardware TPM (`vtpm.manager.attestation`),
made with the group; a group from before AKs existed gets one the first time it needs it.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from vtpm.errors import ConfigError, HwTpmError, ManagerError, SealError, VtpmError
from vtpm.labels import Label
from vtpm.manager import ownerreq
from vtpm.manager.attestation import AK_ALGS, DEFAULT_AK_ALG, AttestationTpm
from vtpm.manager.epochs import ApprovalCounters
from vtpm.manager.hwtpm import HardwareTpm, SealedObject
from vtpm.manager.sealing import SealingTpm
from vtpm.manager.store import GroupRecord, Store
from vtpm.tpm.policy import Epoch, OrTree, PcrState, at_epoch, check_pcrs, seal_policy

log = logging.getLogger(__name__)

KEY_SIZE = 32
_WRAP_INFO = b"vtpm state key wrap v1"
_WRAP_AAD = b"vtpm-state-key-v1"


@dataclass(frozen=True, slots=True)
class GroupStatus:
    unlocked: bool
    reason: str = ""
    matched: int | None = None  # index of the permitted state the host is in
    differing: dict[int, str] = field(default_factory=dict)  # PCR -> current value (hex)


def _match(states: Sequence[PcrState], current: dict[int, bytes]) -> int | None:
    for i, s in enumerate(states):
        if not s.differences(current):
            return i
    return None


def _locked_reason(states: Sequence[PcrState], current: dict[int, bytes]) -> GroupStatus:
    closest = min(range(len(states)), key=lambda i: len(states[i].differences(current)))
    diff = states[closest].differences(current)
    values = {i: current[i].hex() if i in current else "unreadable" for i in diff}
    pcrs = ", ".join(str(i) for i in diff)
    return GroupStatus(
        False,
        f"the host PCRs match none of the group's {len(states)} permitted state(s); "
        f"the closest (#{closest}) differs in PCR {pcrs}",
        None,
        values,
    )


class GroupKeys:
    """Holds the unlocked group keys in memory; everything persistent goes through `Store`."""

    def __init__(self, store: Store, hw: HardwareTpm) -> None:
        self._store = store
        self._hw = hw
        self.attestation = AttestationTpm(hw)
        self.sealing = SealingTpm(hw)
        self.counters = ApprovalCounters(hw)
        self._keys: dict[uuid.UUID, bytes] = {}
        self._epochs: dict[uuid.UUID, int] = {}  # last value read of each group's counter
        self._no_upgrade: set[uuid.UUID] = set()  # legacy groups whose upgrade failed
        self._status: dict[uuid.UUID, GroupStatus] = {}
        self._lock = threading.RLock()

    # state ----------------------------------------------------------------------------------

    def _read_pcrs(self, groups: Sequence[GroupRecord]) -> dict[int, bytes]:
        wanted = sorted({i for g in groups for s in g.pcr_states for i in s.pcrs})
        return self._hw.read_pcrs(wanted) if wanted else {}

    def refresh(self) -> None:
        """Re-read the host PCRs: lock groups that left their states, unlock those that
        (re)entered one."""
        with self._lock:
            groups = self._store.groups()
            try:
                current = self._read_pcrs(groups)
            except HwTpmError as e:
                self._lock_all(groups, str(e))
                return
            for g in groups:
                self._refresh_one(g, current)
            if self._hw.health.state != "ok":  # it went away while unsealing
                self._lock_all(groups, self._hw.health.error)

    def _lock_all(self, groups: Sequence[GroupRecord], why: str) -> None:
        """The hardware TPM cannot vouch for the host state: lock every group, drop its key."""
        if self._keys:
            log.warning(
                "every group locked, %d key(s) dropped from memory: %s", len(self._keys), why
            )
        self._keys.clear()
        for g in groups:
            self._status[g.uuid] = GroupStatus(False, f"hardware TPM unreachable: {why}")

    def _refresh_one(self, g: GroupRecord, current: dict[int, bytes]) -> None:
        idx = _match(g.pcr_states, current)
        if idx is None:
            if g.uuid in self._keys:
                log.warning("group %s (%s) locked: the host PCRs changed", g.name, g.uuid)
            self._keys.pop(g.uuid, None)
            self._status[g.uuid] = _locked_reason(g.pcr_states, current)
            return
        if g.uuid in self._keys:
            self._status[g.uuid] = GroupStatus(True, matched=idx)
            self._upgrade(g)
            return
        try:
            key = self._unseal(g, idx)
        except SealError:
            self._status[g.uuid] = GroupStatus(
                False, "the hardware TPM refused to unseal the group key in this host state", idx
            )
            return
        except HwTpmError as e:
            self._status[g.uuid] = GroupStatus(False, f"hardware TPM: {e}", idx)
            return
        self._keys[g.uuid] = key
        self._status[g.uuid] = GroupStatus(True, matched=idx)
        log.info("group %s (%s) unlocked (host in permitted state #%d)", g.name, g.uuid, idx)
        self._upgrade(self._store.group(str(g.uuid)) or g)

    def _unseal(self, g: GroupRecord, idx: int) -> bytes:
        pub = ownerreq.load_public_key(g.owner_pub)
        obj = SealedObject(g.sealed_public, g.sealed_private)
        tree = OrTree.of_states(g.pcr_states)
        state = g.pcr_states[idx]
        epoch = self._settle(g)
        if at_epoch(tree.root, epoch) == g.sealed_root:
            auth = ownerreq.authorize_digest(pub, g.uuid, g.approval_nv)
            return self.sealing.unseal_with_pcrs(obj, state, tree, idx, auth, epoch)
        if not g.approval:
            raise SealError("unsealing failed")
        key = self.sealing.unseal_with_approval(
            obj,
            state,
            tree,
            idx,
            g.sealed_root,
            ownerreq.tpm_public(pub),
            ownerreq.policy_ref(g.uuid, g.approval_nv),
            g.approval,
            epoch,
        )
        self._reseal(g, key, epoch)  # from now on the PCR branch opens it under the new list
        return key

    def _reseal(self, g: GroupRecord, key: bytes, epoch: Epoch | None) -> GroupRecord:
        """`g` with `key` sealed anew under its states at `epoch`, stored."""
        pub = ownerreq.load_public_key(g.owner_pub)
        branch = at_epoch(OrTree.of_states(g.pcr_states).root, epoch)
        auth = ownerreq.authorize_digest(pub, g.uuid, g.approval_nv)
        sealed = self.sealing.seal(key, seal_policy(branch, auth))
        new = replace(
            g,
            sealed_public=sealed.public,
            sealed_private=sealed.private,
            sealed_root=branch,
        )
        self._store.update_group(new)
        return new

    # approval epochs ------------------------------------------------------------------------

    def _settle(self, g: GroupRecord) -> Epoch | None:
        """The group's epoch as the TPM holds it, after finishing an increment a crash cut off
        (the stored approval, signed by the owner, is for the next epoch); None: no counter."""
        if not g.approval_nv:
            return None
        epoch = Epoch(g.approval_nv, self.counters.read(g.approval_nv))
        pub = ownerreq.load_public_key(g.owner_pub)
        ahead = epoch.next()
        if g.approval and ownerreq.verify_approval(pub, g.pcr_states, g.uuid, g.approval, ahead):
            log.warning(
                "group %s (%s): request %d was stored but its epoch not reached; advancing "
                "approval counter 0x%08x",
                g.name,
                g.uuid,
                g.seq,
                g.approval_nv,
            )
            epoch = Epoch(g.approval_nv, self.counters.increment(g.approval_nv))
        self._epochs[g.uuid] = epoch.value
        return epoch

    def epoch(self, g: GroupRecord) -> Epoch | None:
        """The group's current epoch for display (last value read; read now if none yet, or
        None if the TPM cannot say); None too for a group without a counter."""
        if not g.approval_nv:
            return None
        with self._lock:
            value = self._epochs.get(g.uuid)
            if value is None:
                try:
                    value = self._epochs[g.uuid] = self.counters.read(g.approval_nv)
                except HwTpmError as e:
                    log.debug("group %s: approval counter unreadable: %s", g.uuid, e)
                    return None
            return Epoch(g.approval_nv, value)

    def _upgrade(self, g: GroupRecord) -> None:
        """Give a group from before approval counters its counter, and seal its key (in
        memory) under it; on failure the group keeps working as it was (retried next start)."""
        if g.approval_nv or g.uuid in self._no_upgrade:
            return
        key = self._keys[g.uuid]
        try:
            epoch = self.counters.allocate(self._taken())
            new = self._reseal(replace(g, approval=b"", approval_nv=epoch.nv), key, epoch)
        except (HwTpmError, SealError) as e:
            self._no_upgrade.add(g.uuid)
            log.warning("group %s (%s): no approval counter yet: %s", g.name, g.uuid, e)
            return
        self._epochs[g.uuid] = epoch.value
        log.info(
            "group %s (%s): approvals now revocable by the TPM (counter 0x%08x, epoch %d)",
            new.name,
            new.uuid,
            epoch.nv,
            epoch.value,
        )

    def _taken(self) -> set[int]:
        return {g.approval_nv for g in self._store.groups() if g.approval_nv}

    def status(self, group_uuid: uuid.UUID) -> GroupStatus:
        with self._lock:
            return self._status.get(group_uuid, GroupStatus(False, "not checked yet"))

    def key(self, group_uuid: uuid.UUID) -> bytes:
        with self._lock:
            down = self._hw.health
            if down.state != "ok":  # noticed by another use since the last refresh
                raise ManagerError(
                    f"group {group_uuid} is locked: hardware TPM unreachable: {down.error}"
                )
            key = self._keys.get(group_uuid)
            if key is None:
                raise ManagerError(
                    f"group {group_uuid} is locked: {self.status(group_uuid).reason}"
                )
            return key

    # administration -------------------------------------------------------------------------

    def create(
        self,
        name: str,
        owner_pem: bytes,
        pcrs: Sequence[int],
        labels: Sequence[str],
        ak_alg: str = DEFAULT_AK_ALG,
    ) -> GroupRecord:
        """A new group permitting the host's current values of `pcrs`, unlocked at once, with a
        new attestation key of `ak_alg` ("ecc" or "rsa")."""
        if not name or len(name) > 64 or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError("a group name is 1..64 letters, digits, '-' or '_'")
        if ak_alg not in AK_ALGS:
            raise ConfigError(f"attestation key {ak_alg!r}: use one of {', '.join(AK_ALGS)}")
        pub = ownerreq.load_public_key(owner_pem)
        for text in labels:
            Label.parse(text)
        with self._lock:
            state = PcrState.from_values(self._hw.read_pcrs(check_pcrs(pcrs)))
            gid = uuid.uuid4()
            key = secrets.token_bytes(KEY_SIZE)
            epoch = self.counters.allocate(self._taken())
            root = at_epoch(OrTree.of_states([state]).root, epoch)
            auth = ownerreq.authorize_digest(pub, gid, epoch.nv)
            sealed = self.sealing.seal(key, seal_policy(root, auth))
            ak = self.attestation.create_ak(ak_alg)
            rec = GroupRecord(
                uuid=gid,
                name=name,
                owner_pub=ownerreq.public_pem(pub),
                seq=0,
                pcr_states=(state,),
                labels=tuple(labels),
                sealed_public=sealed.public,
                sealed_private=sealed.private,
                sealed_root=root,
                approval=b"",
                created=time.time(),
                ak_alg=ak_alg,
                ak_public=ak.public,
                ak_private=ak.private,
                approval_nv=epoch.nv,
            )
            self._store.add_group(rec)
            self._epochs[gid] = epoch.value
            self._keys[gid] = key
            self._status[gid] = GroupStatus(True, matched=0)
            return rec

    def apply_owner_request(self, g: GroupRecord, data: bytes) -> GroupRecord:
        """Verify and apply a request signed by the group's owner (raises AuthError,
        ReplayError or ConfigError, leaving the group as it was), then advance the group's
        approval epoch (see the module's docstring for the order and crashes)."""
        pub = ownerreq.load_public_key(g.owner_pub)
        with self._lock:
            now = self._settle(g)
            want = None if now is None else now.next()
            req = ownerreq.verify_request(data, pub, group=g.uuid, last_seq=g.seq, epoch=want)
            new = replace(
                g,
                seq=req.seq,
                pcr_states=req.pcr_states,
                labels=req.labels,
                approval=req.approval,
            )
            key = self._keys.get(g.uuid)
            if key is not None:
                new = self._reseal(new, key, want)
            else:
                self._store.update_group(new)
            if want is not None:
                self._advance(new, want)
            try:
                current = self._read_pcrs([new])
            except HwTpmError as e:
                self._status[g.uuid] = GroupStatus(False, f"hardware TPM: {e}")
                return new
            self._refresh_one(new, current)
            return self._store.group(str(g.uuid)) or new

    def _advance(self, g: GroupRecord, want: Epoch) -> None:
        """Step 2: the counter to `want` (stored already; a failure here is finished later)."""
        try:
            value = self.counters.increment(want.nv)
        except HwTpmError as e:
            log.warning("group %s: epoch %d stored, not reached: %s", g.uuid, want.value, e)
            return
        self._epochs[g.uuid] = value
        if value != want.value:  # someone else pushed the counter: the owner must sign again
            log.warning("group %s: approval counter at %d, not %d", g.uuid, value, want.value)

    def ensure_ak(self, g: GroupRecord) -> GroupRecord:
        """`g` with its attestation key, made (ECC) and stored now if it has none yet."""
        if g.ak_public:
            return g
        with self._lock:
            current = self._store.group(str(g.uuid))
            if current is None:
                raise ManagerError(f"group {g.uuid} does not exist")
            if current.ak_public:  # another thread made it meanwhile
                return current
            ak = self.attestation.create_ak(DEFAULT_AK_ALG)
            self._store.set_group_ak(g.uuid, DEFAULT_AK_ALG, ak.public, ak.private)
            log.info("group %s (%s): made its attestation key", g.name, g.uuid)
            return replace(
                current, ak_alg=DEFAULT_AK_ALG, ak_public=ak.public, ak_private=ak.private
            )

    @staticmethod
    def ak(g: GroupRecord) -> SealedObject:
        """The group's attestation key blobs (call `ensure_ak` first)."""
        if not g.ak_public:
            raise ManagerError(f"group {g.name} has no attestation key yet")
        return SealedObject(g.ak_public, g.ak_private)

    def forget(self, group_uuid: uuid.UUID) -> None:
        with self._lock:
            self._keys.pop(group_uuid, None)
            self._status.pop(group_uuid, None)

    # vTPM state keys ------------------------------------------------------------------------

    def _wrapper(self, group_uuid: uuid.UUID) -> AESGCM:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_WRAP_INFO)
        return AESGCM(hkdf.derive(self.key(group_uuid)))

    def wrap_state_key(
        self, group_uuid: uuid.UUID, vtpm_uuid: uuid.UUID, state_key: bytes
    ) -> bytes:
        nonce = secrets.token_bytes(12)
        aad = _WRAP_AAD + vtpm_uuid.bytes + group_uuid.bytes
        return nonce + self._wrapper(group_uuid).encrypt(nonce, state_key, aad)

    def unwrap_state_key(
        self, group_uuid: uuid.UUID, vtpm_uuid: uuid.UUID, wrapped: bytes
    ) -> bytes:
        aad = _WRAP_AAD + vtpm_uuid.bytes + group_uuid.bytes
        try:
            return self._wrapper(group_uuid).decrypt(wrapped[:12], wrapped[12:], aad)
        except (InvalidTag, ValueError):
            log.debug("state key of vTPM %s does not unwrap", vtpm_uuid)
            raise VtpmError("the vTPM's state key cannot be released") from None
