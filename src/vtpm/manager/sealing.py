"""Sealing to the hardware TPM: group keys sealed under a PCR policy, unsealed in a policy session.

The policy layout is `vtpm.tpm.policy`'s: PolicyOR(epoch(states_root), PolicyAuthorize(owner)).
A sealed object is released either because the host's PCRs match a permitted state (PolicyPCR,
then PolicyOR up the states tree, then PolicyNV on the group's approval counter), or because
the group owner signed a new set of states that includes the current one, at the counter's
current epoch (the same steps, then PolicyAuthorize with a ticket from VerifySignature). With
`epoch=None` (a group from before approval counters) the PolicyNV step is left out.

Rules:
- A sealed object is a keyed-hash object under the storage primary with no userWithAuth: the
  empty authValue opens nothing, only its policy does.
- The secret never crosses the TCTI in the clear: Create uses an HMAC session salted to the
  storage primary with command parameter encryption, Unseal uses a policy session salted the
  same way with response parameter encryption (AES-128-CFB).
- Every TPM refusal of an unseal is one opaque SealError (details at debug level only); the
  connection, retries and flushing are `HardwareTpm`'s (`run`, `flushing`, `salted_session`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from tpm2_pytss import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_EO,
    TPM2_SE,
    TPM2B_DIGEST,
    TPM2B_OPERAND,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPMA_OBJECT,
    TPMA_SESSION,
    TPML_DIGEST,
    TPML_PCR_SELECTION,
    TPMS_SENSITIVE_CREATE,
    TPMS_SIGNATURE_ECC,
    TPMT_PUBLIC,
    TPMT_SIGNATURE,
)

from vtpm.errors import ConfigError, SealError
from vtpm.manager.hwtpm import HardwareTpm, SealedObject
from vtpm.tpm import policy
from vtpm.tpm.policy import Epoch, OrTree, PcrState

log = logging.getLogger(__name__)

MAX_SECRET = 128  # MAX_SYM_DATA: the largest sealed data object a TPM must accept
MAX_POLICY_REF = 64  # a TPM2B_NONCE

# policy only: no USERWITHAUTH, so the empty authValue opens nothing
_SEALED_ATTRIBUTES = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.NODA


def create_object(hw: HardwareTpm, ectx: Any, template: Any, sensitive: Any) -> SealedObject:
    """TPM2_Create of `template` under the storage primary (inside `HardwareTpm.run`), its
    sensitive part sent parameter-encrypted in a session salted to the primary, so a secret
    or an authValue never crosses the TCTI in clear; the object as its TPM blobs."""
    with hw.flushing(ectx) as handles:
        session = hw.salted_session(ectx, TPM2_SE.HMAC, TPMA_SESSION.DECRYPT)
        handles.append(session)
        private, public, *_ = ectx.create(
            hw.primary, sensitive, TPM2B_PUBLIC(template), session1=session
        )
    return SealedObject(public=bytes(public.marshal()), private=bytes(private.marshal()))


class SealingTpm:
    """Seal and unseal on the hardware TPM. Thread-safe through `HardwareTpm.run`."""

    def __init__(self, hw: HardwareTpm) -> None:
        self.hw = hw

    def seal(self, secret: bytes, auth_policy: bytes) -> SealedObject:
        """Seal `secret` (1..128 bytes) to be released only through `auth_policy`."""
        if not 1 <= len(secret) <= MAX_SECRET:
            raise ConfigError(f"a sealed secret is 1..{MAX_SECRET} bytes, not {len(secret)}")
        if len(auth_policy) != policy.DIGEST_SIZE:
            raise ConfigError("an authPolicy is a SHA-256 digest")
        template = TPMT_PUBLIC(
            type=TPM2_ALG.KEYEDHASH,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=_SEALED_ATTRIBUTES,
            authPolicy=TPM2B_DIGEST(auth_policy),
        )
        template.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(secret)))

        def op(ectx: Any) -> SealedObject:
            return create_object(self.hw, ectx, template, sensitive)

        return self.hw.run("sealing", op, lambda: SealError("sealing failed"))

    def unseal_with_pcrs(
        self,
        obj: SealedObject,
        state: PcrState,
        tree: OrTree,
        index: int,
        authorize_digest: bytes,
        epoch: Epoch | None = None,
    ) -> bytes:
        """Unseal `obj` because the host PCRs equal `state`, leaf `index` of `tree`, and the
        approval counter holds `epoch`.

        The TPM compares its current PCRs (PolicyPCR with an empty pcrDigest) and counter;
        `state` and `index` only name the OR branch to walk up, and must agree with each other."""
        path = _path(tree, state, index)
        top = [policy.at_epoch(tree.root, epoch), authorize_digest]

        def steps(ectx: Any, session: Any, _handles: list[Any]) -> None:
            ectx.policy_pcr(session, TPM2B_DIGEST(), _pcr_selection(state))
            for branches in path:
                ectx.policy_or(session, _digest_list(branches))
            _policy_epoch(ectx, session, epoch)
            ectx.policy_or(session, _digest_list(top))

        return self._unseal(obj, steps)

    def unseal_with_approval(
        self,
        obj: SealedObject,
        state: PcrState,
        approved: OrTree,
        index: int,
        sealed_branch: bytes,
        owner_public: bytes,
        policy_ref: bytes,
        signature_der: bytes,
        epoch: Epoch | None = None,
    ) -> bytes:
        """Unseal `obj` through PolicyAuthorize: the owner signed `approved` at `epoch` (which
        the counter must hold), and its leaf `index` is the host's current `state`.
        `sealed_branch` is the other branch of the seal's PolicyOR (`policy.at_epoch` of the states
        it was sealed under)."""
        path = _path(approved, state, index)
        if len(policy_ref) > MAX_POLICY_REF:
            raise ConfigError(f"a policyRef is at most {MAX_POLICY_REF} bytes")
        external = _external_public(owner_public)
        owner_name = policy.object_name(owner_public)
        top = [sealed_branch, policy.policy_authorize(owner_name, policy_ref)]
        approved_policy = policy.at_epoch(approved.root, epoch)
        a_hash = policy.authorization_hash(approved_policy, policy_ref)
        signature = _ecdsa_signature(signature_der)

        def steps(ectx: Any, session: Any, handles: list[Any]) -> None:
            ectx.policy_pcr(session, TPM2B_DIGEST(), _pcr_selection(state))
            for branches in path:
                ectx.policy_or(session, _digest_list(branches))
            _policy_epoch(ectx, session, epoch)
            key = ectx.load_external(external, hierarchy=ESYS_TR.OWNER)
            handles.append(key)
            name = bytes(ectx.tr_get_name(key))
            ticket = ectx.verify_signature(key, TPM2B_DIGEST(a_hash), signature)
            handles.remove(key)  # free its slot before the sealed object loads
            ectx.flush_context(key)
            ectx.policy_authorize(session, TPM2B_DIGEST(approved_policy), name, ticket, policy_ref)
            ectx.policy_or(session, _digest_list(top))

        return self._unseal(obj, steps)

    def _unseal(self, obj: SealedObject, steps: Callable[[Any, Any, list[Any]], None]) -> bytes:
        try:
            public, _ = TPM2B_PUBLIC.unmarshal(obj.public)
            private, _ = TPM2B_PRIVATE.unmarshal(obj.private)
        except Exception:  # pytss raises several types: a damaged blob
            log.debug("a sealed object does not unmarshal")
            raise SealError("unsealing failed") from None

        def op(ectx: Any) -> bytes:
            with self.hw.flushing(ectx) as handles:
                session = self.hw.salted_session(ectx, TPM2_SE.POLICY, TPMA_SESSION.ENCRYPT)
                handles.append(session)
                steps(ectx, session, handles)
                item = ectx.load(self.hw.primary, private, public)
                handles.append(item)
                data = ectx.unseal(item, session1=session)
            return bytes(data)

        return self.hw.run("unsealing", op, lambda: SealError("unsealing failed"))


def _policy_epoch(ectx: Any, session: Any, epoch: Epoch | None) -> None:
    """PolicyNV(approval counter == epoch); the TPM reads the counter itself."""
    if epoch is None:
        return
    tr = ectx.tr_from_tpmpublic(epoch.nv)
    try:
        ectx.policy_nv(tr, tr, session, TPM2B_OPERAND(epoch.operand()), TPM2_EO.EQ)
    finally:
        ectx.tr_close(tr)


def _path(tree: OrTree, state: PcrState, index: int) -> list[tuple[bytes, ...]]:
    """The PolicyOR lists from `state`, leaf `index`, up to the root (a caller's bug if not)."""
    try:
        path = tree.path(index)
    except IndexError:
        count = len(tree.leaves)
        raise ConfigError(f"state index {index} is outside the policy's {count} states") from None
    if tree.leaves[index] != state.policy():
        raise ConfigError(f"the PCR state given is not leaf {index} of the policy")
    return path


def _pcr_selection(state: PcrState) -> Any:
    sel, _ = TPML_PCR_SELECTION.unmarshal(policy.pcr_selection(state.pcrs))
    return sel


def _digest_list(branches: Sequence[bytes]) -> Any:
    return TPML_DIGEST([TPM2B_DIGEST(b) for b in branches])


def _external_public(owner_public: bytes) -> Any:
    try:
        tpmt, used = TPMT_PUBLIC.unmarshal(owner_public)
    except Exception:  # pytss raises several types
        raise ConfigError("the owner public key is not a marshalled TPMT_PUBLIC") from None
    if used != len(owner_public):
        raise ConfigError("the owner public key has trailing bytes")
    return TPM2B_PUBLIC(tpmt)


def _ecdsa_signature(der: bytes) -> Any:
    try:
        r, s = decode_dss_signature(der)
        r_bytes, s_bytes = r.to_bytes(32, "big"), s.to_bytes(32, "big")
    except (ValueError, OverflowError):
        log.debug("the owner's signature is not a DER ECDSA P-256 signature")
        raise SealError("unsealing failed") from None
    sig = TPMT_SIGNATURE(sigAlg=TPM2_ALG.ECDSA)
    sig.signature.ecdsa = TPMS_SIGNATURE_ECC(
        hash=TPM2_ALG.SHA256, signatureR=r_bytes, signatureS=s_bytes
    )
    return sig
