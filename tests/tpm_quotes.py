"""Real quotes for verifier tests and the verifier benchmark: tpm2-pytss ESAPI on a swtpm.

Makes attestation keys (restricted ECC P-256 ECDSA-SHA256 and RSA-2048 RSASSA-SHA256, as
primaries so they are deterministic), an RSA EK from TCG template L-1, quotes, and the deep-quote
documents (`Evidence`, `Bundle`) built from real DeepQuoteInfo records, a Merkle tree and one
hardware quote whose qualifyingData is its root. swtpm holds only three transient objects: the
caller flushes what it no longer needs.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_ECC,
    TPM2_SE,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPML_PCR_SELECTION,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
)

from vtpm.manager import attestation
from vtpm.tpm import policy
from vtpm.tpm.policy import PcrState
from vtpm.wire import deepquote
from vtpm.wire.deepquote import DeepQuoteInfo
from vtpm.wire.evidence import Bundle, Evidence, SignedQuote, config_digest

AK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)
UNRESTRICTED_ATTRIBUTES = AK_ATTRIBUTES & ~TPMA_OBJECT.RESTRICTED


@dataclass
class Key:
    handle: Any
    public: bytes  # marshalled TPM2B_PUBLIC
    name: bytes
    qualified_name: bytes
    alg: str  # "ecc" | "rsa"
    hierarchy: Any


def ecc_template(attributes: Any = AK_ATTRIBUTES, unique: bytes = b"") -> TPM2B_PUBLIC:
    t = TPMT_PUBLIC(type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)
    d = t.parameters.eccDetail
    d.symmetric.algorithm = TPM2_ALG.NULL
    d.scheme.scheme = TPM2_ALG.ECDSA
    d.scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    d.curveID = TPM2_ECC.NIST_P256
    d.kdf.scheme = TPM2_ALG.NULL
    if unique:
        t.unique.ecc.x = unique
    return TPM2B_PUBLIC(t)


def rsa_template(attributes: Any = AK_ATTRIBUTES) -> TPM2B_PUBLIC:
    t = TPMT_PUBLIC(type=TPM2_ALG.RSA, nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)
    d = t.parameters.rsaDetail
    d.symmetric.algorithm = TPM2_ALG.NULL
    d.scheme.scheme = TPM2_ALG.RSASSA
    d.scheme.details.rsassa.hashAlg = TPM2_ALG.SHA256
    d.keyBits = 2048
    d.exponent = 0
    return TPM2B_PUBLIC(t)


def ek_template() -> TPM2B_PUBLIC:
    """The Manager's EK template (TCG EK Credential Profile L-1), as pytss wants it."""
    public, _ = TPMT_PUBLIC.unmarshal(attestation.ek_template())
    return TPM2B_PUBLIC(public)


def selection(pcrs: Sequence[int]) -> Any:
    sel, _ = TPML_PCR_SELECTION.unmarshal(policy.pcr_selection(list(pcrs)))
    return sel


class QuoteTpm:
    """One ESAPI context on a (simulated) TPM, with the operations the verifier tests need."""

    def __init__(self, tcti: str) -> None:
        self.ectx = ESAPI(tcti)

    def close(self) -> None:
        self.ectx.close()

    def primary(self, template: TPM2B_PUBLIC, hierarchy: Any, alg: str) -> Key:
        handle, public, *_ = self.ectx.create_primary(
            TPM2B_SENSITIVE_CREATE(), template, primary_handle=hierarchy
        )
        _pub, name, qualified = self.ectx.read_public(handle)
        return Key(handle, bytes(public.marshal()), bytes(name), bytes(qualified), alg, hierarchy)

    def ecc_ak(self, hierarchy: Any = ESYS_TR.ENDORSEMENT, unique: bytes = b"") -> Key:
        return self.primary(ecc_template(unique=unique), hierarchy, "ecc")

    def rsa_ak(self, hierarchy: Any = ESYS_TR.OWNER) -> Key:
        return self.primary(rsa_template(), hierarchy, "rsa")

    def unrestricted_ecc(self) -> Key:
        return self.primary(ecc_template(UNRESTRICTED_ATTRIBUTES), ESYS_TR.OWNER, "ecc")

    def ek(self) -> Key:
        return self.primary(ek_template(), ESYS_TR.ENDORSEMENT, "rsa")

    def flush(self, key: Key) -> None:
        self.ectx.flush_context(key.handle)

    def pcrs(self, indices: Sequence[int]) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        wanted = sorted(indices)
        for i in range(0, len(wanted), 8):
            chunk = wanted[i : i + 8]
            _counter, _sel, digests = self.ectx.pcr_read(selection(chunk))
            for index, digest in zip(chunk, digests, strict=True):
                out[index] = bytes(digest)
        return out

    def extend(self, index: int, data: bytes) -> None:
        self.ectx.pcr_event(getattr(ESYS_TR, f"PCR{index}"), data)

    def quote(self, key: Key, pcrs: Sequence[int], qualifying: bytes) -> tuple[bytes, bytes]:
        """(TPMS_ATTEST, TPMT_SIGNATURE), both marshalled."""
        attest, sig = self.ectx.quote(key.handle, selection(pcrs), qualifying)
        return bytes(attest), bytes(sig.marshal())

    def signed_quote(self, key: Key, pcrs: Sequence[int], qualifying: bytes) -> SignedQuote:
        values = self.pcrs(pcrs)
        attest, sig = self.quote(key, pcrs, qualifying)
        return SignedQuote(attest, sig, values)

    def sign_message(self, key: Key, message: bytes) -> bytes:
        """Sign arbitrary bytes with a restricted key: the TPM hashes them and gives a ticket
        only because they do not start with TPM_GENERATED_VALUE."""
        digest, ticket = self.ectx.hash(message, TPM2_ALG.SHA256, key.hierarchy)
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        return bytes(self.ectx.sign(key.handle, digest, scheme, ticket).marshal())

    def certify(self, obj: Key, signer: Key, qualifying: bytes) -> tuple[bytes, bytes]:
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
        attest, sig = self.ectx.certify(obj.handle, signer.handle, qualifying, scheme)
        return bytes(attest), bytes(sig.marshal())

    def activate(self, ak: Key, ek: Key, blob: bytes, secret: bytes) -> bytes:
        cred, _ = TPM2B_ID_OBJECT.unmarshal(blob)
        enc, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(secret)
        session = self.ectx.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )  # fmt: skip
        try:
            self.ectx.policy_secret(ESYS_TR.ENDORSEMENT, session)
            out = self.ectx.activate_credential(
                ak.handle, ek.handle, cred, enc, session1=ESYS_TR.PASSWORD, session2=session
            )
        finally:
            self.ectx.flush_context(session)
        return bytes(out)


