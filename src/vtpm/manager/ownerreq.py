"""Requests signed by a group's owner: the only way to change a group's trust.

A group's permitted host PCR states and permitted labels change only through a request the
group owner signs (ECDSA P-256) with a strictly increasing sequence number, so the host
administrator alone cannot re-point a group. The same key approves, for the hardware TPM, the
new set of PCR states: it signs the aHash of PolicyAuthorize,

    approval = ECDSA(SHA-256(epoch(OrTree(states).root) || policy_ref(group)))

which lets a group whose seal no longer matches the host's PCRs be opened through the
PolicyAuthorize branch of its seal policy (see `vtpm.tpm.policy`). `epoch(.)` is PolicyNV on
the group's approval counter: each request names the epoch it approves (the counter's value
after the Manager applies it: the group's current epoch + 1, which `group show` gives), so an
approval opens the key only until the owner's next request is applied (`vtpm.manager.groups`).
A group from before approval counters has none until the Manager gives it one
(`approval_nv` 0): its requests and approvals have no epoch and its policyRef is the bare uuid;
an epoch group's policyRef is prefixed (`EPOCH_REF`), so no approval signed for the legacy seal
satisfies the new one.

Request file (UTF-8 JSON):

    {"format": "vtpm-owner-request/1",
     "request": "<canonical JSON of the body>",
     "signature": "<hex DER ECDSA-SHA256 over the UTF-8 bytes of that string>"}

The body is `{"approval", "approval_nv", "epoch", "group", "labels", "pcr_states", "seq"}`
(without `approval_nv` and `epoch` for a group without a counter), serialised with sorted keys
and no spaces; the signature covers that exact string, and a body that is not in canonical form
is refused, so one request has exactly one meaning.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from vtpm.errors import AuthError, ConfigError, LabelError, ReplayError
from vtpm.labels import Label
from vtpm.tpm import policy
from vtpm.tpm.policy import Epoch, OrTree, PcrState

log = logging.getLogger(__name__)

FORMAT = "vtpm-owner-request/1"
MAX_REQUEST_SIZE = 1 << 20
COORD_SIZE = 32
BODY_KEYS = frozenset({"approval", "group", "labels", "pcr_states", "seq"})
EPOCH_KEYS = frozenset({"approval_nv", "epoch"})
EPOCH_REF = b"vtpm approval epoch/1:"  # policyRef prefix of a group with an approval counter
BAD_SIGNATURE = "the owner's signature on the request is not valid"

PublicKey = ec.EllipticCurvePublicKey
PrivateKey = ec.EllipticCurvePrivateKey


# -- keys ------------------------------------------------------------------------------------


def _check_curve(curve: ec.EllipticCurve, what: str) -> None:
    if not isinstance(curve, ec.SECP256R1):
        raise ConfigError(f"{what} is an ECC key on {curve.name}; an owner key must be P-256")


def load_private_key(path: Path) -> PrivateKey:
    """An owner's private key from an unencrypted PEM file; P-256 only."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read owner key {path}: {e.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{path} is not an ECC key; an owner key must be P-256")
    _check_curve(key.curve, str(path))
    return key


def load_public_key(pem: bytes) -> PublicKey:
    """An owner's public key from PEM (SubjectPublicKeyInfo); P-256 only."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError("the owner key is not a PEM public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError("the owner key is not an ECC key; an owner key must be P-256")
    _check_curve(key.curve, "the owner key")
    return key


def public_pem(key: PrivateKey | PublicKey) -> bytes:
    """PEM SubjectPublicKeyInfo of an owner key (given the private or the public half)."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey) else key
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def generate_private_key(path: Path) -> PrivateKey:
    """Create a new P-256 owner key at `path` (PEM PKCS8, unencrypted, mode 0600).

    Refuses to overwrite anything, symlinks included.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise ConfigError(f"{path} already exists; refusing to overwrite it") from None
    except OSError as e:
        raise ConfigError(f"cannot create owner key {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        Path(path).unlink(missing_ok=True)
        raise ConfigError(f"cannot write owner key {path}: {e.strerror}") from None
    return key


def tpm_public(pub: PublicKey) -> bytes:
    """The owner key as the marshalled TPMT_PUBLIC the hardware TPM loads to verify it."""
    numbers = pub.public_numbers()
    return policy.ecc_p256_verify_public(
        numbers.x.to_bytes(COORD_SIZE, "big"), numbers.y.to_bytes(COORD_SIZE, "big")
    )


def key_name(pub: PublicKey) -> bytes:
    """The TPM name of the owner key (nameAlg SHA-256)."""
    return policy.object_name(tpm_public(pub))


def policy_ref(group_uuid: uuid.UUID, approval_nv: int = 0) -> bytes:
    """The policyRef that binds an owner approval to one group: its uuid's 16 bytes, after
    `EPOCH_REF` once the group has an approval counter (`approval_nv` not 0)."""
    return (EPOCH_REF if approval_nv else b"") + group_uuid.bytes


def authorize_digest(pub: PublicKey, group_uuid: uuid.UUID, approval_nv: int = 0) -> bytes:
    """The PolicyAuthorize branch of a group's seal policy."""
    return policy.policy_authorize(key_name(pub), policy_ref(group_uuid, approval_nv))


