"""Group attestation keys on the hardware TPM (a real swtpm, manufactured by swtpm_setup):
AK creation, quotes whose PCR values match what was signed, the EK as tpm2_createek makes it,
its certificate, credential activation, and the provisioning bundle through a real Manager."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import load_der_public_key

from tests.helpers import tpm2
from tests.mgr import ManagerProc, manager, owner_key
from vtpm.errors import ConfigError, HwTpmError, ManagerError, SealError
from vtpm.manager import lookup
from vtpm.manager.attestation import AttestationTpm, pcr_digest
from vtpm.manager.config import ManagerConfig
from vtpm.manager.hwtpm import HardwareTpm, SealedObject
from vtpm.manager.service import Manager
from vtpm.manager.simulator import Simulator
from vtpm.tpm import policy
from vtpm.wire.evidence import Bundle, SignedQuote, config_digest

pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is a dev dependency of the project")
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2B_PUBLIC,
    TPMS_ATTEST,
    TPMT_SIGNATURE,
)
from tpm2_pytss.utils import make_credential

from tests.tpm_quotes import AK_ATTRIBUTES

pytestmark = pytest.mark.integration

os.environ.setdefault("TSS2_LOG", "all+NONE")

CREDENTIAL = b"verifier's challenge 0123456789"


# fixtures and helpers --------------------------------------------------------------------------


@pytest.fixture
def att(hw: HardwareTpm) -> AttestationTpm:
    return AttestationTpm(hw)


def extend(tcti: str, pcr: int, data: bytes) -> None:
    tpm2("pcrextend", f"{pcr}:sha256={hashlib.sha256(data).hexdigest()}", tcti=tcti)


def public_key(tpm2b_public: bytes) -> Any:
    pub, used = TPM2B_PUBLIC.unmarshal(tpm2b_public)
    assert used == len(tpm2b_public)
    return load_der_public_key(bytes(pub.publicArea.to_der()))


def rsa_numbers(key: object) -> rsa.RSAPublicNumbers:
    assert isinstance(key, rsa.RSAPublicKey)
    return key.public_numbers()


def check_quote(q: SignedQuote, ak_public: bytes, qualifying_data: bytes, pcrs: list[int]) -> Any:
    """Check a quote as a verifier would; return the parsed TPMS_ATTEST."""
    info, used = TPMS_ATTEST.unmarshal(q.attest)
    assert used == len(q.attest)
    assert int(info.magic) == 0xFF544347 and int(info.type) == 0x8018
    assert bytes(info.extraData) == qualifying_data
    quote = info.attested.quote
    assert bytes(quote.pcrSelect.marshal()) == policy.pcr_selection(pcrs)
    assert sorted(q.pcrs) == sorted(pcrs)
    assert bytes(quote.pcrDigest) == hashlib.sha256(b"".join(q.pcrs[i] for i in pcrs)).digest()
    assert bytes(quote.pcrDigest) == pcr_digest([q.pcrs[i] for i in sorted(pcrs)])
    # the signature, checked in software with the AK's public key
    sig, used = TPMT_SIGNATURE.unmarshal(q.signature)
    assert used == len(q.signature)
    key = public_key(ak_public)
    if isinstance(key, ec.EllipticCurvePublicKey):
        assert int(sig.sigAlg) == TPM2_ALG.ECDSA
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        key.verify(utils.encode_dss_signature(r, s), q.attest, ec.ECDSA(hashes.SHA256()))
    else:
        assert isinstance(key, rsa.RSAPublicKey)
        assert int(sig.sigAlg) == TPM2_ALG.RSASSA
        key.verify(bytes(sig.signature.rsassa.sig), q.attest, padding.PKCS1v15(), hashes.SHA256())
    return info


def credential_for(ek_public: bytes, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """What a verifier sends: MakeCredential in software (tpm2-pytss)."""
    ek, _ = TPM2B_PUBLIC.unmarshal(ek_public)
    blob, encrypted = make_credential(ek, secret, ak_name)
    return bytes(blob.marshal()), bytes(encrypted.marshal())


# attestation keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ecc", "rsa"])
def test_ak_is_a_restricted_signing_key_of_the_chosen_algorithm(
    att: AttestationTpm, alg: str
) -> None:
    ak = att.create_ak(alg)
    pub = att.ak_public(ak)
    assert pub.public == ak.public  # ReadPublic reports what Create returned
    area, _ = TPM2B_PUBLIC.unmarshal(pub.public)
    t = area.publicArea
    assert int(t.objectAttributes) == int(AK_ATTRIBUTES)
    assert int(t.nameAlg) == TPM2_ALG.SHA256
    if alg == "ecc":
        assert int(t.type) == TPM2_ALG.ECC
        assert int(t.parameters.eccDetail.scheme.scheme) == TPM2_ALG.ECDSA
        assert int(t.parameters.eccDetail.scheme.details.ecdsa.hashAlg) == TPM2_ALG.SHA256
        assert isinstance(public_key(pub.public), ec.EllipticCurvePublicKey)
    else:
        assert int(t.type) == TPM2_ALG.RSA
        assert int(t.parameters.rsaDetail.scheme.scheme) == TPM2_ALG.RSASSA
        assert int(t.parameters.rsaDetail.keyBits) == 2048
        assert isinstance(public_key(pub.public), rsa.RSAPublicKey)
    # name = nameAlg || SHA-256(TPMT_PUBLIC), computed here independently
    assert pub.name == policy.object_name(bytes(t.marshal()))
    assert len(pub.qualified_name) == 34 and pub.qualified_name != pub.name
    # a second AK is another key
    assert att.ak_public(att.create_ak(alg)).name != pub.name


def test_unknown_ak_algorithm_is_refused(att: AttestationTpm) -> None:
    with pytest.raises(ConfigError, match="ecc, rsa"):
        att.create_ak("dsa")


# quotes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ecc", "rsa"])
def test_quote_values_match_the_signed_digest(
    sim: Simulator, att: AttestationTpm, alg: str
) -> None:
    extend(sim.tcti, 16, b"something measured")
    ak = att.create_ak(alg)
    pub = att.ak_public(ak)
    nonce = hashlib.sha256(b"nonce " + alg.encode()).digest()
    pcrs = [0, 7, 16, 23]
    q = att.quote(ak, nonce, pcrs)
    info = check_quote(q, pub.public, nonce, pcrs)
    assert bytes(info.qualifiedSigner) == pub.qualified_name
    assert q.pcrs[16] != bytes(32) and q.pcrs[23] == bytes(32)
    # every PCR in one quote (more than one TPM2_PCR_Read holds)
    everything = list(range(24))
    check_quote(att.quote(ak, b"", everything), pub.public, b"", everything)


def test_quote_values_stay_consistent_while_pcrs_change(
    sim: Simulator, att: AttestationTpm, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="vtpm.manager.attestation")
    ak = att.create_ak("ecc")
    pub = att.ak_public(ak)
    stop = threading.Event()

    def extender() -> None:
        with ESAPI(sim.tcti) as ectx:
            n = 0
            while not stop.wait(0.002):
                n += 1
                ectx.pcr_event(ESYS_TR.PCR16, b"%d" % n)

    t = threading.Thread(target=extender, daemon=True)
    t.start()
    ok = 0
    try:
        for i in range(30):
            nonce = b"%d" % i
            try:
                q = att.quote(ak, nonce, [16])
            except HwTpmError as e:  # allowed: the PCR never held still long enough
                assert "kept changing" in str(e)
                continue
            check_quote(q, pub.public, nonce, [16])
            ok += 1
    finally:
        stop.set()
        t.join()
    assert ok > 0
    assert "quoting again" in caplog.text  # the race was met, and handled


def test_quote_refuses_bad_arguments(att: AttestationTpm) -> None:
    ak = att.create_ak("ecc")
    with pytest.raises(ConfigError):
        att.quote(ak, bytes(65), [0])
    with pytest.raises(ConfigError):
        att.quote(ak, b"", [])
    with pytest.raises(ConfigError):
        att.quote(ak, b"", [24])
    with pytest.raises(HwTpmError):
        att.quote(SealedObject(ak.public, b"\x00\x02ab"), b"", [0])


# the endorsement key ---------------------------------------------------------------------------


def test_ek_public_is_the_one_tpm2_createek_makes(tmp_path: Path, sim: Simulator) -> None:
    tpm2("createek", "-G", "rsa", "-c", "ek.ctx", "-u", "ek.pub", tcti=sim.tcti, cwd=tmp_path)
    tpm2("flushcontext", "-t", tcti=sim.tcti)  # no resource manager: tpm2-tools leaves it loaded
    tools_public = (tmp_path / "ek.pub").read_bytes()
    with HardwareTpm(sim.tcti, retries=3) as hw:
        att = AttestationTpm(hw)
        ek = att.ek_public()
        assert ek == tools_public
        assert att.ek_public() == ek  # recreated, the same key
        area, _ = TPM2B_PUBLIC.unmarshal(ek)
        assert int(area.publicArea.objectAttributes) == 0x000300B2
        assert bytes(area.publicArea.authPolicy).hex() == (
            "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
        )

        # the simulator was manufactured: its EK certificate certifies this EK
        der = att.ek_certificate()
    assert der is not None
    cert = x509.load_der_x509_certificate(der)
    ek_key = public_key(ek)
    assert rsa_numbers(cert.public_key()) == rsa_numbers(ek_key)
    ca = x509.load_pem_x509_certificate(sim.ca_certificate.read_bytes())
    cert.verify_directly_issued_by(ca)


def test_an_unmanufactured_tpm_has_no_ek_certificate(tmp_path: Path) -> None:
    with (
        Simulator(tmp_path / "blank", manufacture=False) as sim,
        HardwareTpm(sim.tcti, retries=3) as hw,
    ):
        att = AttestationTpm(hw)
        assert att.ek_certificate() is None
        assert len(att.ek_public()) > 256  # the EK is derived from the seed all the same


# credential activation -------------------------------------------------------------------------


def test_activate_credential_round_trip_and_wrong_name(att: AttestationTpm) -> None:
    ak = att.create_ak("ecc")
    other = att.create_ak("rsa")
    ek = att.ek_public()
    name = att.ak_public(ak).name
    blob, secret = credential_for(ek, name, CREDENTIAL)
    assert att.activate_credential(ak, blob, secret) == CREDENTIAL
    # the RSA AK too
    other_name = att.ak_public(other).name
    blob2, secret2 = credential_for(ek, other_name, b"x" * 32)
    assert att.activate_credential(other, blob2, secret2) == b"x" * 32

    # a credential made for another AK's name: one opaque error
    with pytest.raises(SealError) as e:
        att.activate_credential(other, blob, secret)
    assert str(e.value) == "credential activation failed"
    wrong_name = policy.object_name(b"not the AK")
    blob3, secret3 = credential_for(ek, wrong_name, CREDENTIAL)
    with pytest.raises(SealError, match=r"^credential activation failed$"):
        att.activate_credential(ak, blob3, secret3)
    # damaged or malformed input: the same error
    damaged = blob[:-1] + bytes([blob[-1] ^ 1])
    for b, s in ((damaged, secret), (blob, secret[:-1]), (b"", secret), (blob, b"\x00")):
        with pytest.raises(SealError, match=r"^credential activation failed$"):
            att.activate_credential(ak, b, s)
    # and the TPM still works afterwards (nothing left loaded)
    assert att.activate_credential(ak, blob, secret) == CREDENTIAL


# through a real Manager ------------------------------------------------------------------------


@pytest.fixture
def mgr(tmp_path: Path) -> Iterator[ManagerProc]:
    with manager(tmp_path / "data") as m:
        yield m


def test_group_provision_and_activate_through_the_cli(tmp_path: Path, mgr: ManagerProc) -> None:
    key = owner_key(tmp_path)
    g = mgr.json(
        "group", "new", "tenant", "--owner-key", f"{key}.pub", "--pcrs", "0-7", "--ak", "rsa"
    )
    assert g["ak"] == "rsa"
    assert "attestation key: RSA" in mgr.cli("group", "show", "tenant").stdout
    plain = mgr.json("group", "new", "plain", "--owner-key", f"{key}.pub", "--pcrs", "16")
    assert plain["ak"] == "ecc"

    out = tmp_path / "bundle.json"
    res = mgr.cli("group", "provision", "tenant", "-o", str(out))
    assert "RSA AK" in res.stdout and "with certificate" in res.stdout
    bundle = Bundle.from_json(json.loads(out.read_text()))
    assert bundle.group == {
        "uuid": g["uuid"],
        "name": "tenant",
        "seq": 0,
        "labels": [],
        "pcr_states": g["pcr_states"],
        "owner_pub": g["owner_pub"],
    }
    assert bundle.ak_alg == "rsa"
    assert isinstance(public_key(bundle.ak_public), rsa.RSAPublicKey)
    assert bundle.ak_name == policy.object_name(
        bytes(TPM2B_PUBLIC.unmarshal(bundle.ak_public)[0].publicArea.marshal())
    )
    uuid.UUID(bundle.manager_uuid)
    info = check_quote(
        bundle.config_quote, bundle.ak_public, config_digest(bundle.group), list(range(8))
    )
    assert bytes(info.qualifiedSigner) == bundle.ak_qualified_name
    # the quoted PCR values are the group's permitted state
    state = g["pcr_states"][0]
    assert {str(i): v.hex() for i, v in bundle.config_quote.pcrs.items()} == dict(
        zip(map(str, state["pcrs"]), state["values"], strict=True)
    )
    assert bundle.ek_certificate is not None
    cert = x509.load_der_x509_certificate(bundle.ek_certificate)
    assert rsa_numbers(cert.public_key()) == rsa_numbers(public_key(bundle.ek_public))

    # --json and stdout give the same document; the AK does not change between bundles
    again = Bundle.from_json(mgr.json("group", "provision", g["uuid"]))
    assert again.ak_public == bundle.ak_public and again.ek_public == bundle.ek_public
    assert Bundle.from_json(json.loads(mgr.cli("group", "provision", "plain").stdout)).ak_alg == (
        "ecc"
    )

    # the verifier's challenge: MakeCredential to the EK and the AK's name
    blob, secret = credential_for(bundle.ek_public, bundle.ak_name, CREDENTIAL)
    (tmp_path / "cred.blob").write_bytes(blob)
    (tmp_path / "cred.secret").write_bytes(secret)
    args = ["--credential-blob", str(tmp_path / "cred.blob")]
    args += ["--encrypted-secret", str(tmp_path / "cred.secret")]
    res = mgr.cli("group", "activate", "tenant", *args)
    assert res.stdout.strip() == CREDENTIAL.hex()
    assert mgr.json("group", "activate", "tenant", *args) == {"secret": CREDENTIAL.hex()}

    # tpm2_makecredential's one-file format works too
    (tmp_path / "ek.pub").write_bytes(bundle.ek_public)
    (tmp_path / "secret.bin").write_bytes(b"from tpm2-tools")
    tpm2(
        "makecredential",
        "-T",
        "none",  # offline, as a verifier runs it
        "-u",
        "ek.pub",
        "-s",
        "secret.bin",
        "-n",
        bundle.ak_name.hex(),
        "-o",
        "tools.cred",
        tcti="none",
        cwd=tmp_path,
    )
    res = mgr.cli("group", "activate", "tenant", "--credential-blob", str(tmp_path / "tools.cred"))
    assert res.stdout.strip() == b"from tpm2-tools".hex()

    # a credential for another AK (group "plain"): refused, one opaque line, audited
    res = mgr.cli("group", "activate", "plain", *args, check=False)
    assert res.returncode == 1
    assert res.stderr.strip() == "vtpm: error: credential activation failed"
    audit = mgr.json("audit", "--limit", "100")
    activations = [e for e in audit if e["action"] == "group.activate"]
    assert [e["outcome"] for e in activations] == ["ok", "ok", "ok", "refused"]


def test_group_without_ak_gets_one_on_first_need_and_host_quote(
    tmp_path: Path, mgr: ManagerProc
) -> None:
    key = owner_key(tmp_path)
    g = mgr.json("group", "new", "old", "--owner-key", f"{key}.pub", "--pcrs", "0,16")
    mgr.stop()
    # what a group migrated from a v1 database looks like: no AK
    with sqlite3.connect(mgr.data_dir / "manager.db") as db:
        db.execute("UPDATE groups SET ak_alg='', ak_public=x'', ak_private=x''")
    db.close()

    m = Manager(ManagerConfig.load(mgr.data_dir))
    m.open()
    try:
        assert lookup.group(m.store, "old").ak_alg == ""
        gid = uuid.UUID(g["uuid"])
        results: list[SignedQuote | BaseException] = []

        def quote(i: int) -> None:
            try:
                results.append(m.services.group_ops.host_quote(gid, b"q%d" % i, [0, 16]))
            except BaseException as e:
                results.append(e)

        threads = [threading.Thread(target=quote, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rec = lookup.group(m.store, "old")
        assert rec.ak_alg == "ecc" and rec.ak_public  # made once, by whichever thread was first
        assert all(isinstance(r, SignedQuote) for r in results), results
        nonces = set()
        for r in results:
            assert isinstance(r, SignedQuote)
            nonce = bytes(TPMS_ATTEST.unmarshal(r.attest)[0].extraData)
            check_quote(r, rec.ak_public, nonce, [0, 16])
            nonces.add(nonce)
        assert nonces == {b"q%d" % i for i in range(6)}
        bundle = m.services.group_ops.provision("old")
        assert bundle.ak_public == rec.ak_public and bundle.ak_alg == "ecc"
        check_quote(bundle.config_quote, rec.ak_public, config_digest(bundle.group), [0, 16])
    finally:
        m.close()


def test_host_quote_of_an_unknown_group_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    ManagerConfig(data).save()
    m = Manager(ManagerConfig.load(data))
    m.open()
    try:
        with pytest.raises(ManagerError):
            m.services.group_ops.host_quote(uuid.uuid4(), b"", [0])
    finally:
        m.close()
