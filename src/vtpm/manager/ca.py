"""Each group's certificate authority, whose key never leaves the hardware TPM.

The chain a verifier walks: a vTPM's EK certificate, signed by the group CA key; the CA's
self-signed certificate for that key; TPM2_Certify of the CA key by the group's AK (the AK
vouches that the key lives in the same TPM, with the attributes below); the AK, trusted through
the group's provisioning bundle and credential activation against the hardware EK.

Rules:
- The CA key is an ECC P-256 signing key (ECDSA-SHA256) under the storage primary: fixedTPM,
  fixedParent, sensitiveDataOrigin, userWithAuth, noDA, sign; not restricted (it signs
  certificates, digests the TPM did not make). noDA because its authValue is a 256-bit
  secret nobody guesses, and a refused attempt must not count against the TPM's lockout, which
  every other DA-protected object shares.
- Its authValue is HKDF-SHA256(group key, info "vtpm group ca v1"): only a Manager holding the
  group key, i.e. one whose group is unlocked in a permitted host state, can use it. It reaches
  the TPM only as an HMAC key of a session salted to the storage primary (and, at creation,
  in an encrypted TPM2_Create parameter), never in the clear over the TCTI.
- Like the AK it is kept as its TPM blobs (in the store, with its certificate and the
  certification) and loaded for one operation, then flushed.
- TPM2_Certify's qualifyingData is the SHA-256 of the CA certificate's DER: the AK's signature
  binds the key to exactly that certificate.
- While the group is locked nothing is issued (ManagerError naming the lock); a TPM refusal of
  a signature is one opaque SealError.
- Issued certificates are public. They are recorded (`Store.record_cert`) and written to
  `<data-dir>/vtpms/<uuid>.certs/` (`<kind>.der`, `group-ca.der`, mode 0644) for consumers
  that read files, as libvirt reads swtpm's.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from tpm2_pytss import (
    TPM2_ALG,
    TPM2_RH,
    TPM2_SE,
    TPM2_ST,
    TPM2B_AUTH,
    TPM2B_DATA,
    TPM2B_DIGEST,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_OBJECT,
    TPMA_SESSION,
    TPMS_SENSITIVE_CREATE,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_TK_HASHCHECK,
)

from vtpm.errors import HwTpmError, ManagerError, RequestError, SealError, VerifyError
from vtpm.files import write_atomic
from vtpm.manager import certs
from vtpm.manager.attestation import ecdsa_p256_template
from vtpm.manager.groups import GroupKeys
from vtpm.manager.hwtpm import HardwareTpm, SealedObject
from vtpm.manager.sealing import create_object
from vtpm.manager.store import GroupCaRecord, GroupRecord, Store, VtpmRecord
from vtpm.tpm import ekcert
from vtpm.tpm.constants import TPMA_OBJECT as ATTR
from vtpm.tpm.ekcert import VtpmIdentity
from vtpm.tpm.public import TpmPublic, parse_public
from vtpm.wire.admin import CertsView

log = logging.getLogger(__name__)

CERT_KINDS = ekcert.CERT_KINDS
CA_AUTH_INFO = b"vtpm group ca v1"
CA_CERT_FILE = "group-ca.der"
FILE_MODE = 0o644  # certificates are public
DIR_MODE = 0o755

_CA_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.NODA
    | TPMA_OBJECT.SIGN_ENCRYPT
)
# what every TCG EK template has (low and high range): a storage-like decryption key that
# never leaves its TPM; a key without these is not certified as an EK
_EK_MUST = (
    ATTR.FIXEDTPM | ATTR.FIXEDPARENT | ATTR.SENSITIVEDATAORIGIN | ATTR.RESTRICTED | ATTR.DECRYPT
)


def ca_template() -> bytes:
    """The CA key's public template (marshalled TPMT_PUBLIC)."""
    return bytes(ecdsa_p256_template(_CA_ATTRIBUTES).marshal())


def certs_dir(vtpm_dir: Path) -> Path:
    """Where a vTPM's certificates are written, beside its state directory `vtpm_dir`."""
    return vtpm_dir.with_name(f"{vtpm_dir.name}.certs")


