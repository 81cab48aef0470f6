"""Parsing of TPMS_ATTEST, TPMT_SIGNATURE and TPM2B_PUBLIC, and of the verifier's other inputs
(expected-values policy, tpm2-tools PCR files), against captures from tpm2-tools 5.4 on swtpm
0.7.1. Malformed input raises VerifyError (or ConfigError for a policy file), nothing else."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtpm.cli.verify_cmd import load_ak, load_attest, load_pcrs, parse_pcr_list
from vtpm.errors import ConfigError, VerifyError
from vtpm.tpm import hashes
from vtpm.tpm.attest import (
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST,
    parse_attest,
    parse_pcr_selection,
    parse_signature,
)
from vtpm.tpm.constants import TPM_ALG, TPMA_OBJECT
from vtpm.tpm.public import parse_public, parse_tpmt_public
from vtpm.verify.bundle import GroupInfo, kdfa
from vtpm.verify.expected import Expected
from vtpm.verify.quote import verify_quote

# Captured with tpm2-tools 5.4 on swtpm 0.7.1: PCR 16 and 23 extended, then
#   tpm2_createek -G rsa; tpm2_createak -G ecc -s ecdsa -u ak.pub -n ak.name -q ak.qname
#   tpm2_quote -l sha256:0,16,23 -q 5eed0001 -m q.msg -s q.sig -o q.pcrs   (and -F values)
#   tpm2_createak -G rsa -s rsassa ...; tpm2_quote -l sha256:16 -q 5eed0002 -m rq.msg -s rq.sig
AK_PUB = bytes.fromhex(
    "00580023000b00050072000000100018000b00030010002006882a0695c755b5a5318445dd44fbda5a4d16e5"
    "da74bcdb98ef9c6571eeea730020c2a245bba593954fa5b728cb5271a447fd2a7586a084370ba500b13049c3"
    "8666"
)
AK_NAME = bytes.fromhex("000b7ab3a37aaf155fa38c6a41fa8d989aa7ca6971e146e15e0288a4f92582d381db")
AK_QNAME = bytes.fromhex("000bbaf0da058e2728ee77efe2fb282232bc2316d00a39404ccc93766c8ba549175b")
Q_MSG = bytes.fromhex(
    "ff54434780180022000bbaf0da058e2728ee77efe2fb282232bc2316d00a39404ccc93766c8ba549175b0004"
    "5eed00010000000000000388000000010000000001201910230016363600000001000b030100810020bf98b4"
    "b282792bde6983c64d3c0fb4223f658fb6638cb51b3fbe5bd19f0a276a"
)
Q_SIG = bytes.fromhex(
    "0018000b0020eac68aa0df8365f73be5b06c981144e9ed142f980cbe841ee05f35d9f925f9730020badef942"
    "177544a63114b24c9ca0de54a8e119cc5a98194bddf0000063aaf6fb"
)
PCR16 = bytes.fromhex("5358cb7cd9bc36ef9e03011a4ce012664ddb7a5eb6df2e3800814178c3ba748f")
PCR23 = bytes.fromhex("5d87acd0146cb90eac1812e7650a2f47de5f00a71af76590ab7bf5d9c47aa74e")
Q_PCRS = {0: bytes(32), 16: PCR16, 23: PCR23}
Q_VALUES = bytes(32) + PCR16 + PCR23  # tpm2_quote -o ... -F values
# tpm2_quote -o (default, serialized): 668 bytes, zero except these runs
Q_SERIALIZED_RUNS = [
    (0, "010000000b0003010081"),
    (132, "010000000300000020"),
    (206, "2000" + PCR16.hex()),
    (272, "2000" + PCR23.hex()),
]
RAK_PUB = bytes.fromhex(
    "01180001000b00050072000000100014000b08000000000001008463a22224551ef6deff6a499d85ae9a1c5c"
    "9d16cec89f94387b81e061fa5cc6ccb2f6c2d70cea2a7fe56618926df93f61ecc26512788af29f73aa43e42f"
    "38e196f8cffe9a2c1d526d93859bcbcc5227d2f488fd8fbb21f78e019dfeedac17cb53714c432ab69f99afcc"
    "776f25cd9d5a2c6d516cb009010aa976d829727cbee5fee207d27eaaa42307c21321c8cf6ed566505575d421"
    "4cc9c51a4b1f7e635abaa1338c9a49249c60beb6ff182e36e4698e99eedfc216ad4ffdba4e7a134b0448419d"
    "5d80ae37a2b0a4069dea19e577a67e3ed56a1dba7bbfc34b6527d2beb98131d24dfd572bf0502a20b9b0d59d"
    "f8cbbde41bd0cafdf169af479dc8921f1a25"
)
RAK_QNAME = bytes.fromhex("000b0e3208eaa4638b9a21473975ef240eaf61ce8d446852230356b884e8d135343a")
RQ_MSG = bytes.fromhex(
    "ff54434780180022000b0e3208eaa4638b9a21473975ef240eaf61ce8d446852230356b884e8d135343a0004"
    "5eed00020000000000000800000000010000000001201910230016363600000001000b03000001002097fd51"
    "80c68406588a012c5b7997601b7fb39c08051188bff97c061dcfd9a839"
)
RQ_SIG = bytes.fromhex(
    "0014000b01003bc1cd6450b81ce603121e17825b10284611dedb1ceacb79f5ce63044a740d25e12480440be0"
    "b3f2a0412eb4e6d5e15ed3b36e3428e9670ae540d96b2163f3f677b39446ae6f45a86260c034a4c758e23dd3"
    "f7871328e2f731271dc24102279c4e2c3cafcb7d4975bb92697a2fa6e78d821f00408f79c5da841953c36d39"
    "d945baa6ef45101d709e098edc462fd37375c826b0f2d4dfaf35712a6c77235d0369772ead83f332786ea397"
    "53b6a5ca11da17b71f4b4f24c4e97c399514e298582bd935e0eefc0317bd9c0e46d66168d03d593cffaf0bc1"
    "d7f2833a0fc0842942779ff27f64819683337c389da443ad9707c3a8e848ff474e9fe66b253a45b8ef2d"
)
EK_PUB = bytes.fromhex(
    "013a0001000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
    "00060080004300100800000000000100ef5097681948f5fa3fde7d4e1b18f1606f896adcb967f2dc19a3a9d1"
    "d30c5c697368c513af985880fef82450b7392097f4618a4d732fd35589959ae6efc6849bcc8e7b9cf5d664ed"
    "410595c140375b41964c40420c9b03be5d491e5890639f3e038ac3ce7871b40ac8c4e6247d4a4ce4a54460c6"
    "aca0fb506a6116ee7d2d64acf14f14541a142d787f3f04ba1b3d095f5f0e97078e7b9543a36badc7a2b38441"
    "f7e409fc4017d53c491e0a55cc4bd034c7e04d4f16c3cabd27cc28dee08098e2f2f8a8ce6257b40741c30f21"
    "809d7a23b69308a485120995ad3314caf125314de889d979208e7f4e49343e8220dfc547288d9eeb71997a38"
    "26227f1f49c71523"
)
PEM_AK = b"""-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEnbv7zT3Q1CKa2F9542qOOucxky3u
LtgxFC3Y49JC9b3q9v4iceftcGX/SYsBOQUAmXou5PmdJI5S4OhE/dALJg==
-----END PUBLIC KEY-----
"""
VECTORS = [AK_PUB, RAK_PUB, EK_PUB, Q_MSG, RQ_MSG, Q_SIG, RQ_SIG]


def serialized_pcrs() -> bytes:
    out = bytearray(668)
    for offset, text in Q_SERIALIZED_RUNS:
        raw = bytes.fromhex(text)
        out[offset : offset + len(raw)] = raw
    return bytes(out)


def parse_any(data: bytes) -> None:
    """Every parser over `data`: each returns or raises VerifyError."""
    for parser in (parse_attest, parse_signature, parse_public, parse_tpmt_public):
        with contextlib.suppress(VerifyError):
            parser(data)
    with contextlib.suppress(VerifyError):
        parse_pcr_selection(data)


# TPMS_ATTEST ---------------------------------------------------------------------------------


def test_quote_fields() -> None:
    a = parse_attest(Q_MSG)
    assert a.magic == TPM_GENERATED_VALUE
    assert a.type == TPM_ST_ATTEST.QUOTE
    assert a.is_quote
    assert a.qualified_signer == AK_QNAME
    assert a.extra_data == bytes.fromhex("5eed0001")
    assert a.clock_info.clock == 0x388
    assert (a.clock_info.reset_count, a.clock_info.restart_count) == (1, 0)
    assert a.clock_info.safe
    assert a.firmware_version == 0x2019102300163636
    assert a.pcr_select is not None
    assert [(s.hash_alg, s.indices) for s in a.pcr_select] == [(TPM_ALG.SHA256, (0, 16, 23))]
    assert str(a.pcr_select[0]) == "sha256:0,16,23"
    assert a.pcr_digest == hashlib.sha256(bytes(32) + PCR16 + PCR23).digest()


def test_non_quote_attestation_parses_with_its_body_raw() -> None:
    # a TPMS_ATTEST of type ATTEST_CERTIFY: the body is two TPM2B_NAMEs
    body = struct.pack(">H", 34) + AK_NAME + struct.pack(">H", 34) + AK_QNAME
    raw = Q_MSG[:4] + struct.pack(">H", TPM_ST_ATTEST.CERTIFY) + Q_MSG[6:73] + body
    a = parse_attest(raw)
    assert a.type == TPM_ST_ATTEST.CERTIFY
    assert not a.is_quote
    assert a.attested == body
    assert a.pcr_digest is None


def test_wrong_magic_parses() -> None:
    a = parse_attest(b"\xde\xad\xbe\xef" + Q_MSG[4:])
    assert a.magic == 0xDEADBEEF


def test_truncated_and_trailing_attest() -> None:
    for n in range(len(Q_MSG)):
        with pytest.raises(VerifyError, match="TPMS_ATTEST"):
            parse_attest(Q_MSG[:n])
    with pytest.raises(VerifyError, match="after the end"):
        parse_attest(Q_MSG + b"\x00")


def test_oversized_fields_are_refused() -> None:
    bad_signer = Q_MSG[:6] + b"\xff\xff" + Q_MSG[8:]
    with pytest.raises(VerifyError, match="qualifiedSigner is 65535 bytes"):
        parse_attest(bad_signer)
    many_banks = Q_MSG[:73] + struct.pack(">I", 17) + Q_MSG[77:]
    with pytest.raises(VerifyError, match="17 banks"):
        parse_attest(many_banks)
    with pytest.raises(VerifyError, match="too long"):
        parse_attest(Q_MSG + bytes(4096))


def test_pcr_selection_alone() -> None:
    sel = parse_pcr_selection(bytes.fromhex("00000002000b03ff0000000403000080"))
    assert [str(s) for s in sel] == ["sha256:0,1,2,3,4,5,6,7", "sha1:23"]
    with pytest.raises(VerifyError):
        parse_pcr_selection(bytes.fromhex("00000001000b2100"))


def test_not_bytes_is_a_verify_error() -> None:
    with pytest.raises(VerifyError, match="expected bytes"):
        parse_attest("ff544347")  # type: ignore[arg-type]


# TPMT_SIGNATURE ------------------------------------------------------------------------------


def test_signatures() -> None:
    e = parse_signature(Q_SIG)
    assert (e.sig_alg, e.hash_alg, e.scheme) == (TPM_ALG.ECDSA, TPM_ALG.SHA256, "ecdsa-sha256")
    assert e.r.to_bytes(32, "big") == Q_SIG[6:38]
    r = parse_signature(RQ_SIG)
    assert (r.sig_alg, r.hash_alg, len(r.rsa)) == (TPM_ALG.RSASSA, TPM_ALG.SHA256, 256)
    assert parse_signature(b"\x00\x10").sig_alg == TPM_ALG.NULL


def test_bad_signatures() -> None:
    with pytest.raises(VerifyError, match="unsupported signature algorithm 0x0099"):
        parse_signature(b"\x00\x99\x00\x0b")
    for n in range(len(Q_SIG)):
        with pytest.raises(VerifyError, match="TPMT_SIGNATURE"):
            parse_signature(Q_SIG[:n])
    with pytest.raises(VerifyError, match="after the end"):
        parse_signature(RQ_SIG + b"\x00")


# TPM2B_PUBLIC --------------------------------------------------------------------------------


def test_ecc_ak_public() -> None:
    p = parse_public(AK_PUB)
    assert p.type == TPM_ALG.ECC and p.name_alg == TPM_ALG.SHA256
    assert p.attributes & TPMA_OBJECT.RESTRICTED and p.attributes & TPMA_OBJECT.SIGN_ENCRYPT
    assert not p.attributes & TPMA_OBJECT.DECRYPT
    assert (p.scheme.alg, p.scheme.hash_alg) == (TPM_ALG.ECDSA, TPM_ALG.SHA256)
    assert isinstance(p.key, ec.EllipticCurvePublicKey) and p.key.curve.name == "secp256r1"
    assert p.name == AK_NAME
    assert p.description == "ECC NIST_P256"
    assert p.tpmt == AK_PUB[2:]
    assert parse_tpmt_public(AK_PUB[2:]).name == AK_NAME


def test_rsa_keys() -> None:
    p = parse_public(RAK_PUB)
    assert isinstance(p.key, rsa.RSAPublicKey) and p.key.key_size == 2048
    assert p.key.public_numbers().e == 65537
    assert (p.scheme.alg, p.description) == (TPM_ALG.RSASSA, "RSA-2048")
    ek = parse_public(EK_PUB)
    assert ek.attributes == 0x000300B2
    assert (ek.symmetric.alg, ek.symmetric.key_bits, ek.symmetric.mode) == (
        TPM_ALG.AES,
        128,
        TPM_ALG.CFB,
    )
    assert ek.auth_policy.hex().startswith("8371976744")


def test_qualified_name_of_a_primary() -> None:
    p = parse_public(AK_PUB)
    qn = p.qualified_name(bytes.fromhex("4000000b"))
    assert qn == b"\x00\x0b" + hashlib.sha256(bytes.fromhex("4000000b") + AK_NAME).digest()


def test_bad_publics() -> None:
    for n in range(len(AK_PUB)):
        with pytest.raises(VerifyError):
            parse_public(AK_PUB[:n])
    with pytest.raises(VerifyError, match="after the end"):
        parse_public(AK_PUB + b"\x00")
    keyedhash = struct.pack(">HHHI", 12, 0x0008, 0x000B, 0x00060000) + b"\x00\x00\x00\x10"
    with pytest.raises(VerifyError, match="not an RSA or ECC key"):
        parse_public(keyedhash)
    off_curve = bytearray(AK_PUB)
    off_curve[-1] ^= 1
    with pytest.raises(VerifyError, match="not on the curve"):
        parse_public(bytes(off_curve))
    odd_exponent = bytearray(RAK_PUB)
    odd_exponent[20:24] = struct.pack(">I", 4)
    with pytest.raises(VerifyError, match="exponent"):
        parse_public(bytes(odd_exponent))
    bad_curve = bytearray(AK_PUB)
    bad_curve[18:20] = b"\x00\x20"
    with pytest.raises(VerifyError, match="curve 0x0020 is not supported"):
        parse_public(bytes(bad_curve))
    bad_name_alg = bytearray(AK_PUB)
    bad_name_alg[4:6] = b"\x00\x12"
    with pytest.raises(VerifyError, match="nameAlg sm3_256"):
        parse_public(bytes(bad_name_alg))


# quotes verified from the captures -------------------------------------------------------------


def test_captured_quotes_verify() -> None:
    v = verify_quote(
        Q_MSG, Q_SIG, parse_public(AK_PUB), Q_PCRS, nonce=bytes.fromhex("5eed0001"),
        qualified_name=AK_QNAME,
    )  # fmt: skip
    assert v.ok, v.failed()
    assert [c.id for c in v.checks] == [
        "quote.signature", "quote.ak", "quote.magic", "quote.type", "quote.signer",
        "quote.nonce", "quote.pcr_selection", "quote.pcr_digest",
    ]  # fmt: skip
    r = verify_quote(
        RQ_MSG, RQ_SIG, parse_public(RAK_PUB), {16: PCR16}, nonce=bytes.fromhex("5eed0002"),
        qualified_name=RAK_QNAME,
    )  # fmt: skip
    assert r.ok, r.failed()


def test_signer_without_qualified_name_needs_it_for_a_child_key() -> None:
    v = verify_quote(Q_MSG, Q_SIG, parse_public(AK_PUB), Q_PCRS)
    assert v.failed_ids() == {"quote.signer"}
    assert "tpm2_createak -q" in v.failed()[0].reason


def test_bare_pem_key_cannot_show_ak_attributes(tmp_path: Path) -> None:
    captured = tmp_path / "pak.pem"  # tpm2_createak -f pem, another AK
    captured.write_bytes(PEM_AK)
    other = load_ak(captured)
    assert isinstance(other, ec.EllipticCurvePublicKey) and other.curve.name == "secp256r1"
    pem = tmp_path / "ak.pem"
    pem.write_bytes(
        parse_public(AK_PUB).key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    key = load_ak(pem)
    v = verify_quote(Q_MSG, Q_SIG, key, Q_PCRS, qualified_name=AK_QNAME)
    assert v.failed_ids() == {"quote.ak"}


def test_cross_algorithm_signature_fails_cleanly() -> None:
    v = verify_quote(Q_MSG, RQ_SIG, parse_public(AK_PUB), Q_PCRS, qualified_name=AK_QNAME)
    assert v.failed_ids() == {"quote.signature"}
    assert "cannot come from an ECC" in v.failed()[0].reason


def test_unknown_bank_is_a_verify_error() -> None:
    with pytest.raises(VerifyError, match="unknown PCR bank"):
        verify_quote(Q_MSG, Q_SIG, parse_public(AK_PUB), Q_PCRS, pcr_bank="md5")


# garbage in, VerifyError out -------------------------------------------------------------------


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_garbage_raises_only_verify_error(data: bytes) -> None:
    parse_any(data)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VECTORS), st.integers(0, 10_000), st.integers(1, 255))
def test_flipped_vectors_raise_only_verify_error(vector: bytes, where: int, xor: int) -> None:
    data = bytearray(vector)
    data[where % len(data)] ^= xor
    parse_any(bytes(data))


@settings(max_examples=200)
@given(st.sampled_from(VECTORS), st.binary(min_size=1, max_size=40), st.integers(0, 400))
def test_spliced_vectors_raise_only_verify_error(vector: bytes, junk: bytes, at: int) -> None:
    at %= len(vector)
    parse_any(vector[:at] + junk + vector[at:])


@settings(max_examples=200)
@given(st.binary(max_size=200), st.binary(max_size=80))
def test_verify_quote_on_garbage_raises_only_verify_error(att: bytes, sig: bytes) -> None:
    with contextlib.suppress(VerifyError):
        verify_quote(att, sig, parse_public(AK_PUB), Q_PCRS)


# tpm2-tools files the CLI reads ----------------------------------------------------------------


def test_tpm2_tools_pcr_files(tmp_path: Path) -> None:
    serialized = tmp_path / "q.pcrs"
    serialized.write_bytes(serialized_pcrs())
    assert load_pcrs(serialized, None) == ("sha256", Q_PCRS)
    values = tmp_path / "qv.pcrs"
    values.write_bytes(Q_VALUES)
    assert load_pcrs(values, "sha256:0,16,23") == ("sha256", Q_PCRS)
    with pytest.raises(VerifyError, match="but 2 sha256 values are 64"):
        load_pcrs(values, "sha256:0,16")
    as_json = tmp_path / "pcrs.json"
    as_json.write_text(json.dumps({"sha256": {str(k): v.hex() for k, v in Q_PCRS.items()}}))
    assert load_pcrs(as_json, None) == ("sha256", Q_PCRS)
    broken = tmp_path / "broken.pcrs"
    broken.write_bytes(serialized_pcrs()[:-1])
    with pytest.raises(VerifyError, match="not a tpm2-tools PCR file"):
        load_pcrs(broken, None)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, 667), st.integers(1, 255))
def test_flipped_pcr_file_raises_only_verify_error(tmp_path: Path, where: int, xor: int) -> None:
    data = bytearray(serialized_pcrs())
    data[where] ^= xor
    path = tmp_path / "flipped.pcrs"
    path.write_bytes(bytes(data))
    with contextlib.suppress(VerifyError):
        load_pcrs(path, None)


def test_attest_files_and_pcr_lists(tmp_path: Path) -> None:
    wrapped = tmp_path / "q2b.msg"
    wrapped.write_bytes(struct.pack(">H", len(Q_MSG)) + Q_MSG)
    assert load_attest(wrapped, "quote") == Q_MSG
    assert parse_pcr_list("sha256:0,16,23") == ("sha256", [0, 16, 23])
    for bad in ("0,1", "sha256:0,0", "sha256:24", "md5:1", "sha256:a", "sha1:0+sha256:1"):
        with pytest.raises(ConfigError):
            parse_pcr_list(bad)


# the expected-values policy --------------------------------------------------------------------


def policy(**fields: object) -> dict[str, object]:
    return {"format": "vtpm-verify-policy/1", **fields}


def test_expected_policy_parses() -> None:
    e = Expected.from_json(
        policy(
            vtpm_uuid="6f1c5a52-4b8e-4d7e-9a0e-3a3d2b1c0f00",
            group="tenants",
            label="guest1_u:vm_r:vtpm_t",
            vtpm_pcrs={"sha256": {"4": "aa" * 32, "5": "bb" * 32}},
            host_pcrs={"sha1": {"0": "00" * 20}},
            event_log={"kernel": "ab" * 32, "anything": [1, 2]},
        )
    )
    assert str(e.vtpm_uuid) == "6f1c5a52-4b8e-4d7e-9a0e-3a3d2b1c0f00"
    assert e.vtpm_pcrs is not None and e.vtpm_pcrs["sha256"][4] == b"\xaa" * 32
    assert e.host_pcrs is not None and e.host_pcrs["sha1"][0] == bytes(20)
    assert e.event_log == {"kernel": "ab" * 32, "anything": [1, 2]}
    assert Expected.from_json(policy()) == Expected()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ([], "JSON object"),
        ({"vtpm_uuid": "x"}, "format"),
        (policy(labels="x"), "unknown key"),
        (policy(vtpm_uuid="nope"), "not a uuid"),
        (policy(vtpm_uuid=7), "not a uuid"),
        (policy(label="nocolons"), "user:role:type"),
        (policy(group=""), "non-empty"),
        (policy(vtpm_pcrs={"md5": {"0": "00"}}), "unknown PCR bank"),
        (policy(vtpm_pcrs={"sha256": {"24": "00" * 32}}), "not in 0..23"),
        (policy(vtpm_pcrs={"sha256": {"x": "00" * 32}}), "not a PCR index"),
        (policy(vtpm_pcrs={"sha256": {"4": "00"}}), "1 bytes; a sha256 value is 32"),
        (policy(vtpm_pcrs={"sha256": {"4": "zz"}}), "not hex"),
        (policy(host_pcrs=[]), "must be an object"),
        (policy(host_pcrs={"sha256": {}}), "must be an object"),
    ],
)
def test_bad_policies(raw: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Expected.from_json(raw)


def test_policy_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        Expected.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Expected.load(bad)
    bad.write_text(json.dumps(policy(nonsense=1)))
    with pytest.raises(ConfigError, match=r"bad\.json: unknown key"):
        Expected.load(bad)


# the bundle's group (its label rule is in test_labels.py), KDFa ------------------------------


def test_group_info_errors() -> None:
    good = {"uuid": "6f1c5a52-4b8e-4d7e-9a0e-3a3d2b1c0f00", "labels": ["a:b:c"], "pcr_states": []}
    assert GroupInfo.from_json(good).labels == ("a:b:c",)
    for bad in ({**good, "uuid": "x"}, {**good, "labels": "a:b:c"}, {**good, "pcr_states": [1]}):
        with pytest.raises(VerifyError, match="bundle group"):
            GroupInfo.from_json(bad)


def test_kdfa_counter_mode() -> None:
    # KDFa is SP 800-108 counter mode over HMAC: two blocks for 512 bits of SHA-256
    key, label, u, v = b"k" * 32, b"STORAGE", b"name", b""
    out = kdfa("sha256", key, label, u, v, 512)
    blocks = [
        hmac.new(key, struct.pack(">I", i) + b"STORAGE\0" + u + struct.pack(">I", 512), "sha256")
        for i in (1, 2)
    ]
    assert out == b"".join(b.digest() for b in blocks)
    assert kdfa("sha256", key, label, u, v, 128) == kdfa("sha256", key, b"STORAGE\0", u, v, 128)
    assert len(kdfa("sha256", key, label, u, v, 12)) == 2
    assert hashes.hash_name(0x0099) == "0x0099"


def test_the_verifier_imports_no_daemon_code() -> None:
    code = (
        "import sys\n"
        "import vtpm.verify.bundle, vtpm.verify.deepquote, vtpm.verify.expected, "
        "vtpm.verify.quote, vtpm.tpm.attest, vtpm.tpm.public\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('vtpm.manager', 'vtpm.instance', "
        "'vtpm.engine', 'vtpm.cli', 'vtpm.launch', 'tpm2_pytss', 'ctypes')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == ""