# deep-quote documents ------------------------------------------------------------------------


def make_group(
    name: str, labels: Sequence[str], host_values: dict[int, bytes], owner_pub: str = ""
) -> dict[str, Any]:
    return {
        "uuid": str(uuid.uuid4()),
        "name": name,
        "seq": 1,
        "labels": list(labels),
        "pcr_states": [PcrState.from_values(host_values).to_json()],
        "owner_pub": owner_pub,
    }


def make_bundle(
    tpm: QuoteTpm, ak: Key, ek_public: bytes, group: dict[str, Any], host_pcrs: Sequence[int]
) -> Bundle:
    config_quote = tpm.signed_quote(ak, host_pcrs, config_digest(group))
    return Bundle(
        group=group,
        ak_alg=ak.alg,
        ak_public=ak.public,
        ak_name=ak.name,
        ak_qualified_name=ak.qualified_name,
        ek_public=ek_public,
        ek_certificate=None,
        config_quote=config_quote,
        manager_uuid=str(uuid.uuid4()),
    )


def make_evidence(
    tpm: QuoteTpm, ak: Key, infos: Sequence[DeepQuoteInfo], host_pcrs: Sequence[int]
) -> list[Evidence]:
    """One hardware quote over the Merkle root of `infos`; one Evidence per info."""
    leaves = [info.leaf() for info in infos]
    levels = deepquote.merkle_tree(leaves)
    host = tpm.signed_quote(ak, host_pcrs, levels[-1][0])
    return [
        Evidence(info, deepquote.merkle_path(levels, n), host, len(infos))
        for n, info in enumerate(infos)
    ]


def vtpm_info(
    nonce: bytes, vtpm_uuid: uuid.UUID, group: dict[str, Any], label: str, pcrs: dict[int, bytes]
) -> DeepQuoteInfo:
    return DeepQuoteInfo(
        nonce=nonce,
        vtpm_uuid=vtpm_uuid,
        group_uuid=uuid.UUID(group["uuid"]),
        label=label,
        pcrs=tuple(sorted(pcrs.items())),
    )


def certificate_for(public_key: Any) -> bytes:
    """A DER certificate (by a throwaway CA) for `public_key`, as an EK certificate."""
    issuer = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test EK CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(issuer, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


TOOLS = ("tpm2_createek", "tpm2_createak", "tpm2_quote", "tpm2_flushcontext")


def tpm2_tools_quotes(work: Path, tcti: str) -> None:
    """With tpm2-tools in `work`: an RSA EK, an ECC AK under it (ak.pub, ak.name, ak.qname),
    quote q.* over sha256:0,1,16 with nonce c0ffee (serialized PCR file q.pcrs), and quote q2.*
    with nonce c0ffee01 (bare values, q2.values). swtpm has no resource manager: transient
    objects and sessions are flushed after each command."""
    env = {**os.environ, "TPM2TOOLS_TCTI": tcti, "TSS2_LOG": "all+NONE"}

    def tool(*argv: str) -> None:
        subprocess.run(argv, cwd=work, env=env, check=True, capture_output=True, timeout=60)
        for kind in ("-t", "-s"):
            subprocess.run(
                ["tpm2_flushcontext", kind], cwd=work, env=env, check=True, capture_output=True
            )

    tool("tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
    tool(
        "tpm2_createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256", "-s",
        "ecdsa", "-u", "ak.pub", "-n", "ak.name", "-q", "ak.qname",
    )  # fmt: skip
    quote = ["tpm2_quote", "-c", "ak.ctx", "-l", "sha256:0,1,16"]
    tool(*quote, "-q", "c0ffee", "-m", "q.msg", "-s", "q.sig", "-o", "q.pcrs")
    tool(
        *quote, "-q", "c0ffee01", "-m", "q2.msg", "-s", "q2.sig", "-o", "q2.values", "-F", "values"
    )
