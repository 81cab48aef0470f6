"""Verify a group's provisioning bundle, and the verifier's side of credential activation.

A bundle (`vtpm.wire.evidence.Bundle`) tells a verifier which attestation key speaks for a group
and what the group permits (labels, host PCR states). Checks:

    bundle.ak            the AK public parses, is a restricted signing key fixed to its TPM,
                         and its name is the bundle's `ak.name`
    bundle.config_quote  the AK's quote over the group configuration verifies: signature,
                         magic, type, signer, PCR selection and digest, and its extraData is
                         config_digest(group), so the group's content is what the AK signed
    bundle.ek            (when the bundle carries an EK certificate) the certificate's key is
                         the EK public the bundle names

That the AK lives in the same TPM as the EK is proven by credential activation, not by the
bundle: `make_credential` wraps a secret to the EK for the AK's name (TPM 2.0 Part 1, 24:
Credential Protection), and only that TPM's ActivateCredential with both keys loaded returns it.

    seed           random, the size of the EK's nameAlg digest
    encryptedSecret RSA-OAEP(EK, seed), OAEP hash = EK nameAlg, label "IDENTITY\\0"
    symKey         KDFa(nameAlg, seed, "STORAGE", AK name, "", EK symmetric key bits)
    encIdentity    AES-CFB(symKey, IV = 0, TPM2B_DIGEST(secret))
    HMACkey        KDFa(nameAlg, seed, "INTEGRITY", "", "", digest bits)
    outerHMAC      HMAC(nameAlg, HMACkey, encIdentity || AK name)
    credentialBlob TPM2B_ID_OBJECT(TPM2B_DIGEST(outerHMAC) || encIdentity)
"""

from __future__ import annotations

import hmac
import os
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from vtpm.tpm.constants import TPM_ALG

try:  # CFB lives in "decrepit" from cryptography 47 on
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB  # type: ignore[assignment,unused-ignore]

from vtpm.errors import ConfigError, LabelError, VerifyError
from vtpm.labels import Label, group_permits, permitted_digests
from vtpm.tpm.constants import TPMA_OBJECT
from vtpm.tpm.hashes import HASHES
from vtpm.tpm.policy import PcrState
from vtpm.tpm.public import TpmPublic, parse_public
from vtpm.verify import quote
from vtpm.verify.verdict import Check, Verdict
from vtpm.wire.evidence import Bundle, config_digest

MAX_LABELS = 1024
MAX_STATES = 4096


# the group a bundle describes ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """What a verifier needs of a bundle's group object."""

    uuid: uuid.UUID
    name: str
    labels: tuple[str, ...]
    pcr_states: tuple[PcrState, ...]

    @property
    def label_hashes(self) -> frozenset[bytes]:
        return permitted_digests(self.labels)

    def permits(self, label: str) -> bool:
        """The group rule of `vtpm.labels.group_permits`, the Manager's: a text that is not a
        label `user:role:type` is permitted by no group."""
        try:
            parsed = Label.parse(label)
        except LabelError:
            return False
        return group_permits(parsed, self.label_hashes)

    @classmethod
    def from_json(cls, raw: Mapping[str, object]) -> GroupInfo:
        """The bundle's `group` object; VerifyError when it is malformed."""
        try:
            group_uuid = uuid.UUID(str(raw.get("uuid")))
        except ValueError:
            raise VerifyError(f"bundle group uuid {raw.get('uuid')!r} is not a uuid") from None
        name = raw.get("name", "")
        labels = raw.get("labels", [])
        states = raw.get("pcr_states", [])
        if not isinstance(name, str):
            raise VerifyError("bundle group name must be a string")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise VerifyError("bundle group labels must be a list of strings")
        if not isinstance(states, list) or len(states) > MAX_STATES or len(labels) > MAX_LABELS:
            raise VerifyError("bundle group pcr_states must be a list (of reasonable length)")
        try:
            parsed = tuple(PcrState.from_json(s) for s in states)
        except ConfigError as e:
            raise VerifyError(f"bundle group pcr_states: {e}") from None
        try:
            permitted_digests(labels)  # a group lists labels, as the Manager checks at creation
        except LabelError as e:
            raise VerifyError(f"bundle group labels: {e}") from None
        return cls(group_uuid, name, tuple(labels), parsed)


# bundle checks --------------------------------------------------------------------------------


def check_bundle_ak(bundle: Bundle) -> tuple[Check, TpmPublic | None]:
    try:
        ak = parse_public(bundle.ak_public)
    except VerifyError as e:
        return Check("bundle.ak", False, f"ak.public does not parse: {e}"), None
    problem = quote.ak_problem(ak)
    if problem:
        return Check("bundle.ak", False, problem), ak
    if not hmac.compare_digest(ak.name, bundle.ak_name):
        return (
            Check(
                "bundle.ak",
                False,
                f"ak.name {bundle.ak_name.hex()} is not the name of ak.public ({ak.name.hex()})",
            ),
            ak,
        )
    return Check("bundle.ak", True, f"{ak.description} restricted signing key, name matches"), ak


