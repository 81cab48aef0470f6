"""Deep quotes: what a vTPM's identity and PCRs look like to the hardware TPM that signs them.

A deep quote binds one vTPM (uuid, group, label, selected PCR values) and a verifier's nonce to
the host's measured state through one hardware-TPM quote by the group's attestation key. The
Manager marshals each request's `DeepQuoteInfo` canonically, hashes it into a leaf of a Merkle
tree shared by all requests gathered in one batch, and signs the root:

    TPM2_Quote(AK, qualifyingData = root, PCR selection = the host PCRs asked for)

Each answer carries its DeepQuoteInfo, its inclusion path and the shared hardware quote. A lone
request's tree is one leaf: the root is its leaf hash.

DeepQuoteInfo, all integers big-endian (version 2; version 1 lacks the EK name field):

    magic "VTDQ" | u16 version (2, or 1) | u16 flags
    u16 nonce length (1..64) | nonce
    16-byte vTPM uuid | 16-byte group uuid
    u16 label length (1..256) | label (UTF-8) | 32-byte SHA-256(label)
    u16 EK name length | EK name (version 2 only): the TPM name (nameAlg || H(TPMT_PUBLIC)) of
        the vTPM's certified EK, empty when it has none; binds the quote to the EK certificate
    u16 PCR bank (TPM_ALG_ID) | u8 n (0..24) | n x (u8 PCR index | digest of the bank's size),
        indices strictly increasing
    u32 vTPM quote length | vTPM quote (TPM2B_ATTEST || TPMT_SIGNATURE from the vTPM), only
        when FLAG_VTPM_QUOTE is set

Flags: FLAG_PCRS (the PCR values are the vTPM's, read at request time), FLAG_VTPM_QUOTE (the
vTPM's own quote is included). Unknown flag bits are refused, as is anything after the end.

Building a DeepQuoteInfo or a PathStep that breaks these rules, or a tree of no leaves, raises
LocalProtocolError; `DeepQuoteInfo.unmarshal` turns any defect of peer bytes into
RemoteProtocolError. PCR banks and digest sizes are `vtpm.tpm.constants.DIGEST_SIZES`.

Merkle tree (SHA-256, domain-separated): leaf = H(0x00 || info), node = H(0x01 || left ||
right); levels are paired left to right and an odd last node is carried up unchanged. A path is
the list of (sibling side, sibling hash) from the leaf upwards.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from vtpm.errors import LocalProtocolError, RemoteProtocolError
from vtpm.tpm.constants import DIGEST_SIZES, TPM_ALG

MAGIC = b"VTDQ"
VERSION = 2
VERSIONS = (1, 2)  # version 1: no EK name (documents made before the EK binding)
FLAG_PCRS = 0x0001
FLAG_VTPM_QUOTE = 0x0002
KNOWN_FLAGS = FLAG_PCRS | FLAG_VTPM_QUOTE
MAX_NONCE = 64
MAX_LABEL = 256
MAX_VTPM_QUOTE = 8192
MAX_EK_NAME = 2 + 64  # a TPMT_HA: nameAlg and a digest of at most SHA-512's size
LEAF = b"\x00"
NODE = b"\x01"


def _h(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


@dataclass(frozen=True, slots=True)
class DeepQuoteInfo:
    nonce: bytes
    vtpm_uuid: uuid.UUID
    group_uuid: uuid.UUID
    label: str
    pcr_bank: int = TPM_ALG.SHA256
    pcrs: tuple[tuple[int, bytes], ...] = ()
    vtpm_quote: bytes = b""
    flags: int = FLAG_PCRS
    version: int = VERSION
    label_hash: bytes = field(default=b"")
    ek_name: bytes = b""

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise LocalProtocolError(f"DeepQuoteInfo version {self.version} is not 1 or 2")
        if self.ek_name and self.version < 2:
            raise LocalProtocolError("a version 1 DeepQuoteInfo carries no EK name")
        if self.ek_name and not (
            len(self.ek_name) > 2
            and DIGEST_SIZES.get(int.from_bytes(self.ek_name[:2], "big")) == len(self.ek_name) - 2
        ):
            raise LocalProtocolError("an EK name is nameAlg || a digest of that algorithm")
        if self.flags & ~KNOWN_FLAGS:
            raise LocalProtocolError(f"unknown DeepQuoteInfo flags {self.flags:#x}")
        if not 1 <= len(self.nonce) <= MAX_NONCE:
            raise LocalProtocolError(f"a nonce is 1..{MAX_NONCE} bytes, not {len(self.nonce)}")
        try:
            raw_label = self.label.encode()
        except UnicodeEncodeError:  # a ValueError: not to leave this module as one
            raise LocalProtocolError("a label must be valid Unicode") from None
        if not 1 <= len(raw_label) <= MAX_LABEL:
            raise LocalProtocolError(f"a label is 1..{MAX_LABEL} bytes")
        if not self.label_hash:
            object.__setattr__(self, "label_hash", _h(raw_label))
        elif self.label_hash != _h(raw_label):
            raise LocalProtocolError("the label hash is not SHA-256 of the label")
        size = DIGEST_SIZES.get(self.pcr_bank)
        if size is None:
            raise LocalProtocolError(f"unknown PCR bank {self.pcr_bank:#06x}")
        last = -1
        for index, value in self.pcrs:
            if not last < index <= 23:
                raise LocalProtocolError("PCR indices must increase and lie in 0..23")
            if len(value) != size:
                raise LocalProtocolError(f"PCR {index}: a digest of this bank is {size} bytes")
            last = index
        if bool(self.flags & FLAG_VTPM_QUOTE) != bool(self.vtpm_quote):
            raise LocalProtocolError("FLAG_VTPM_QUOTE is set exactly when a vTPM quote is included")
        if len(self.vtpm_quote) > MAX_VTPM_QUOTE:
            raise LocalProtocolError("the vTPM quote is too long")

    def pcr_dict(self) -> dict[int, bytes]:
        return dict(self.pcrs)

    def marshal(self) -> bytes:
        label = self.label.encode()
        out = [
            MAGIC,
            struct.pack(">HH", self.version, self.flags),
            struct.pack(">H", len(self.nonce)),
            self.nonce,
            self.vtpm_uuid.bytes,
            self.group_uuid.bytes,
            struct.pack(">H", len(label)),
            label,
            self.label_hash,
        ]
        if self.version >= 2:
            out += [struct.pack(">H", len(self.ek_name)), self.ek_name]
        out.append(struct.pack(">HB", self.pcr_bank, len(self.pcrs)))
        for index, value in self.pcrs:
            out += [struct.pack(">B", index), value]
        if self.flags & FLAG_VTPM_QUOTE:
            out += [struct.pack(">I", len(self.vtpm_quote)), self.vtpm_quote]
        return b"".join(out)

    def leaf(self) -> bytes:
        return leaf_hash(self.marshal())

    @classmethod
    def unmarshal(cls, data: bytes) -> DeepQuoteInfo:
        """Parse peer bytes; any defect is a RemoteProtocolError."""
        r = _Reader(data)
        if r.take(4) != MAGIC:
            raise RemoteProtocolError("not a DeepQuoteInfo (bad magic)")
        version, flags = r.unpack(">HH")
        nonce = r.take(r.unpack(">H")[0])
        vtpm_uuid = uuid.UUID(bytes=r.take(16))
        group_uuid = uuid.UUID(bytes=r.take(16))
        raw_label = r.take(r.unpack(">H")[0])
        label_hash = r.take(32)
        ek_name = b""
        if version >= 2:
            name_size = r.unpack(">H")[0]
            if name_size > MAX_EK_NAME:
                raise RemoteProtocolError(f"DeepQuoteInfo: an EK name of {name_size} bytes")
            ek_name = r.take(name_size)
        bank, count = r.unpack(">HB")
        size = DIGEST_SIZES.get(bank)
        if size is None:
            raise RemoteProtocolError(f"DeepQuoteInfo: unknown PCR bank {bank:#06x}")
        pcrs = []
        for _ in range(count):
            (index,) = r.unpack(">B")
            pcrs.append((index, r.take(size)))
        vtpm_quote = b""
        if flags & FLAG_VTPM_QUOTE:
            vtpm_quote = r.take(r.unpack(">I")[0])
        if r.remaining:
            raise RemoteProtocolError(f"DeepQuoteInfo: {r.remaining} bytes after the end")
        try:
            label = raw_label.decode()
            return cls(
                nonce, vtpm_uuid, group_uuid, label, bank, tuple(pcrs), vtpm_quote, flags,
                version, label_hash, ek_name,
            )  # fmt: skip
        except (UnicodeDecodeError, LocalProtocolError) as e:
            raise RemoteProtocolError(f"DeepQuoteInfo: {e}") from None


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        if n > self.remaining:
            raise RemoteProtocolError("DeepQuoteInfo is truncated")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def unpack(self, fmt: str) -> tuple[int, ...]:
        s = struct.Struct(fmt)
        return tuple(s.unpack(self.take(s.size)))


# Merkle batching ------------------------------------------------------------------------------


def leaf_hash(info: bytes) -> bytes:
    return _h(LEAF, info)


def node_hash(left: bytes, right: bytes) -> bytes:
    return _h(NODE, left, right)


@dataclass(frozen=True, slots=True)
class PathStep:
    side: str  # "L": the sibling is on the left; "R": on the right
    sibling: bytes

    def __post_init__(self) -> None:
        if self.side not in ("L", "R") or len(self.sibling) != 32:
            raise LocalProtocolError("a Merkle path step is (L|R, 32-byte hash)")


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    return merkle_tree(leaves)[-1][0]


def merkle_tree(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """All levels, leaves first, root last."""
    if not leaves:
        raise LocalProtocolError("a Merkle tree needs at least one leaf")
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        cur = levels[-1]
        nxt = [node_hash(cur[i], cur[i + 1]) for i in range(0, len(cur) - 1, 2)]
        if len(cur) % 2:
            nxt.append(cur[-1])
        levels.append(nxt)
    return levels


def merkle_path(levels: Sequence[Sequence[bytes]], index: int) -> tuple[PathStep, ...]:
    steps = []
    for level in levels[:-1]:
        sibling = index ^ 1
        if sibling < len(level):
            steps.append(PathStep("L" if sibling < index else "R", level[sibling]))
        index //= 2
    return tuple(steps)


def root_from_path(leaf: bytes, path: Sequence[PathStep]) -> bytes:
    node = leaf
    for step in path:
        node = node_hash(step.sibling, node) if step.side == "L" else node_hash(node, step.sibling)
    return node