class CaTpm:
    """The CA key's operations on the hardware TPM. Thread-safe through `HardwareTpm.run`."""

    def __init__(self, hw: HardwareTpm) -> None:
        self.hw = hw

    def create(self, auth: bytes) -> SealedObject:
        template, _ = TPMT_PUBLIC.unmarshal(ca_template())
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(userAuth=TPM2B_AUTH(auth)))

        def op(ectx: Any) -> SealedObject:
            return create_object(self.hw, ectx, template, sensitive)

        return self.hw.run("creating a group CA key", op, _refused)

    def sign(self, key: SealedObject, auth: bytes, digest: bytes) -> tuple[int, int]:
        """ECDSA (r, s) of the SHA-256 `digest` by the CA key."""
        public, private = _blobs(key)
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)  # the key's own: ECDSA-SHA256
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)

        def op(ectx: Any) -> tuple[int, int]:
            with self.hw.flushing(ectx) as handles:
                handle = ectx.load(self.hw.primary, private, public)
                handles.append(handle)
                ectx.tr_set_auth(handle, TPM2B_AUTH(auth))
                session = self.hw.salted_session(ectx, TPM2_SE.HMAC, TPMA_SESSION(0))
                handles.append(session)
                sig = ectx.sign(handle, TPM2B_DIGEST(digest), scheme, ticket, session1=session)
            ecdsa = sig.signature.ecdsa
            r = int.from_bytes(bytes(ecdsa.signatureR), "big")
            return r, int.from_bytes(bytes(ecdsa.signatureS), "big")

        return self.hw.run("signing with a group CA key", op, _refused)

    def certify(
        self, key: SealedObject, auth: bytes, ak: SealedObject, qualifying: bytes
    ) -> tuple[bytes, bytes]:
        """TPM2_Certify of the CA key by `ak`: (TPMS_ATTEST, TPMT_SIGNATURE), marshalled."""
        public, private = _blobs(key)
        ak_public, ak_private = _blobs(ak)

        def op(ectx: Any) -> tuple[bytes, bytes]:
            with self.hw.flushing(ectx) as handles:
                handle = ectx.load(self.hw.primary, private, public)
                handles.append(handle)
                ectx.tr_set_auth(handle, TPM2B_AUTH(auth))
                signer = ectx.load(self.hw.primary, ak_private, ak_public)
                handles.append(signer)
                session = self.hw.salted_session(ectx, TPM2_SE.HMAC, TPMA_SESSION(0))
                handles.append(session)
                attest, signature = ectx.certify(
                    handle,
                    signer,
                    TPM2B_DATA(qualifying),
                    TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL),
                    session1=session,
                )
            return bytes(attest), bytes(signature.marshal())

        return self.hw.run("certifying a group CA key", op, _refused)


def _refused() -> Exception:
    return SealError("the group CA key refused the operation")


def _blobs(obj: SealedObject) -> tuple[Any, Any]:
    try:
        public, _ = TPM2B_PUBLIC.unmarshal(obj.public)
        private, _ = TPM2B_PRIVATE.unmarshal(obj.private)
    except Exception:  # pytss raises several types
        raise HwTpmError("a stored key's blobs are damaged") from None
    return public, private


def ek_public_key(kind: str, ek_public: bytes) -> TpmPublic:
    """The EK a certificate of `kind` is requested for: a TPM2B_PUBLIC of the right algorithm
    with the attributes of a TCG EK; RequestError otherwise."""
    if kind not in CERT_KINDS:
        raise RequestError(f"certificate kind {kind!r}: use one of {', '.join(CERT_KINDS)}")
    try:
        pub = parse_public(ek_public)
    except VerifyError as e:
        raise RequestError(f"the EK public area does not parse: {e}") from None
    if pub.attributes & _EK_MUST != _EK_MUST or pub.attributes & ATTR.SIGN_ENCRYPT:
        raise RequestError("the key is not an endorsement key (its attributes are not a TCG EK's)")
    certs.check_key(kind, pub.key)
    return pub


