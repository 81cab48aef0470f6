"""No bare ValueError leaves wire/: building an invalid DeepQuoteInfo, PathStep, Merkle tree or
evidence is a LocalProtocolError; peer bytes that break the rules a RemoteProtocolError."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from vtpm.errors import LocalProtocolError, RemoteProtocolError
from vtpm.tpm.constants import TPM_ALG
from vtpm.wire.deepquote import FLAG_VTPM_QUOTE, DeepQuoteInfo, PathStep, merkle_tree
from vtpm.wire.evidence import Evidence, SignedQuote, encode_evidence

U1, U2 = uuid.UUID(int=1), uuid.UUID(int=2)


def info(**kw: object) -> DeepQuoteInfo:
    args: dict[str, object] = {
        "nonce": b"n",
        "vtpm_uuid": U1,
        "group_uuid": U2,
        "label": "a:b",
    } | kw
    return DeepQuoteInfo(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: info(version=3), "version"),
        (lambda: info(flags=0x80), "flags"),
        (lambda: info(nonce=b""), "nonce"),
        (lambda: info(nonce=bytes(65)), "nonce"),
        (lambda: info(label=""), "label"),
        (lambda: info(label="\udc80"), "Unicode"),
        (lambda: info(label_hash=bytes(32)), "label hash"),
        (lambda: info(pcr_bank=0x0012), "bank"),
        (lambda: info(pcrs=((3, bytes(32)), (3, bytes(32)))), "increase"),
        (lambda: info(pcrs=((24, bytes(32)),)), "0..23"),
        (lambda: info(pcrs=((1, bytes(20)),)), "32 bytes"),
        (lambda: info(flags=FLAG_VTPM_QUOTE | 1), "FLAG_VTPM_QUOTE"),
        (lambda: info(flags=FLAG_VTPM_QUOTE, vtpm_quote=bytes(8193)), "too long"),
        (lambda: PathStep("X", bytes(32)), "path step"),
        (lambda: PathStep("L", bytes(31)), "path step"),
        (lambda: merkle_tree([]), "one leaf"),
    ],
)
def test_construction_checks_are_local_errors(build: Callable[[], object], message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        build()


def test_the_default_bank_is_sha256() -> None:
    assert info().pcr_bank == TPM_ALG.SHA256


def test_evidence_that_does_not_fit_its_layout_is_a_local_error() -> None:
    quote = SignedQuote(b"a", b"s", {}, "sm3")
    with pytest.raises(LocalProtocolError, match="unknown bank"):
        encode_evidence(Evidence(info(), (), quote))
    big = SignedQuote(bytes(70000), b"s", {}, "sha256")
    with pytest.raises(LocalProtocolError, match="does not fit"):
        encode_evidence(Evidence(info(), (), big))


def test_a_bad_path_step_in_a_document_is_a_remote_error() -> None:
    doc = Evidence(info(), (), SignedQuote(b"a", b"s", {})).to_json()
    doc["path"] = [{"side": "X", "hash": "00" * 32}]
    with pytest.raises(RemoteProtocolError, match="path"):
        Evidence.from_json(doc)
