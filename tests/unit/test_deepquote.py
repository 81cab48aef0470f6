"""DeepQuoteInfo bytes, Merkle paths, the compact evidence form and the vendor command."""

from __future__ import annotations

import contextlib
import hashlib
import struct
import uuid
from dataclasses import replace as dataclass_replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtpm.errors import LocalProtocolError, RemoteProtocolError
from vtpm.instance import vendor
from vtpm.wire.deepquote import (
    FLAG_PCRS,
    DeepQuoteInfo,
    PathStep,
    leaf_hash,
    merkle_path,
    merkle_root,
    merkle_tree,
    node_hash,
    root_from_path,
)
from vtpm.wire.evidence import Evidence, SignedQuote, decode_evidence, encode_evidence

INFO = DeepQuoteInfo(
    b"\x01\x02", uuid.UUID(int=1), uuid.UUID(int=2), "a:b:c", 0x000B, ((3, b"\x33" * 32),),
    version=1,
)  # fmt: skip
INFO_HEX = (
    "56544451"  # VTDQ
    "0001" "0001"  # version, flags (PCRS)
    "0002" "0102"  # nonce
    + "00" * 15 + "01"  # vTPM uuid
    + "00" * 15 + "02"  # group uuid
    + "0005" "613a623a63"  # label
    + hashlib.sha256(b"a:b:c").hexdigest()
    + "000b" "01" "03" + "33" * 32
)  # fmt: skip


def test_info_exact_bytes_both_ways() -> None:
    assert INFO.marshal().hex() == INFO_HEX
    assert DeepQuoteInfo.unmarshal(bytes.fromhex(INFO_HEX)) == INFO
    assert INFO.flags == FLAG_PCRS
    assert INFO.leaf() == hashlib.sha256(b"\x00" + bytes.fromhex(INFO_HEX)).digest()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"XTDQ" + b[4:], "magic"),
        (lambda b: b[:-1], "truncated"),
        (lambda b: b + b"\x00", "after the end"),
        (lambda b: b[:6] + b"\x00\x80" + b[8:], "flags"),
        (lambda b: b[:-35] + b"\x00\x0c" + b[-33:], "bank"),
    ],
)
def test_bad_info_bytes(mutate: object, message: str) -> None:
    data = mutate(bytes.fromhex(INFO_HEX))  # type: ignore[operator]
    with pytest.raises(RemoteProtocolError, match=message):
        DeepQuoteInfo.unmarshal(data)


def test_label_hash_must_match() -> None:
    raw = bytearray.fromhex(INFO_HEX)
    raw[49] ^= 1  # inside the label hash
    with pytest.raises(RemoteProtocolError, match="label hash"):
        DeepQuoteInfo.unmarshal(bytes(raw))


EK_NAME = b"\x00\x0b" + b"\xee" * 32
INFO_V2 = DeepQuoteInfo(
    b"\x01\x02", uuid.UUID(int=1), uuid.UUID(int=2), "a:b:c", 0x000B, ((3, b"\x33" * 32),),
    ek_name=EK_NAME,
)  # fmt: skip
INFO_V2_HEX = (
    "56544451"
    "0002" "0001"  # version 2, flags (PCRS)
    "0002" "0102"
    + "00" * 15 + "01"
    + "00" * 15 + "02"
    + "0005" "613a623a63"
    + hashlib.sha256(b"a:b:c").hexdigest()
    + "0022" "000b" + "ee" * 32  # EK name: nameAlg SHA-256 || digest
    + "000b" "01" "03" + "33" * 32
)  # fmt: skip


def test_info_version_2_carries_the_ek_name() -> None:
    assert INFO_V2.version == 2
    assert INFO_V2.marshal().hex() == INFO_V2_HEX
    back = DeepQuoteInfo.unmarshal(bytes.fromhex(INFO_V2_HEX))
    assert back == INFO_V2 and back.ek_name == EK_NAME
    # the EK name is signed: it is in the leaf
    assert INFO_V2.leaf() != dataclass_replace(INFO_V2, ek_name=b"\x00\x0b" + b"\xef" * 32).leaf()