class GroupCa:
    """Makes each group's CA and issues its vTPMs' certificates."""

    def __init__(self, store: Store, groups: GroupKeys, *, vtpms_dir: Path | None = None) -> None:
        self._store = store
        self._groups = groups
        self._tpm = CaTpm(groups.attestation.hw)
        self._vtpms_dir = vtpms_dir if vtpms_dir is not None else store.path.parent / "vtpms"
        self._lock = threading.Lock()
        self._files_lock = threading.Lock()  # write_atomic's temporary name is per process

    def _auth(self, group_uuid: uuid.UUID) -> bytes:
        """The CA key's authValue; ManagerError while the group is locked."""
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=CA_AUTH_INFO)
        return hkdf.derive(self._groups.key(group_uuid))

    def _signer(self, key: SealedObject, auth: bytes) -> certs.Signer:
        return lambda digest: self._tpm.sign(key, auth, digest)

    def ensure(self, g: GroupRecord) -> GroupRecord:
        """`g` with its CA: the key made in the hardware TPM, its certificate signed by it and
        certified by the group's AK, all stored, if the group has none yet (it must be
        unlocked for that)."""
        if g.ca is not None:
            return g
        with self._lock:
            current = self._store.group(str(g.uuid))
            if current is None:
                raise ManagerError(f"group {g.uuid} does not exist")
            if current.ca is not None:  # made meanwhile
                return current
            current = self._groups.ensure_ak(current)
            auth = self._auth(current.uuid)
            key = self._tpm.create(auth)
            ca_key = parse_public(key.public).key
            if not isinstance(ca_key, ec.EllipticCurvePublicKey):
                raise HwTpmError("the hardware TPM made a CA key of another type than asked")
            cert = certs.ca_certificate(ca_key, current.uuid, current.name, self._signer(key, auth))
            attest, signature = self._tpm.certify(
                key, auth, GroupKeys.ak(current), hashlib.sha256(cert).digest()
            )
            ca = GroupCaRecord(key.public, key.private, cert, attest, signature)
            self._store.set_group_ca(current.uuid, ca)
            log.info("group %s (%s): made its CA in the hardware TPM", current.name, current.uuid)
            return replace(current, ca=ca)

    def ca_certificate(self, g: GroupRecord) -> bytes:
        """The group CA's certificate (DER), made now if the group has none yet."""
        ca = self.ensure(g).ca
        assert ca is not None
        return ca.certificate

    def issue(self, vtpm: VtpmRecord, kind: str, ek_public: bytes) -> bytes:
        """A `kind` certificate (DER) for `vtpm`'s EK `ek_public` (TPM2B_PUBLIC), recorded and
        written to the vTPM's certificate directory."""
        pub = ek_public_key(kind, ek_public)
        g = self._store.group(str(vtpm.group_uuid))
        if g is None:
            raise ManagerError(f"group {vtpm.group_uuid} does not exist")
        g = self.ensure(g)
        assert g.ca is not None
        auth = self._auth(g.uuid)
        key = SealedObject(g.ca.public, g.ca.private)
        identity = VtpmIdentity(vtpm.uuid, g.uuid, vtpm.label, kind)
        cert = certs.ek_certificate(pub.key, identity, g.ca.certificate, self._signer(key, auth))
        self._store.record_cert(vtpm.uuid, kind, pub.name, cert)
        self._store.audit(f"vtpm {vtpm.uuid}", "vtpm.cert", str(vtpm.uuid), "ok", {"kind": kind})
        try:
            self.write_files(vtpm.uuid, g.ca.certificate)
        except OSError as e:  # the record is what counts; the files are rewritten next time
            log.warning("vTPM %s: certificate files not written: %s", vtpm.uuid, e)
        return cert

    def issue_for(self, vtpm_uuid: uuid.UUID, kind: str, ek_public: bytes) -> bytes:
        """`issue` by the vTPM's uuid: the callable key custody is given (`CertRequest`)."""
        rec = self._store.vtpm(vtpm_uuid)
        if rec is None:
            raise ManagerError(f"no vTPM {vtpm_uuid}")
        return self.issue(rec, kind, ek_public)

    def view(self, vtpm: VtpmRecord) -> CertsView:
        """The vTPM's certificates and its group CA's (admin op `vtpm.certs`); the files in
        its certificate directory are rewritten from the record on the way."""
        g = self._store.group(str(vtpm.group_uuid))
        ca_cert = g.ca.certificate if g is not None and g.ca is not None else b""
        issued = {c.kind: c.certificate for c in self._store.certs(vtpm.uuid)}
        if issued and ca_cert:
            try:
                self.write_files(vtpm.uuid, ca_cert)
            except OSError as e:
                log.warning("vTPM %s: certificate files not written: %s", vtpm.uuid, e)
        return CertsView(issued, ca_cert)

    # the certificate directory -------------------------------------------------------------

    def certs_dir(self, vtpm_uuid: uuid.UUID) -> Path:
        return certs_dir(self._vtpms_dir / str(vtpm_uuid))

    def write_files(self, vtpm_uuid: uuid.UUID, ca_cert: bytes) -> Path:
        """Write the vTPM's recorded certificates and the group CA's to its directory."""
        d = self.certs_dir(vtpm_uuid)
        files = {f"{c.kind}.der": c.certificate for c in self._store.certs(vtpm_uuid)}
        files[CA_CERT_FILE] = ca_cert
        with self._files_lock:
            d.mkdir(mode=DIR_MODE, exist_ok=True)
            d.chmod(DIR_MODE)  # whatever the umask: these are public
            for name, data in files.items():
                write_atomic(d / name, data, FILE_MODE)
                (d / name).chmod(FILE_MODE)
        return d
