"""tpm2-tools, unchanged, against a vtpm instance through TCTI `swtpm` and `mssim`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import RunningInstance, instance, power_cycle, tpm2

pytestmark = pytest.mark.integration

SECRET = b"the disk key of guest one\n"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningInstance]:
    base = tmp_path_factory.mktemp("tools")
    with instance(base / "state", base / "state.key") as inst:
        yield inst


@pytest.fixture(params=["swtpm", "mssim"])
def tcti(request: pytest.FixtureRequest, running: RunningInstance) -> str:
    t = running.tcti_swtpm if request.param == "swtpm" else running.tcti_mssim
    # each test starts from a fresh power cycle of the same TPM
    power_cycle(running)
    tpm2("startup", "-c", tcti=t)
    return t


def flush(tcti: str) -> None:
    tpm2("flushcontext", "-t", tcti=tcti)


def test_getrandom_returns_requested_bytes(tcti: str) -> None:
    a = tpm2("getrandom", "32", "--hex", tcti=tcti).stdout.decode().strip()
    b = tpm2("getrandom", "32", "--hex", tcti=tcti).stdout.decode().strip()
    assert len(bytes.fromhex(a)) == 32
    assert a != b


def test_pcrextend_then_pcrread_gives_the_expected_value(tcti: str, tmp_path: Path) -> None:
    # startup -c resets PCR 16 to zeros
    d1 = hashlib.sha256(b"first").hexdigest()
    d2 = hashlib.sha256(b"second").hexdigest()
    tpm2("pcrextend", f"16:sha256={d1}", tcti=tcti)
    tpm2("pcrextend", f"16:sha256={d2}", tcti=tcti)
    out = tmp_path / "pcr.bin"
    tpm2("pcrread", "sha256:16", "-o", str(out), tcti=tcti)
    expect = hashlib.sha256(bytes(32) + bytes.fromhex(d1)).digest()
    expect = hashlib.sha256(expect + bytes.fromhex(d2)).digest()
    assert out.read_bytes() == expect


def test_seal_and_unseal_a_secret(tcti: str, tmp_path: Path) -> None:
    tpm2("createprimary", "-C", "o", "-c", "primary.ctx", tcti=tcti, cwd=tmp_path)
    flush(tcti)
    tpm2(
        "create",
        "-C",
        "primary.ctx",
        "-i-",
        "-u",
        "seal.pub",
        "-r",
        "seal.priv",
        tcti=tcti,
        cwd=tmp_path,
        input_=SECRET,
    )
    flush(tcti)
    tpm2(
        "load",
        "-C",
        "primary.ctx",
        "-u",
        "seal.pub",
        "-r",
        "seal.priv",
        "-c",
        "seal.ctx",
        tcti=tcti,
        cwd=tmp_path,
    )
    flush(tcti)
    out = tpm2("unseal", "-c", "seal.ctx", tcti=tcti, cwd=tmp_path).stdout
    flush(tcti)
    assert out == SECRET


def test_quote_verifies_with_checkquote_and_a_wrong_nonce_fails(tcti: str, tmp_path: Path) -> None:
    def run(tool: str, *args: str, check: bool = True) -> int:
        return tpm2(tool, *args, tcti=tcti, cwd=tmp_path, check=check).returncode

    run("createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub")
    flush(tcti)
    run(
        "createak",
        "-C",
        "ek.ctx",
        "-c",
        "ak.ctx",
        "-G",
        "ecc",
        "-g",
        "sha256",
        "-s",
        "ecdsa",
        "-u",
        "ak.pem",
        "-f",
        "pem",
        "-n",
        "ak.name",
    )
    flush(tcti)
    nonce = os.urandom(16).hex()
    run("pcrextend", f"10:sha256={hashlib.sha256(b'kernel').hexdigest()}")
    run(
        "quote",
        "-c",
        "ak.ctx",
        "-l",
        "sha256:0,10,16",
        "-q",
        nonce,
        "-m",
        "q.msg",
        "-s",
        "q.sig",
        "-o",
        "q.pcrs",
        "-g",
        "sha256",
    )
    flush(tcti)
    check = (
        "checkquote",
        "-u",
        "ak.pem",
        "-m",
        "q.msg",
        "-s",
        "q.sig",
        "-f",
        "q.pcrs",
        "-g",
        "sha256",
        "-q",
    )
    assert run(*check, nonce) == 0
    assert run(*check, os.urandom(16).hex(), check=False) != 0


def test_nv_define_write_read(tcti: str, tmp_path: Path) -> None:
    index = "0x1500016" if "swtpm" in tcti else "0x1500017"
    tpm2("nvundefine", index, "-C", "o", tcti=tcti, check=False)
    tpm2(
        "nvdefine",
        index,
        "-C",
        "o",
        "-s",
        "32",
        "-a",
        "ownerread|ownerwrite|authread|authwrite",
        tcti=tcti,
    )
    data = os.urandom(32)
    (tmp_path / "nv.bin").write_bytes(data)
    tpm2("nvwrite", index, "-C", "o", "-i", str(tmp_path / "nv.bin"), tcti=tcti)
    got = tpm2("nvread", index, "-C", "o", "-s", "32", tcti=tcti).stdout
    assert got == data
    tpm2("nvundefine", index, "-C", "o", tcti=tcti)