def check_config_quote(bundle: Bundle, ak: TpmPublic | None) -> Check:
    if ak is None:
        return Check("bundle.config_quote", False, "no usable AK to check the quote with")
    cq = bundle.config_quote
    try:
        verdict = quote.verify_quote(
            cq.attest,
            cq.signature,
            ak,
            cq.pcrs,
            pcr_bank=cq.pcr_bank,
            nonce=config_digest(bundle.group),
            qualified_name=bundle.ak_qualified_name,
        )
    except VerifyError as e:
        return Check("bundle.config_quote", False, str(e))
    failed = [c for c in verdict.checks if not c.ok and c.id != "quote.ak"]
    if failed:
        why = "; ".join(f"{c.id}: {c.reason}" for c in failed)
        return Check("bundle.config_quote", False, why)
    return Check("bundle.config_quote", True, "the AK signed this group configuration")


def check_ek_certificate(bundle: Bundle) -> Check:
    try:
        ek = parse_public(bundle.ek_public)
    except VerifyError as e:
        return Check("bundle.ek", False, f"ek.public does not parse: {e}")
    assert bundle.ek_certificate is not None
    try:
        cert = x509.load_der_x509_certificate(bundle.ek_certificate)
        cert_key = cert.public_key()
    except ValueError as e:
        return Check("bundle.ek", False, f"ek.certificate is not a DER X.509 certificate: {e}")
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    same = cert_key.public_bytes(der, spki) == ek.key.public_bytes(der, spki)
    reason = (
        "the EK certificate certifies ek.public"
        if same
        else "the EK certificate's key is not ek.public"
    )
    return Check("bundle.ek", same, reason)


def verify_bundle(bundle: Bundle) -> Verdict:
    """Check a provisioning bundle. Raises VerifyError when its group object is malformed."""
    GroupInfo.from_json(bundle.group)
    ak_check, ak = check_bundle_ak(bundle)
    checks = [ak_check, check_config_quote(bundle, ak)]
    if bundle.ek_certificate is not None:
        checks.append(check_ek_certificate(bundle))
    return Verdict(tuple(checks))


# MakeCredential (software) --------------------------------------------------------------------


def kdfa(
    hash_name: str, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int
) -> bytes:
    """KDFa (TPM 2.0 Part 1, 11.4.10.2): SP 800-108 counter mode with HMAC; the label is used
    with a terminating zero byte."""
    if not label.endswith(b"\0"):
        label += b"\0"
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        out += hmac.new(
            key,
            struct.pack(">I", counter) + label + context_u + context_v + struct.pack(">I", bits),
            hash_name,
        ).digest()
    out = out[: (bits + 7) // 8]
    if bits % 8:
        out = bytes([out[0] & (0xFF >> (8 - bits % 8))]) + out[1:]
    return out


def make_credential(ek_public: bytes, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software for an RSA EK.

    `ek_public`: the EK's TPM2B_PUBLIC (RSA, AES-CFB symmetric, as TCG template L-1);
    `ak_name`: the name of the key that must be loaded beside the EK; `secret`: at most the
    EK nameAlg's digest size. Returns (credentialBlob as a marshalled TPM2B_ID_OBJECT,
    secret as a marshalled TPM2B_ENCRYPTED_SECRET), what TPM2_ActivateCredential takes.
    """
    ek = parse_public(ek_public)
    if ek.type != TPM_ALG.RSA or not isinstance(ek.key, rsa.RSAPublicKey):
        raise VerifyError("make_credential: the EK is not an RSA key")
    sym = ek.symmetric
    if sym.alg != TPM_ALG.AES or sym.mode != TPM_ALG.CFB or sym.key_bits not in (128, 192, 256):
        raise VerifyError("make_credential: the EK's symmetric algorithm is not AES-CFB")
    if not ek.attributes & TPMA_OBJECT.DECRYPT or not ek.attributes & TPMA_OBJECT.RESTRICTED:
        raise VerifyError("make_credential: the EK is not a restricted decryption key")
    info = HASHES[ek.name_alg]
    if not 1 <= len(secret) <= info.size:
        raise ConfigError(f"a credential secret is 1..{info.size} bytes, not {len(secret)}")
    if len(ak_name) < 2 or int.from_bytes(ak_name[:2], "big") not in HASHES:
        raise VerifyError("make_credential: the AK name does not start with a hash algorithm")

    seed = os.urandom(info.size)
    oaep = padding.OAEP(mgf=padding.MGF1(info.new()), algorithm=info.new(), label=b"IDENTITY\0")
    encrypted_seed = ek.key.encrypt(seed, oaep)

    sym_key = kdfa(info.name, seed, b"STORAGE", ak_name, b"", sym.key_bits)
    plain = struct.pack(">H", len(secret)) + secret
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(plain) + encryptor.finalize()

    hmac_key = kdfa(info.name, seed, b"INTEGRITY", b"", b"", info.size * 8)
    outer = hmac.new(hmac_key, enc_identity + ak_name, info.name).digest()
    id_object = struct.pack(">H", len(outer)) + outer + enc_identity
    blob = struct.pack(">H", len(id_object)) + id_object
    return blob, struct.pack(">H", len(encrypted_seed)) + encrypted_seed