# -- approvals -------------------------------------------------------------------------------


def approved_policy(states: Sequence[PcrState], epoch: Epoch | None) -> bytes:
    """The policy digest an approval of `states` (at `epoch`, if the group has a counter)
    authorizes: what PolicyAuthorize is given as approvedPolicy."""
    return policy.at_epoch(OrTree.of_states(states).root, epoch)


def _approval_hash(states: Sequence[PcrState], group: uuid.UUID, epoch: Epoch | None) -> bytes:
    ref = policy_ref(group, 0 if epoch is None else epoch.nv)
    return policy.authorization_hash(approved_policy(states, epoch), ref)


def sign_approval(
    key: PrivateKey, states: Sequence[PcrState], group: uuid.UUID, epoch: Epoch | None = None
) -> bytes:
    """DER ECDSA signature approving `states` for `group` at `epoch` (what
    TPM2_PolicyAuthorize checks)."""
    digest = _approval_hash(states, group, epoch)
    return key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))


def verify_approval(
    owner_pub: PublicKey,
    states: Sequence[PcrState],
    group: uuid.UUID,
    approval: bytes,
    epoch: Epoch | None = None,
) -> bool:
    """Whether `approval` is the owner's approval of `states` for `group` at `epoch`."""
    try:
        owner_pub.verify(
            approval,
            _approval_hash(states, group, epoch),
            ec.ECDSA(utils.Prehashed(hashes.SHA256())),
        )
    except (InvalidSignature, ValueError):
        return False
    return True


# -- requests --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OwnerRequest:
    """A group's new PCR states and permitted labels, as the owner signed them."""

    group: uuid.UUID
    seq: int
    pcr_states: tuple[PcrState, ...]
    labels: tuple[str, ...]
    approval: bytes
    epoch: Epoch | None = None  # the approval counter's value once applied (None: no counter)

    def __post_init__(self) -> None:
        if type(self.seq) is not int or self.seq < 1:
            raise ConfigError(
                f"a request's sequence number must be an integer >= 1, not {self.seq!r}"
            )
        if not self.pcr_states:
            raise ConfigError("a request must list at least one permitted PCR state")
        if not all(isinstance(s, PcrState) for s in self.pcr_states):
            raise ConfigError("a request's PCR states must be PcrState objects")
        for text in self.labels:
            Label.parse(text)
        if len(set(self.labels)) != len(self.labels):
            raise ConfigError("a request lists a label twice")
        if not self.approval:
            raise ConfigError("a request needs the owner's approval of its PCR states")
        if self.epoch is not None and not isinstance(self.epoch, Epoch):
            raise ConfigError("a request's epoch must be an Epoch")

    def permitted_labels(self) -> tuple[Label, ...]:
        return tuple(Label.parse(t) for t in self.labels)

    def kernel_hashes(self) -> tuple[bytes, ...]:
        """The permitted labels' digests, as a group lists them."""
        return tuple(label.digest() for label in self.permitted_labels())

    def body(self) -> str:
        """The canonical JSON the owner signs."""
        raw: dict[str, object] = {
            "approval": self.approval.hex(),
            "group": str(self.group),
            "labels": list(self.labels),
            "pcr_states": [s.to_json() for s in self.pcr_states],
            "seq": self.seq,
        }
        if self.epoch is not None:
            raw |= {"approval_nv": self.epoch.nv, "epoch": self.epoch.value}
        return json.dumps(raw, sort_keys=True, separators=(",", ":"))


