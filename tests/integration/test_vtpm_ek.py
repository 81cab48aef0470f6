"""EKs and their certificates inside each vTPM (issue 12, part EK), through real tpm2-tools.

The Manager runs in this process so that a software CA (`SoftwareTestCa`, a `cryptography`
key: the group CA of manager/ca.py is another part) can be injected as its certificate issuer;
the instances it starts are real processes, the hardware TPM a swtpm simulator."""

from __future__ import annotations

import datetime
import json
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.helpers import free_port_pair, tpm2
from tests.mgr import (
    GUEST1,
    GUEST2,
    ManagerProc,
    init_manager,
    manager,
    new_group,
    owner_key,
    vtpm_cli,
    vtpm_json,
)
from vtpm.errors import ManagerError
from vtpm.manager.config import ManagerConfig
from vtpm.manager.service import Manager
from vtpm.tpm.public import parse_public

CERTS = {  # --ek name: (NV index, tpm2_createek -G)
    "rsa2048": (0x01C00002, "rsa"),
    "ecc256": (0x01C0000A, "ecc"),
    "ecc384": (0x01C00016, "ecc384"),
}
PLATFORM_INDEX = 0x01C08000


@dataclass
class SoftwareTestCa:
    """A software CA in the test, injected as the Manager's `issue`: records what it issued."""

    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )
    issued: list[tuple[uuid.UUID, str]] = field(default_factory=list)
    refuse: bool = False

    def issue(self, vtpm_uuid: uuid.UUID, kind: str, ek_public: bytes) -> bytes:
        if self.refuse:
            raise ManagerError("the test CA refuses")
        self.issued.append((vtpm_uuid, kind))
        now = datetime.datetime.now(datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vtpm software test CA")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]) if kind != "platform" else name)
            .issuer_name(name)
            .public_key(parse_public(ek_public).key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"urn:uuid:{vtpm_uuid}")]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.DER)


@dataclass
class InProcessManager:
    data_dir: Path
    manager: Manager
    thread: threading.Thread

    def json(self, *args: str) -> dict[str, object]:
        out = vtpm_json(self.data_dir, *args)
        assert isinstance(out, dict)
        return out

    def log(self, vtpm_uuid: str) -> str:
        return (self.data_dir / "log" / f"{vtpm_uuid}.log").read_text()


@pytest.fixture
def ca() -> SoftwareTestCa:
    return SoftwareTestCa()


@pytest.fixture
def inproc(tmp_path: Path, ca: SoftwareTestCa) -> Iterator[InProcessManager]:
    data = tmp_path / "data"
    init_manager(data)
    m = Manager(ManagerConfig.load(data), issue=ca.issue)
    m.open()
    try:
        m.listen()
        t = threading.Thread(target=m.run, name="manager", daemon=True)
        t.start()
        yield InProcessManager(data, m, t)
    finally:
        m.request_stop()
        m.close()


def _new(
    m: InProcessManager | ManagerProc,
    key: Path,
    *ek: str,
    group: str = "g",
    label: str = GUEST1,
) -> tuple[str, str]:
    """A started vTPM (raw + ctrl on TCP); its uuid and tcti."""

    port = free_port_pair()
    args = ["new", "--group", group, "--label", label, "--start"]
    args += ["--server", f"tcp:127.0.0.1:{port}", "--ctrl", f"tcp:127.0.0.1:{port + 1}", *ek]
    v = m.json(*args)
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    tpm2("startup", "-c", tcti=tcti)
    return str(v["uuid"]), tcti


