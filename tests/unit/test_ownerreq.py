"""Owner-signed requests: keys, approvals, signatures, replay and malformed files (real crypto)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from vtpm.errors import AuthError, ConfigError, LabelError, ReplayError
from vtpm.labels import Label
from vtpm.manager import ownerreq
from vtpm.manager.ownerreq import (
    OwnerRequest,
    authorize_digest,
    generate_private_key,
    key_name,
    load_private_key,
    load_public_key,
    policy_ref,
    public_pem,
    sign_approval,
    sign_request,
    tpm_public,
    verify_approval,
    verify_request,
)
from vtpm.tpm import policy
from vtpm.tpm.policy import OrTree, PcrState

GROUP = uuid.UUID("6a0d3bd8-8f4e-4a55-9d4b-1c1f0d2e3a4b")
OTHER_GROUP = uuid.UUID("00000000-0000-4000-8000-000000000001")
KEY = ec.derive_private_key(0x1234567890ABCDEF, ec.SECP256R1())
OTHER_KEY = ec.derive_private_key(0xFEDCBA0987654321, ec.SECP256R1())
PUB = KEY.public_key()
STATES = (
    PcrState.from_values({0: bytes(32), 7: b"\x11" * 32}),
    PcrState.from_values({0: bytes(32), 4: b"\x22" * 32, 7: b"\x11" * 32}),
)
LABELS = ("*:vm_r:vtpm_t", "system_u:system_r:vtpm_t")
BAD = "the owner's signature on the request is not valid"

# NIST P-256 base point G (FIPS 186-4 D.1.2.3): the public key of private scalar 1.
GX = bytes.fromhex("6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296")
GY = bytes.fromhex("4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5")


def _envelope(body: str, key: ec.EllipticCurvePrivateKey = KEY, **extra: object) -> bytes:
    sig = key.sign(body.encode(), ec.ECDSA(hashes.SHA256()))
    doc = {"format": "vtpm-owner-request/1", "request": body, "signature": sig.hex(), **extra}
    return json.dumps(doc).encode()


def _body(**changes: object) -> dict[str, object]:
    raw = json.loads(json.loads(sign_request(KEY, GROUP, 5, STATES, LABELS))["request"])
    assert isinstance(raw, dict)
    raw.update(changes)
    return raw


def _canonical(raw: object) -> str:
    return json.dumps(raw, sort_keys=True, separators=(",", ":"))


# -- keys ------------------------------------------------------------------------------------


def test_generate_and_load_key(tmp_path: Path) -> None:
    path = tmp_path / "owner.pem"
    key = generate_private_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS8, unencrypted
    loaded = load_private_key(path)
    assert public_pem(loaded) == public_pem(key) == public_pem(key.public_key())
    assert load_public_key(public_pem(key)).public_numbers() == key.public_key().public_numbers()


def test_generate_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "owner.pem"
    path.write_bytes(b"precious")
    with pytest.raises(ConfigError, match="already exists"):
        generate_private_key(path)
    assert path.read_bytes() == b"precious"
    link = tmp_path / "link.pem"
    link.symlink_to(tmp_path / "elsewhere.pem")
    with pytest.raises(ConfigError):
        generate_private_key(link)
    assert not (tmp_path / "elsewhere.pem").exists()
    with pytest.raises(ConfigError, match="cannot create"):
        generate_private_key(tmp_path / "no-dir" / "owner.pem")


def _write_key(path: Path, key: object, password: bytes | None = None) -> Path:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    assert isinstance(
        key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    )
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    )
    return path


def test_non_p256_private_keys_are_refused(tmp_path: Path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    edkey = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(ConfigError, match=r"secp384r1.*must be P-256"):
        load_private_key(_write_key(tmp_path / "p384.pem", p384))
    with pytest.raises(ConfigError, match="not an ECC key"):
        load_private_key(_write_key(tmp_path / "rsa.pem", rsa_key))
    with pytest.raises(ConfigError, match="not an ECC key"):
        load_private_key(_write_key(tmp_path / "ed.pem", edkey))
    with pytest.raises(ConfigError, match="not an unencrypted PEM"):
        load_private_key(_write_key(tmp_path / "enc.pem", KEY, b"secret"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="not an unencrypted PEM"):
        load_private_key(garbage)
    with pytest.raises(ConfigError, match="cannot read owner key"):
        load_private_key(tmp_path / "missing.pem")


def test_non_p256_public_keys_are_refused() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(ConfigError, match="must be P-256"):
        load_public_key(public_pem_any(p384.public_key()))
    with pytest.raises(ConfigError, match="not an ECC key"):
        load_public_key(public_pem_any(rsa_key.public_key()))
    with pytest.raises(ConfigError, match="not a PEM public key"):
        load_public_key(b"not a key")


def public_pem_any(pub: ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    return pub.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_key_name_by_hand() -> None:
    pub = ec.derive_private_key(1, ec.SECP256R1()).public_key()
    marshalled = (
        bytes.fromhex("0023000b00040040000000100018000b00030010")
        + bytes.fromhex("0020")
        + GX
        + bytes.fromhex("0020")
        + GY
    )
    assert tpm_public(pub) == marshalled
    assert key_name(pub) == bytes.fromhex("000b") + hashlib.sha256(marshalled).digest()


def test_authorize_digest_by_hand() -> None:
    assert policy_ref(GROUP) == GROUP.bytes
    inner = hashlib.sha256(bytes(32) + bytes.fromhex("0000016a") + key_name(PUB)).digest()
    assert authorize_digest(PUB, GROUP) == hashlib.sha256(inner + GROUP.bytes).digest()
    assert authorize_digest(PUB, GROUP) != authorize_digest(PUB, OTHER_GROUP)
    assert authorize_digest(PUB, GROUP) != authorize_digest(OTHER_KEY.public_key(), GROUP)


# -- approvals -------------------------------------------------------------------------------


def test_approval_verifies_and_is_bound() -> None:
    approval = sign_approval(KEY, STATES, GROUP)
    assert verify_approval(PUB, STATES, GROUP, approval)
    assert verify_approval(PUB, list(STATES), GROUP, approval)
    assert not verify_approval(PUB, STATES, OTHER_GROUP, approval)
    assert not verify_approval(PUB, STATES[:1], GROUP, approval)
    assert not verify_approval(PUB, STATES[::-1], GROUP, approval)  # the OR tree is ordered
    assert not verify_approval(OTHER_KEY.public_key(), STATES, GROUP, approval)
    assert not verify_approval(PUB, STATES, GROUP, b"")
    assert not verify_approval(PUB, STATES, GROUP, b"\x30\x02\x00\x00")


# -- requests --------------------------------------------------------------------------------


def test_round_trip() -> None:
    data = sign_request(KEY, GROUP, 5, STATES, LABELS)
    doc = json.loads(data)
    assert doc["format"] == "vtpm-owner-request/1"
    req = verify_request(data, PUB, group=GROUP, last_seq=4)
    assert req.group == GROUP
    assert req.seq == 5
    assert req.pcr_states == STATES
    assert req.labels == LABELS
    assert verify_approval(PUB, req.pcr_states, GROUP, req.approval)
    assert req.kernel_hashes() == (
        hashlib.sha256(b"*:vm_r:vtpm_t").digest(),
        hashlib.sha256(b"system_u:system_r:vtpm_t").digest(),
    )
    assert req.permitted_labels()[1] == Label("system_u", "system_r", "vtpm_t")
    assert doc["request"] == req.body()
    assert json.loads(doc["request"]) == {
        "approval": req.approval.hex(),
        "group": str(GROUP),
        "labels": list(LABELS),
        "pcr_states": [s.to_json() for s in STATES],
        "seq": 5,
    }
    # a loaded PEM public key verifies as well as the in-memory one
    assert verify_request(data, load_public_key(public_pem(KEY)), group=GROUP, last_seq=0) == req


@pytest.mark.parametrize(
    "change",
    [
        {"seq": 6},
        {"labels": ["*:vm_r:vtpm_t"]},
        {"labels": ["*:vm_r:vtpm_t", "system_u:system_r:vtpm_s"]},
        {"group": str(OTHER_GROUP)},
        {"pcr_states": [STATES[0].to_json()]},
    ],
)
def test_tampered_request_field(change: dict[str, object]) -> None:
    doc = json.loads(sign_request(KEY, GROUP, 5, STATES, LABELS))
    doc["request"] = _canonical(_body(**change))
    with pytest.raises(AuthError) as e:
        verify_request(json.dumps(doc).encode(), PUB, group=GROUP, last_seq=0)
    assert str(e.value) == BAD
    assert not isinstance(e.value, ReplayError)


def test_tampered_signature() -> None:
    doc = json.loads(sign_request(KEY, GROUP, 5, STATES, LABELS))
    sig = bytearray(bytes.fromhex(doc["signature"]))
    for index in (len(sig) - 1, len(sig) // 2, 0):
        bad = bytearray(sig)
        bad[index] ^= 0x01
        doc["signature"] = bad.hex()
        with pytest.raises(AuthError, match=BAD):
            verify_request(json.dumps(doc).encode(), PUB, group=GROUP, last_seq=0)
    doc["signature"] = ""
    with pytest.raises(AuthError, match=BAD):
        verify_request(json.dumps(doc).encode(), PUB, group=GROUP, last_seq=0)


def test_signed_by_another_key() -> None:
    data = sign_request(OTHER_KEY, GROUP, 5, STATES, LABELS)
    with pytest.raises(AuthError, match=BAD):
        verify_request(data, PUB, group=GROUP, last_seq=0)
    # the same request, re-signed by the owner but carrying the other key's approval
    with pytest.raises(AuthError, match=BAD):
        verify_request(_envelope(json.loads(data)["request"]), PUB, group=GROUP, last_seq=0)


def test_request_for_another_group() -> None:
    data = sign_request(KEY, OTHER_GROUP, 5, STATES, LABELS)
    assert verify_request(data, PUB, group=OTHER_GROUP, last_seq=0).group == OTHER_GROUP
    with pytest.raises(AuthError, match=BAD):
        verify_request(data, PUB, group=GROUP, last_seq=0)


def test_approval_for_other_states_or_group() -> None:
    other_states = sign_approval(KEY, STATES[:1], GROUP).hex()
    other_group = sign_approval(KEY, STATES, OTHER_GROUP).hex()
    for approval in (other_states, other_group):
        data = _envelope(_canonical(_body(approval=approval)))
        with pytest.raises(AuthError, match=BAD):
            verify_request(data, PUB, group=GROUP, last_seq=0)


def test_replay() -> None:
    data = sign_request(KEY, GROUP, 5, STATES, LABELS)
    assert verify_request(data, PUB, group=GROUP, last_seq=4).seq == 5
    for last in (5, 6, 1000):
        with pytest.raises(ReplayError) as e:
            verify_request(data, PUB, group=GROUP, last_seq=last)
        assert "5" in str(e.value)
        assert str(last) in str(e.value)
        assert isinstance(e.value, AuthError)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'"text"',
        b"{}",
        b'{"format": "vtpm-owner-request/1", "request": "{}"}',
        b'{"format": "vtpm-owner-request/2", "request": "{}", "signature": "00"}',
        b'{"format": "vtpm-owner-request/1", "request": 5, "signature": "00"}',
        b'{"format": "vtpm-owner-request/1", "request": "{}", "signature": 5}',
        b'{"format": "vtpm-owner-request/1", "request": "{}", "signature": "zz"}',
        b'{"format": "vtpm-owner-request/1", "request": "{}", "signature": "0"}',
        b'{"format": "vtpm-owner-request/1", "request": "\\ud800", "signature": "00"}',
        b'{"format": ["x"], "request": "{}", "signature": "00"}',
        b'{"format": "vtpm-owner-request/1", "request": "{}", "signature": "00", "x": 1}',
        b" " * (ownerreq.MAX_REQUEST_SIZE + 1),
    ],
)
def test_malformed_envelope(data: bytes) -> None:
    with pytest.raises(ConfigError):
        verify_request(data, PUB, group=GROUP, last_seq=0)


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[]",
        _canonical({}),
        _canonical({k: v for k, v in _body().items() if k != "labels"}),
        _canonical(_body(extra=1)),
        _canonical(_body(seq=0)),
        _canonical(_body(seq=-3)),
        _canonical(_body(seq=True)),
        _canonical(_body(seq="6")),
        _canonical(_body(seq=6.0)),
        _canonical(_body(group="not-a-uuid")),
        _canonical(_body(group=5)),
        _canonical(_body(approval="zz")),
        _canonical(_body(approval="")),
        _canonical(_body(approval=None)),
        _canonical(_body(labels="*:vm_r:vtpm_t")),
        _canonical(_body(labels=["*:vm_r"])),
        _canonical(_body(labels=[5])),
        _canonical(_body(labels=["a:b:c", "a:b:c"])),
        _canonical(_body(pcr_states=[])),
        _canonical(_body(pcr_states={})),
        _canonical(_body(pcr_states=[{"pcrs": [0], "values": ["00"]}])),
        _canonical(_body(pcr_states=[{"pcrs": [24], "values": ["00" * 32]}])),
        _canonical(_body(pcr_states=["x"])),
        json.dumps(_body(), sort_keys=True),  # signed, but not in canonical form
        _canonical(_body(group=str(GROUP).upper())),
        _canonical(_body(pcr_states=[{"pcrs": ["0"], "values": ["00" * 32]}])),
    ],
)
def test_malformed_signed_body(body: str) -> None:
    with pytest.raises(ConfigError):
        verify_request(_envelope(body), PUB, group=GROUP, last_seq=0)


def test_request_construction_checks() -> None:
    approval = sign_approval(KEY, STATES, GROUP)
    with pytest.raises(ConfigError, match=">= 1"):
        OwnerRequest(GROUP, 0, STATES, LABELS, approval)
    with pytest.raises(ConfigError, match="at least one"):
        OwnerRequest(GROUP, 1, (), LABELS, approval)
    with pytest.raises(ConfigError, match="twice"):
        OwnerRequest(GROUP, 1, STATES, ("a:b:c", "a:b:c"), approval)
    with pytest.raises(LabelError):
        OwnerRequest(GROUP, 1, STATES, ("a:b",), approval)
    with pytest.raises(ConfigError):
        sign_request(KEY, GROUP, 1, (), LABELS)
    with pytest.raises(LabelError):
        sign_request(KEY, GROUP, 1, STATES, ["guest1_u:vm_r:vtpm_t:s0"])
    assert (
        verify_request(sign_request(KEY, GROUP, 1, STATES, []), PUB, group=GROUP, last_seq=0).labels
        == ()
    )


def test_generated_key_signs_requests(tmp_path: Path) -> None:
    path = tmp_path / "owner.pem"
    generate_private_key(path)
    key = load_private_key(path)
    data = sign_request(key, GROUP, 1, STATES, LABELS)
    pub = load_public_key(public_pem(key))
    assert verify_request(data, pub, group=GROUP, last_seq=0).seq == 1
    assert os.stat(path).st_size > 0


# -- approval epochs ---------------------------------------------------------------------------

EPOCH = policy.Epoch(policy.APPROVAL_NV_FIRST, 7)


def test_epoch_request_round_trip_and_binding() -> None:
    data = sign_request(KEY, GROUP, 5, STATES, LABELS, EPOCH)
    body = json.loads(json.loads(data)["request"])
    assert (body["approval_nv"], body["epoch"]) == (EPOCH.nv, 7)
    req = verify_request(data, PUB, group=GROUP, last_seq=4, epoch=EPOCH)
    assert req.epoch == EPOCH
    assert verify_approval(PUB, STATES, GROUP, req.approval, EPOCH)
    # the approval is for that epoch of that counter only, and not a legacy approval
    assert not verify_approval(PUB, STATES, GROUP, req.approval, EPOCH.next())
    assert not verify_approval(PUB, STATES, GROUP, req.approval)
    other_nv = policy.Epoch(EPOCH.nv + 1, 7)
    assert not verify_approval(PUB, STATES, GROUP, req.approval, other_nv)
    # what the TPM is asked to authorize: the states root, then PolicyNV at the epoch
    root = OrTree.of_states(STATES).root
    assert ownerreq.approved_policy(STATES, EPOCH) == policy.epoch_policy(root, EPOCH.nv, 7)
    assert ownerreq.approved_policy(STATES, None) == root
    assert policy_ref(GROUP, EPOCH.nv) == ownerreq.EPOCH_REF + GROUP.bytes
    assert authorize_digest(PUB, GROUP, EPOCH.nv) != authorize_digest(PUB, GROUP)


def test_epoch_mismatches_are_refused() -> None:
    data = sign_request(KEY, GROUP, 5, STATES, LABELS, EPOCH)
    with pytest.raises(ReplayError, match="past it"):  # signed before the group moved on
        verify_request(data, PUB, group=GROUP, last_seq=4, epoch=EPOCH.next())
    with pytest.raises(ConfigError, match="next is 6"):
        verify_request(data, PUB, group=GROUP, last_seq=4, epoch=policy.Epoch(EPOCH.nv, 6))
    with pytest.raises(ConfigError, match="counter"):
        verify_request(data, PUB, group=GROUP, last_seq=4, epoch=policy.Epoch(EPOCH.nv + 1, 7))
    with pytest.raises(ConfigError, match="no counter"):
        verify_request(data, PUB, group=GROUP, last_seq=4)
    legacy = sign_request(KEY, GROUP, 5, STATES, LABELS)
    with pytest.raises(ConfigError, match="sign the request again"):
        verify_request(legacy, PUB, group=GROUP, last_seq=4, epoch=EPOCH)
    # the sequence number is still checked first: a replay stays a replay
    with pytest.raises(ReplayError, match="sequence"):
        verify_request(data, PUB, group=GROUP, last_seq=5, epoch=EPOCH)


@pytest.mark.parametrize(
    "change",
    [{"epoch": 8}, {"epoch": 6}, {"approval_nv": policy.APPROVAL_NV_FIRST + 1}],
)
def test_epoch_fields_are_signed(change: dict[str, object]) -> None:
    doc = json.loads(sign_request(KEY, GROUP, 5, STATES, LABELS, EPOCH))
    raw = json.loads(doc["request"])
    raw.update(change)
    doc["request"] = _canonical(raw)
    with pytest.raises(AuthError, match=BAD):
        verify_request(json.dumps(doc).encode(), PUB, group=GROUP, last_seq=0, epoch=EPOCH)


@pytest.mark.parametrize(
    "change",
    [
        {"epoch": -1},
        {"epoch": 2**64},
        {"epoch": True},
        {"epoch": "7"},
        {"approval_nv": 0x01500000},  # the Manager's floor counter, not an approval counter
        {"approval_nv": None},
    ],
)
def test_malformed_epoch_fields(change: dict[str, object]) -> None:
    raw = json.loads(json.loads(sign_request(KEY, GROUP, 5, STATES, LABELS, EPOCH))["request"])
    raw.update(change)
    with pytest.raises(ConfigError):
        verify_request(_envelope(_canonical(raw)), PUB, group=GROUP, last_seq=0, epoch=EPOCH)
    only_one = {k: v for k, v in raw.items() if k != "approval_nv"}
    with pytest.raises(ConfigError):
        verify_request(_envelope(_canonical(only_one)), PUB, group=GROUP, last_seq=0)