def sign_request(
    key: PrivateKey,
    group: uuid.UUID,
    seq: int,
    pcr_states: Sequence[PcrState],
    labels: Sequence[str],
    epoch: Epoch | None = None,
) -> bytes:
    """A request file setting `group`'s PCR states and labels, signed with the owner's key;
    `epoch`: the group's next epoch (its current one + 1), None for a group without a
    counter."""
    states = tuple(pcr_states)
    approval = sign_approval(key, states, group, epoch) if states else b""
    req = OwnerRequest(group, seq, states, tuple(labels), approval, epoch)
    body = req.body()
    signature = key.sign(body.encode(), ec.ECDSA(hashes.SHA256()))
    doc = {"format": FORMAT, "request": body, "signature": signature.hex()}
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def _parse_envelope(data: bytes) -> tuple[str, bytes, bytes]:
    if len(data) > MAX_REQUEST_SIZE:
        raise ConfigError(f"an owner request is at most {MAX_REQUEST_SIZE} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ConfigError("the owner request is not UTF-8 JSON") from None
    if not isinstance(doc, dict) or set(doc) != {"format", "request", "signature"}:
        raise ConfigError("an owner request has exactly: format, request, signature")
    if doc["format"] != FORMAT:
        raise ConfigError(f"unsupported owner request format {str(doc['format'])[:64]!r}")
    body, sig_hex = doc["request"], doc["signature"]
    if not isinstance(body, str) or not isinstance(sig_hex, str):
        raise ConfigError("an owner request's request and signature are strings")
    try:
        signature = bytes.fromhex(sig_hex)
    except ValueError:
        raise ConfigError("the owner request's signature is not hex") from None
    try:
        signed = body.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escaped in the JSON
        raise ConfigError("the owner request's request is not valid Unicode") from None
    return body, signed, signature


def _parse_body(body: str) -> OwnerRequest:
    try:
        raw = json.loads(body)
    except ValueError:
        raise ConfigError("the signed request is not JSON") from None
    if not isinstance(raw, dict) or set(raw) not in (BODY_KEYS, BODY_KEYS | EPOCH_KEYS):
        keys = ", ".join(sorted(BODY_KEYS))
        raise ConfigError(f"a signed request has exactly: {keys} (and approval_nv, epoch)")
    group, states, labels, approval = (
        raw["group"],
        raw["pcr_states"],
        raw["labels"],
        raw["approval"],
    )
    if not isinstance(group, str) or not isinstance(approval, str):
        raise ConfigError("a signed request's group and approval are strings")
    if not isinstance(states, list) or not isinstance(labels, list):
        raise ConfigError("a signed request's pcr_states and labels are lists")
    if not all(isinstance(t, str) for t in labels):
        raise ConfigError("a signed request's labels are strings")
    try:
        group_uuid = uuid.UUID(group)
        approval_bytes = bytes.fromhex(approval)
    except ValueError:
        raise ConfigError(
            "a signed request's group is not a uuid or its approval not hex"
        ) from None
    epoch = Epoch(raw["approval_nv"], raw["epoch"]) if "epoch" in raw else None
    try:
        req = OwnerRequest(
            group_uuid,
            raw["seq"],
            tuple(PcrState.from_json(s) for s in states),
            tuple(labels),
            approval_bytes,
            epoch,
        )
    except LabelError as e:
        raise ConfigError(f"a signed request lists a bad label: {e}") from None
    if req.body() != body:
        raise ConfigError("the signed request is not in canonical form")
    return req


def verify_request(
    data: bytes,
    owner_pub: PublicKey,
    *,
    group: uuid.UUID,
    last_seq: int,
    epoch: Epoch | None = None,
) -> OwnerRequest:
    """The request in `data`, once its signature, group, approval, sequence number and epoch
    check; `epoch` is the one it must approve (the group's next), None for a group without an
    approval counter.

    ConfigError: malformed file, or a request for another counter or a later epoch.
    AuthError: bad signature or approval, or another group's request. ReplayError: sequence
    number not above `last_seq`, or an epoch the group has left.
    """
    body, signed, signature = _parse_envelope(data)
    try:
        owner_pub.verify(signature, signed, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        log.debug("owner request refused: signature does not verify")
        raise AuthError(BAD_SIGNATURE) from None
    req = _parse_body(body)
    if req.group != group:
        log.debug("owner request refused: it is for group %s, not %s", req.group, group)
        raise AuthError(BAD_SIGNATURE)
    if not verify_approval(owner_pub, req.pcr_states, group, req.approval, req.epoch):
        log.debug("owner request refused: approval of the PCR states does not verify")
        raise AuthError(BAD_SIGNATURE)
    if req.seq <= last_seq:
        raise ReplayError(
            f"request sequence number {req.seq} is not above the last accepted {last_seq}"
        )
    _check_epoch(req.epoch, epoch)
    return req


def _check_epoch(got: Epoch | None, want: Epoch | None) -> None:
    if want is None and got is not None:
        raise ConfigError("the request names an approval epoch; the group has no counter yet")
    if want is None or got == want:
        return
    if got is None:
        raise ConfigError(
            f"the group approves by epoch (counter 0x{want.nv:08x}, next epoch {want.value}): "
            "sign the request again (`vtpm group sign` takes the epoch from `group show`)"
        )
    if got.nv != want.nv:
        raise ConfigError(
            f"the request is for approval counter 0x{got.nv:08x}; the group's is 0x{want.nv:08x}"
        )
    if got.value < want.value:
        raise ReplayError(
            f"the request approves epoch {got.value}; the group is past it (next epoch "
            f"{want.value}): sign it again"
        )
    raise ConfigError(f"the request approves epoch {got.value}; the group's next is {want.value}")