def _nv_cert(tcti: str, index: int, tmp: Path) -> x509.Certificate:
    out = tmp / f"{index:08x}.der"
    tpm2("nvread", f"{index:#010x}", "-o", str(out), tcti=tcti)
    text = subprocess.run(
        ["openssl", "x509", "-inform", "DER", "-in", str(out), "-noout", "-subject"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert text.returncode == 0, text.stderr
    return x509.load_der_x509_certificate(out.read_bytes())


def _createek_pem(tcti: str, alg: str, tmp: Path) -> bytes:
    pem = tmp / f"ek-{alg}.pem"
    tpm2(
        "createek",
        "-G",
        alg,
        "-c",
        str(tmp / f"ek-{alg}.ctx"),
        "-f",
        "pem",
        "-u",
        str(pem),
        tcti=tcti,
    )
    tpm2("flushcontext", "-t", tcti=tcti)
    return pem.read_bytes()


def _spki(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey) or hasattr(key, "public_numbers")
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_new_vtpm_carries_certified_eks_at_the_tcg_indices(
    tmp_path: Path, inproc: InProcessManager, ca: SoftwareTestCa
) -> None:
    key = owner_key(tmp_path)
    new_group(inproc, "g", key)  # type: ignore[arg-type]
    u, tcti = _new(inproc, key, "--ek", "rsa2048,ecc256,ecc384,platform")
    assert sorted(k for _, k in ca.issued) == ["ek-ecc256", "ek-ecc384", "ek-rsa2048", "platform"]
    assert {v for v, _ in ca.issued} == {uuid.UUID(u)}
    for name, (index, alg) in CERTS.items():
        cert = _nv_cert(tcti, index, tmp_path)
        made = serialization.load_pem_public_key(_createek_pem(tcti, alg, tmp_path))
        assert _spki(cert.public_key()) == _spki(made), name
        # the attributes swtpm_setup gives them, and locked
        pub = tpm2("nvreadpublic", f"{index:#010x}", tcti=tcti).stdout.decode()
        for attr in ("ppwrite", "writedefine", "ppread", "ownerread", "authread", "no_da"):
            assert attr in pub, (name, pub)
        assert "platformcreate" in pub and "writelocked" in pub, pub
        for hierarchy in ("o", "p", f"{index:#010x}"):
            res = tpm2(
                "nvwrite",
                f"{index:#010x}",
                "-C",
                hierarchy,
                "-i",
                "-",
                tcti=tcti,
                check=False,
                input_=b"x",
            )
            assert res.returncode != 0, (name, hierarchy)
        assert _nv_cert(tcti, index, tmp_path) == cert  # unchanged
    platform = _nv_cert(tcti, PLATFORM_INDEX, tmp_path)
    rsa = serialization.load_pem_public_key(_createek_pem(tcti, "rsa", tmp_path))
    assert _spki(platform.public_key()) == _spki(rsa)
    # the keys are persisted at the TCG handles
    handles = tpm2("getcap", "handles-persistent", tcti=tcti).stdout.decode().lower()
    for h in ("0x81010001", "0x8101000a", "0x81010016"):
        assert h in handles


def test_provisioning_happens_once_not_at_every_start(
    tmp_path: Path, inproc: InProcessManager, ca: SoftwareTestCa
) -> None:
    key = owner_key(tmp_path)
    new_group(inproc, "g", key)  # type: ignore[arg-type]
    u, tcti = _new(inproc, key)  # the default set: rsa2048, ecc256, platform
    assert sorted(k for _, k in ca.issued) == ["ek-ecc256", "ek-rsa2048", "platform"]
    before = _nv_cert(tcti, 0x01C00002, tmp_path)
    for _ in range(2):
        inproc.json("stop", u)
        started = time.monotonic()
        inproc.json("start", u)
        print(f"restart without provisioning: {time.monotonic() - started:.3f} s")
    assert len(ca.issued) == 3  # nothing asked again
    assert inproc.log(u).count("provisioned in") == 1
    tpm2("startup", "-c", tcti=tcti)
    assert _nv_cert(tcti, 0x01C00002, tmp_path) == before
    with pytest.raises(AssertionError):  # ecc384 only on request
        _nv_cert(tcti, 0x01C00016, tmp_path)


def test_ek_provision_gives_an_older_vtpm_its_eks(
    tmp_path: Path, inproc: InProcessManager, ca: SoftwareTestCa
) -> None:
    key = owner_key(tmp_path)
    new_group(inproc, "g", key)  # type: ignore[arg-type]
    u, tcti = _new(inproc, key, "--ek", "none")
    assert ca.issued == []
    assert tpm2("nvreadpublic", "0x01c00002", tcti=tcti, check=False).returncode != 0
    inproc.json("ek", "provision", u, "--ek", "ecc384")
    tpm2("startup", "-c", tcti=tcti)
    cert = _nv_cert(tcti, 0x01C00016, tmp_path)
    made = serialization.load_pem_public_key(_createek_pem(tcti, "ecc384", tmp_path))
    assert _spki(cert.public_key()) == _spki(made)
    assert ca.issued == [(uuid.UUID(u), "ek-ecc384")]
    # again: the locked certificate is kept, nothing is issued
    inproc.json("ek", "provision", u, "--ek", "ecc384")
    assert len(ca.issued) == 1


def test_a_refused_certificate_leaves_the_key_and_the_vtpm_running(
    tmp_path: Path, inproc: InProcessManager, ca: SoftwareTestCa
) -> None:
    key = owner_key(tmp_path)
    new_group(inproc, "g", key)  # type: ignore[arg-type]
    ca.refuse = True
    u, tcti = _new(inproc, key, "--ek", "rsa2048")
    assert "0x81010001" in tpm2("getcap", "handles-persistent", tcti=tcti).stdout.decode().lower()
    assert tpm2("nvreadpublic", "0x01c00002", tcti=tcti, check=False).returncode != 0
    assert "the test CA refuses" in inproc.log(u)
    ca.refuse = False  # the CA can issue now: one command writes the certificate
    inproc.json("ek", "provision", u, "--ek", "rsa2048")
    tpm2("startup", "-c", tcti=tcti)
    _nv_cert(tcti, 0x01C00002, tmp_path)


def test_tpm12_vtpm_gets_no_ek_and_says_why(tmp_path: Path, inproc: InProcessManager) -> None:
    key = owner_key(tmp_path)
    new_group(inproc, "g", key)  # type: ignore[arg-type]
    plain = inproc.json("new", "--group", "g", "--label", GUEST2, "--tpm", "1.2")
    assert plain["tpm"] == "1.2"
    res = vtpm_cli(
        inproc.data_dir,
        "new",
        "--group",
        "g",
        "--label",
        GUEST1,
        "--tpm",
        "1.2",
        "--ek",
        "rsa2048",
        check=False,
    )
    assert res.returncode != 0 and "TPM 1.2 EK certificate (NV 0x1000F000)" in res.stderr


def _openssl_verify(ca: Path, cert: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca), str(cert)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_group_ca_in_the_hardware_tpm_certifies_the_vtpm_eks(tmp_path: Path) -> None:
    """Issue 12 end to end with the Manager as shipped: its group CA (a key in the simulated
    hardware TPM) certifies each vTPM's EKs; the certificates chain to the group CA, not to
    another group's; the verifier checks the chain to the hardware TPM and a deep quote bound
    to the EK; a verifier that trusts only the group CA accepts the EK certificate."""
    with manager(tmp_path / "data") as m:
        key = owner_key(tmp_path)
        new_group(m, "g", key)
        new_group(m, "h", key)
        a, tcti = _new(m, key, "--ek", "rsa2048,ecc256,ecc384,platform")
        b, _ = _new(m, key, label=GUEST2)
        c, _ = _new(m, key, group="h", label="guest3_u:vm_r:vtpm_t")
        for name, (index, alg) in CERTS.items():
            cert = _nv_cert(tcti, index, tmp_path)
            made = serialization.load_pem_public_key(_createek_pem(tcti, alg, tmp_path))
            assert _spki(cert.public_key()) == _spki(made), name
        dirs = {}
        for u, d in ((a, "a"), (b, "b"), (c, "c")):
            dirs[d] = tmp_path / d
            vtpm_cli(m.data_dir, "ek", u, "--out-dir", str(dirs[d]))
        ca_g, ca_h = dirs["a"] / "group-ca.pem", dirs["c"] / "group-ca.pem"
        for kind in ("ek-rsa2048", "ek-ecc256", "ek-ecc384", "platform"):
            assert _openssl_verify(ca_g, dirs["a"] / f"{kind}.pem").returncode == 0, kind
            assert _openssl_verify(ca_h, dirs["a"] / f"{kind}.pem").returncode != 0, kind
        # trusting only the group CA certificate (as Keylime's EK certificate store does)
        ca_cert = x509.load_pem_x509_certificate(ca_g.read_bytes())
        ek_cert = x509.load_pem_x509_certificate((dirs["a"] / "ek-rsa2048.pem").read_bytes())
        ek_cert.verify_directly_issued_by(ca_cert)

        bundle = tmp_path / "bundle.json"
        vtpm_cli(m.data_dir, "group", "provision", "g", "-o", str(bundle))
        ev = tmp_path / "ev.json"
        vtpm_cli(m.data_dir, "quote", "--deep", a, "--nonce", "0a1b2c", "-o", str(ev))

    def verify(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return vtpm_cli(tmp_path, "verify", *(str(x) for x in args), "--json", check=False)

    r = verify("--bundle", bundle, "--ek-cert", dirs["a"] / "ek-rsa2048.pem")
    assert r.returncode == 0, r.stdout
    ids = {x["id"] for x in json.loads(r.stdout)["checks"]}
    assert {"chain.ek_cert", "chain.ca_cert", "chain.certify", "chain.ak"} <= ids
    deep = ("--bundle", bundle, "--evidence", ev, "--nonce", "0a1b2c")
    r = verify(*deep, "--ek-cert", dirs["a"] / "ek-rsa2048.pem")
    assert r.returncode == 0, r.stdout
    assert "deep.ek" in {x["id"] for x in json.loads(r.stdout)["checks"]}
    r = verify(*deep, "--ek-cert", dirs["b"] / "ek-rsa2048.pem")  # another vTPM's EK
    assert r.returncode == 1
    assert [x["id"] for x in json.loads(r.stdout)["checks"] if not x["ok"]] == ["deep.ek"]
    r = verify("--bundle", bundle, "--ek-cert", dirs["c"] / "ek-rsa2048.pem")  # group h's
    assert r.returncode == 1
    assert "chain.ek_cert" in {x["id"] for x in json.loads(r.stdout)["checks"] if not x["ok"]}