def test_info_version_2_without_ek_and_version_1_still_parsed() -> None:
    no_ek = dataclass_replace(INFO_V2, ek_name=b"")
    assert DeepQuoteInfo.unmarshal(no_ek.marshal()) == no_ek
    v1 = DeepQuoteInfo.unmarshal(bytes.fromhex(INFO_HEX))
    assert v1.version == 1 and v1.ek_name == b""
    assert v1.marshal().hex() == INFO_HEX  # re-marshals as the version-1 bytes it was


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 1}, "version 1"),
        ({"version": 3}, "version"),
        ({"ek_name": b"\x00\x0b" + b"\xee" * 31}, "EK name"),
        ({"ek_name": b"\x12\x34" + b"\xee" * 32}, "EK name"),
    ],
)
def test_bad_ek_name_or_version_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message):
        dataclass_replace(INFO_V2, **change)  # type: ignore[arg-type]


def test_bad_v2_bytes() -> None:
    raw = bytearray.fromhex(INFO_V2_HEX)
    raw[83:85] = b"\x00\x50"  # EK name length beyond any name (offset: after the label hash)
    with pytest.raises(RemoteProtocolError, match="EK name"):
        DeepQuoteInfo.unmarshal(bytes(raw))
    raw = bytearray.fromhex(INFO_V2_HEX)
    raw[85] = 0x99  # a nameAlg that is no hash
    with pytest.raises(RemoteProtocolError, match="EK name"):
        DeepQuoteInfo.unmarshal(bytes(raw))


@given(st.binary(max_size=300))
def test_garbage_raises_only_the_remote_error(data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        DeepQuoteInfo.unmarshal(data)
    with contextlib.suppress(RemoteProtocolError):
        decode_evidence(data)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 256, 257])
def test_every_leaf_proves_the_root(n: int) -> None:
    leaves = [leaf_hash(struct.pack(">I", i)) for i in range(n)]
    levels = merkle_tree(leaves)
    root = levels[-1][0]
    assert root == merkle_root(leaves)
    for i in (0, n // 2, n - 1):
        path = merkle_path(levels, i)
        assert root_from_path(leaves[i], path) == root
        assert len(path) <= max(1, (n - 1).bit_length())
        if path:  # any changed node breaks it
            bad = (PathStep(path[0].side, bytes(32)), *path[1:])
            assert root_from_path(leaves[i], bad) != root


def test_two_leaves_by_hand() -> None:
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert merkle_root([a, b]) == hashlib.sha256(b"\x01" + a + b).digest() == node_hash(a, b)
    assert merkle_root([a]) == a  # a lone request's root is its leaf


def test_compact_evidence_round_trip() -> None:
    ev = Evidence(
        INFO,
        (PathStep("L", b"\x11" * 32), PathStep("R", b"\x22" * 32)),
        SignedQuote(b"attest", b"sig", {0: b"\x00" * 32, 7: b"\x07" * 32}),
        3,
    )
    data = encode_evidence(ev)
    assert decode_evidence(data) == ev
    assert Evidence.from_json(ev.to_json()) == ev
    for cut in range(len(data)):
        with pytest.raises(RemoteProtocolError):
            decode_evidence(data[:cut])


def test_vendor_command_layout() -> None:
    cmd = vendor.command(b"\xaa\xbb", [0, 7], [4, 5])
    assert cmd.hex() == "800100000016200001010002aabb0000008100000030"
    assert vendor.is_deep_quote(cmd)


def test_vendor_command_refusals() -> None:
    def no_engine(_: bytes) -> bytes:
        raise AssertionError("not reached")

    def rc(resp: bytes) -> int:
        return int(struct.unpack_from(">I", resp, 6)[0])

    good = vendor.command(b"\x01", [], [])
    assert rc(vendor.handle(good, no_engine, None)) == 0x143  # no Manager: unknown command
    for bad in (good[:-1], good + b"\x00", vendor.command(b"", [], []), good[:11]):
        assert rc(vendor.handle(bad, no_engine, lambda *a: b"")) == vendor.TPM_RC_SIZE
    over = good[:-8] + struct.pack(">II", 1 << 24, 0)
    assert rc(vendor.handle(over, no_engine, lambda *a: b"")) == vendor.TPM_RC_SIZE
