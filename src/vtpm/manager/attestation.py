"""Attestation on the hardware TPM: group attestation keys (AKs), quotes, the endorsement key.

Each group has its own AK on the hardware TPM; a verifier learns to trust it through the
group's provisioning bundle (its public area, a configuration quote, the EK and its
certificate) and, where it wants proof that the AK lives in the same TPM as the EK, through
TPM2_MakeCredential / TPM2_ActivateCredential.

Rules:
- An AK is a restricted signing key under the storage primary: fixedTPM, fixedParent,
  sensitiveDataOrigin, userWithAuth (empty authValue), restricted, sign; ECC P-256 with
  ECDSA-SHA256 (default) or RSA-2048 with RSASSA-SHA256. Restricted, it signs only digests the
  TPM made itself (quotes, certifications), never a digest that could pass for TPM evidence.
  Like a sealed object it is kept as its TPM blobs, loaded for one operation and flushed.
- A quote comes with the PCR values it covers, read right after it. They are handed out only
  if their digest equals the signed pcrDigest and the signed selection is the one asked for;
  a PCR extended in between means quoting again, so the values always match the signature.
- The EK is TCG template L-1 (RSA 2048) in the endorsement hierarchy. It is deterministic, so
  it is recreated by CreatePrimary when needed and flushed after, which keeps one of a
  simulator's three object slots free for the AK (activation needs primary, EK and AK at once).
- Credential activation authorises the EK with PolicySecret(TPM_RH_ENDORSEMENT) in a policy
  session salted to the storage primary that also encrypts the response, so the credential
  never crosses the TCTI in the clear. Any refusal is one opaque SealError.
- Every operation runs through `HardwareTpm.run`: the same lock, retries and reconnects.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tpm2_pytss import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_SE,
    TPM2B_DATA,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_NV,
    TPMA_OBJECT,
    TPMA_SESSION,
    TPML_PCR_SELECTION,
    TPMS_ATTEST,
    TPMT_PUBLIC,
)

from vtpm.errors import ConfigError, HwTpmError, SealError
from vtpm.manager.hwtpm import HardwareTpm, SealedObject
from vtpm.tpm import ektemplates, policy
from vtpm.tpm.attest import TPM_GENERATED_VALUE, TPM_ST_ATTEST
from vtpm.wire.evidence import SignedQuote

log = logging.getLogger(__name__)

AK_ALGS = ("ecc", "rsa")
DEFAULT_AK_ALG = "ecc"
MAX_QUALIFYING_DATA = 64  # TPM2B_DATA holds a TPMT_HA: at most a SHA-512 digest
QUOTE_ATTEMPTS = 5  # quotes retaken because a PCR changed before it was read

EK_CERT_RSA_INDEX = 0x01C00002  # TCG EK Credential Profile: RSA 2048 EK certificate
_PT_NV_BUFFER_MAX = 0x12C
_DEFAULT_NV_CHUNK = 512
_AK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)


@dataclass(frozen=True, slots=True)
class AkPublic:
    """What TPM2_ReadPublic says of a loaded AK."""

    public: bytes  # marshalled TPM2B_PUBLIC
    name: bytes
    qualified_name: bytes


def ecdsa_p256_template(attributes: Any) -> Any:
    """A TPMT_PUBLIC for an ECC P-256 signing key with ECDSA-SHA256 and `attributes` (the AK's,
    the group CA's)."""
    t = TPMT_PUBLIC(type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attributes)
    ecc = t.parameters.eccDetail
    ecc.symmetric.algorithm = TPM2_ALG.NULL
    ecc.scheme.scheme = TPM2_ALG.ECDSA
    ecc.scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    ecc.curveID = TPM2_ECC.NIST_P256
    ecc.kdf.scheme = TPM2_ALG.NULL
    return t


def ak_template(alg: str) -> bytes:
    """The AK's public template (marshalled TPMT_PUBLIC) for `alg` ("ecc" or "rsa")."""
    if alg == "ecc":
        t = ecdsa_p256_template(_AK_ATTRIBUTES)
    elif alg == "rsa":
        t = TPMT_PUBLIC(type=TPM2_ALG.RSA, nameAlg=TPM2_ALG.SHA256, objectAttributes=_AK_ATTRIBUTES)
        rsa = t.parameters.rsaDetail
        rsa.symmetric.algorithm = TPM2_ALG.NULL
        rsa.scheme.scheme = TPM2_ALG.RSASSA
        rsa.scheme.details.rsassa.hashAlg = TPM2_ALG.SHA256
        rsa.keyBits = 2048
        rsa.exponent = 0
    else:
        raise ConfigError(f"attestation key algorithm {alg!r}: use one of {', '.join(AK_ALGS)}")
    return bytes(t.marshal())


def ek_template() -> bytes:
    """TCG EK Credential Profile template L-1 (RSA 2048), marshalled TPMT_PUBLIC."""
    return ektemplates.RSA2048.template


def pcr_digest(values: Sequence[bytes]) -> bytes:
    """A quote's pcrDigest over SHA-256 PCR values given in selection order."""
    return hashlib.sha256(b"".join(values)).digest()


class AttestationTpm:
    """The hardware TPM's attestation operations. Thread-safe through `HardwareTpm.run`."""

    def __init__(self, hw: HardwareTpm) -> None:
        self.hw = hw

    # attestation keys ----------------------------------------------------------------------

    def create_ak(self, alg: str = DEFAULT_AK_ALG) -> SealedObject:
        """A new AK under the storage primary, as the TPM's blobs."""
        template, _ = TPMT_PUBLIC.unmarshal(ak_template(alg))

        def op(ectx: Any) -> SealedObject:
            private, public, *_ = ectx.create(
                self.hw.primary, TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(template)
            )
            return SealedObject(public=bytes(public.marshal()), private=bytes(private.marshal()))

        return self.hw.run(f"creating an {alg.upper()} attestation key", op)

    def ak_public(self, ak: SealedObject) -> AkPublic:
        """The AK's public area, name and qualified name, as the TPM reports them."""
        public, private = _blobs(ak, HwTpmError("the attestation key's blobs are damaged"))

        def op(ectx: Any) -> AkPublic:
            with self.hw.flushing(ectx) as handles:
                key = ectx.load(self.hw.primary, private, public)
                handles.append(key)
                out, name, qualified = ectx.read_public(key)
            return AkPublic(bytes(out.marshal()), bytes(name), bytes(qualified))

        return self.hw.run("reading an attestation key", op)

    # quotes --------------------------------------------------------------------------------

    def quote(self, ak: SealedObject, qualifying_data: bytes, pcrs: Sequence[int]) -> SignedQuote:
        """TPM2_Quote by `ak` over the SHA-256 bank's `pcrs`, with the values it signed."""
        if len(qualifying_data) > MAX_QUALIFYING_DATA:
            raise ConfigError(f"qualifying data is at most {MAX_QUALIFYING_DATA} bytes")
        wanted = policy.check_pcrs(pcrs)
        selection = policy.pcr_selection(wanted)
        sel, _ = TPML_PCR_SELECTION.unmarshal(selection)
        public, private = _blobs(ak, HwTpmError("the attestation key's blobs are damaged"))

        def op(ectx: Any) -> tuple[bytes, bytes]:
            with self.hw.flushing(ectx) as handles:
                key = ectx.load(self.hw.primary, private, public)
                handles.append(key)
                attest, signature = ectx.quote(
                    key, pcr_select=sel, qualifying_data=TPM2B_DATA(qualifying_data)
                )
            return bytes(attest), bytes(signature.marshal())

        for attempt in range(QUOTE_ATTEMPTS):
            attest, signature = self.hw.run("quoting", op)
            signed_selection, signed_digest = _quote_info(attest, qualifying_data)
            if signed_selection != selection:
                raise HwTpmError("the hardware TPM quoted another PCR selection than asked")
            values = self.hw.read_pcrs(wanted)
            if pcr_digest([values[i] for i in wanted]) == signed_digest:
                return SignedQuote(attest=attest, signature=signature, pcrs=values)
            log.debug("quote attempt %d: a PCR changed before it was read; quoting again", attempt)
        raise HwTpmError(f"the host PCRs kept changing while quoting ({QUOTE_ATTEMPTS} attempts)")

    # endorsement key -----------------------------------------------------------------------

    def _create_ek(self, ectx: Any) -> Any:
        template, _ = TPMT_PUBLIC.unmarshal(ek_template())
        handle, *_ = ectx.create_primary(
            TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(template), primary_handle=ESYS_TR.ENDORSEMENT
        )
        return handle

    def ek_public(self) -> bytes:
        """The RSA 2048 EK's public area (marshalled TPM2B_PUBLIC), template L-1."""

        def op(ectx: Any) -> bytes:
            with self.hw.flushing(ectx) as handles:
                ek = self._create_ek(ectx)
                handles.append(ek)
                public, _name, _qualified = ectx.read_public(ek)
            return bytes(public.marshal())

        return self.hw.run("creating the endorsement key", op)

    def ek_certificate(self) -> bytes | None:
        """The RSA EK certificate (DER) from NV index 0x01c00002, or None if it is not defined."""

        def op(ectx: Any) -> bytes | None:
            _more, data = ectx.get_capability(TPM2_CAP.HANDLES, EK_CERT_RSA_INDEX, 1)
            if EK_CERT_RSA_INDEX not in {int(h) for h in data.data.handles}:
                return None
            chunk = _nv_chunk(ectx)
            nv = ectx.tr_from_tpmpublic(EK_CERT_RSA_INDEX)
            try:
                nv_public, _name = ectx.nv_read_public(nv)
                size = int(nv_public.nvPublic.dataSize)
                readable_by_index = bool(nv_public.nvPublic.attributes & TPMA_NV.AUTHREAD)
                auth = nv if readable_by_index else ESYS_TR.OWNER
                out = bytearray()
                while len(out) < size:
                    n = min(chunk, size - len(out))
                    out += bytes(ectx.nv_read(nv, n, len(out), auth_handle=auth))
            finally:
                ectx.tr_close(nv)
            return _trim_der(bytes(out))

        return self.hw.run("reading the EK certificate", op)

    # credential activation -----------------------------------------------------------------

    def activate_credential(
        self, ak: SealedObject, credential_blob: bytes, encrypted_secret: bytes
    ) -> bytes:
        """TPM2_ActivateCredential: the secret a verifier bound to this EK and `ak`'s name.

        `credential_blob` is a marshalled TPM2B_ID_OBJECT, `encrypted_secret` a marshalled
        TPM2B_ENCRYPTED_SECRET (as TPM2_MakeCredential returns them)."""
        try:
            public, private = _blobs(ak, SealError("credential activation failed"))
            blob = _unmarshal_exact(TPM2B_ID_OBJECT, credential_blob)
            secret = _unmarshal_exact(TPM2B_ENCRYPTED_SECRET, encrypted_secret)
        except SealError:
            log.debug("a credential, its secret or the AK does not unmarshal")
            raise SealError("credential activation failed") from None

        def op(ectx: Any) -> bytes:
            with self.hw.flushing(ectx) as handles:
                ek = self._create_ek(ectx)
                handles.append(ek)
                key = ectx.load(self.hw.primary, private, public)
                handles.append(key)
                session = self.hw.salted_session(ectx, TPM2_SE.POLICY, TPMA_SESSION.ENCRYPT)
                handles.append(session)
                ectx.policy_secret(ESYS_TR.ENDORSEMENT, session)
                cert = ectx.activate_credential(
                    key, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
                )
            return bytes(cert)

        return self.hw.run(
            "activating a credential", op, lambda: SealError("credential activation failed")
        )


def _blobs(obj: SealedObject, error: Exception) -> tuple[Any, Any]:
    try:
        public = _unmarshal_exact(TPM2B_PUBLIC, obj.public)
        private = _unmarshal_exact(TPM2B_PRIVATE, obj.private)
    except SealError:
        raise error from None
    return public, private


def _unmarshal_exact(cls: Any, data: bytes) -> Any:
    try:
        value, used = cls.unmarshal(data)
    except Exception:  # pytss raises several types
        raise SealError("does not unmarshal") from None
    if used != len(data):
        raise SealError("trailing bytes")
    return value


def _quote_info(attest: bytes, qualifying_data: bytes) -> tuple[bytes, bytes]:
    """The signed PCR selection (marshalled) and pcrDigest of a quote, after checking it is one."""
    try:
        info, used = TPMS_ATTEST.unmarshal(attest)
        magic, kind = int(info.magic), int(info.type)
        extra = bytes(info.extraData)
        quote = info.attested.quote
        selection, digest = bytes(quote.pcrSelect.marshal()), bytes(quote.pcrDigest)
    except Exception:  # pytss raises several types
        raise HwTpmError("the hardware TPM returned an attestation that does not parse") from None
    if used != len(attest) or magic != TPM_GENERATED_VALUE or kind != TPM_ST_ATTEST.QUOTE:
        raise HwTpmError("the hardware TPM returned something other than a quote")
    if extra != qualifying_data:
        raise HwTpmError("the hardware TPM's quote carries other qualifying data than asked")
    return selection, digest


def _nv_chunk(ectx: Any) -> int:
    _more, data = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, _PT_NV_BUFFER_MAX, 1)
    for p in data.data.tpmProperties:
        if int(p.property) == _PT_NV_BUFFER_MAX and int(p.value) > 0:
            return int(p.value)
    return _DEFAULT_NV_CHUNK


def _trim_der(data: bytes) -> bytes:
    """`data` cut to its first DER SEQUENCE (NV areas may be padded); unchanged if not DER."""
    if len(data) < 2 or data[0] != 0x30:
        return data
    first = data[1]
    if first < 0x80:
        end = 2 + first
    else:
        n = first & 0x7F
        if not 1 <= n <= 4 or len(data) < 2 + n:
            return data
        end = 2 + n + int.from_bytes(data[2 : 2 + n], "big")
    return data[:end] if end <= len(data) else data
