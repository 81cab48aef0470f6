"""DER (ITU-T X.690) encoding and splitting of the few ASN.1 values certificates need.

Why this exists: certificates are built by `cryptography` but signed by a key in the hardware
TPM, which `cryptography` cannot call. So the certificate is taken apart (its TBSCertificate and
signatureAlgorithm, byte for byte), the TBS is signed by the TPM, and the certificate is put
back together: `certificate(tbs, algorithm, signature)`. The same helpers encode the values of
extensions `cryptography` has no builder for (TCG subjectDirectoryAttributes, the vTPM identity
extension) and read them back.

Rules:
- Pure: no I/O, no crypto. Lengths are definite and minimal (DER), integers minimal two's
  complement, so what is encoded here re-parses to the same bytes.
- Reading (`split`, `elements`, `read_integer`) is for values a verifier may receive from
  anyone: any defect (truncation, an indefinite or non-minimal length, trailing bytes) raises
  one error, `VerifyError`, naming what was being read.
"""

from __future__ import annotations

from dataclasses import dataclass

from vtpm.errors import VerifyError

INTEGER = 0x02
BIT_STRING = 0x03
OCTET_STRING = 0x04
OID = 0x06
UTF8_STRING = 0x0C
SEQUENCE = 0x30
SET = 0x31

MAX_LENGTH = 1 << 24  # no value we read is anywhere near 16 MiB


@dataclass(frozen=True, slots=True)
class Tlv:
    """One DER element: its tag, its content, and the whole encoding (tag, length, content)."""

    tag: int
    content: bytes
    raw: bytes


def length(n: int) -> bytes:
    """The DER length octets of a content of `n` bytes."""
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def tlv(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + length(len(content)) + content


def sequence(*items: bytes) -> bytes:
    return tlv(SEQUENCE, b"".join(items))


def set_of(*items: bytes) -> bytes:
    """A SET OF: DER orders the encoded elements."""
    return tlv(SET, b"".join(sorted(items)))


def integer(value: int) -> bytes:
    """A minimal two's-complement INTEGER."""
    size = value.bit_length() // 8 + 1  # room for the sign bit
    return tlv(INTEGER, value.to_bytes(size, "big", signed=True))


def bit_string(data: bytes) -> bytes:
    """A BIT STRING of whole octets (no unused bits), as signatures and keys are."""
    return tlv(BIT_STRING, b"\x00" + data)


def octet_string(data: bytes) -> bytes:
    return tlv(OCTET_STRING, data)


def utf8_string(text: str) -> bytes:
    return tlv(UTF8_STRING, text.encode())


def oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER from its dotted form ("2.23.133.8.1")."""
    try:
        arcs = [int(a) for a in dotted.split(".")]
    except ValueError:
        raise ValueError(f"{dotted!r} is not a dotted OID") from None
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39) or min(arcs) < 0:
        raise ValueError(f"{dotted!r} is not a valid OID")
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk, rest = [arc & 0x7F], arc >> 7
        while rest:
            chunk.append(0x80 | (rest & 0x7F))
            rest >>= 7
        out += bytes(reversed(chunk))
    return tlv(OID, bytes(out))


def ecdsa_signature(r: int, s: int) -> bytes:
    """Ecdsa-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER } (RFC 5480 / X9.62)."""
    return sequence(integer(r), integer(s))


def certificate(tbs: bytes, algorithm: bytes, signature: bytes) -> bytes:
    """Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING }
    (RFC 5280 4.1), from the encoded TBS and AlgorithmIdentifier and the signature's bytes."""
    return sequence(tbs, algorithm, bit_string(signature))


# reading --------------------------------------------------------------------------------------


def _read(data: bytes, pos: int, what: str) -> tuple[Tlv, int]:
    if pos + 2 > len(data):
        raise VerifyError(f"{what}: DER truncated at offset {pos}")
    tag, first = data[pos], data[pos + 1]
    if tag & 0x1F == 0x1F:
        raise VerifyError(f"{what}: multi-byte DER tags are not used here (offset {pos})")
    start = pos + 2
    if first < 0x80:
        size = first
    else:
        n = first & 0x7F
        if n == 0 or n > 3:
            raise VerifyError(f"{what}: DER length form not allowed at offset {pos}")
        if start + n > len(data):
            raise VerifyError(f"{what}: DER truncated at offset {pos}")
        size = int.from_bytes(data[start : start + n], "big")
        if size < 0x80 or data[start] == 0:
            raise VerifyError(f"{what}: DER length not minimal at offset {pos}")
        start += n
    if size > MAX_LENGTH or start + size > len(data):
        raise VerifyError(f"{what}: DER value runs past the end at offset {pos}")
    end = start + size
    return Tlv(tag, data[start:end], data[pos:end]), end


def split(data: bytes, what: str) -> Tlv:
    """`data` as exactly one DER element."""
    value, end = _read(data, 0, what)
    if end != len(data):
        raise VerifyError(f"{what}: {len(data) - end} byte(s) after the DER value")
    return value


def elements(content: bytes, what: str) -> list[Tlv]:
    """The elements of a constructed value's content (a SEQUENCE's or SET's)."""
    out, pos = [], 0
    while pos < len(content):
        value, pos = _read(content, pos, what)
        out.append(value)
    return out


def expect(value: Tlv, tag: int, what: str) -> bytes:
    """`value`'s content, after checking it has `tag`."""
    if value.tag != tag:
        raise VerifyError(f"{what}: DER tag 0x{value.tag:02x}, expected 0x{tag:02x}")
    return value.content


def read_integer(value: Tlv, what: str) -> int:
    content = expect(value, INTEGER, what)
    if not content:
        raise VerifyError(f"{what}: empty INTEGER")
    if len(content) > 1 and (content[0], content[1] >> 7) in ((0, 0), (0xFF, 1)):
        raise VerifyError(f"{what}: INTEGER not minimal")
    return int.from_bytes(content, "big", signed=True)


def read_utf8(value: Tlv, what: str) -> str:
    try:
        return expect(value, UTF8_STRING, what).decode()
    except UnicodeDecodeError:
        raise VerifyError(f"{what}: not UTF-8") from None


def certificate_parts(cert: bytes, what: str = "certificate") -> tuple[bytes, bytes, bytes]:
    """The encoded tbsCertificate and signatureAlgorithm of a certificate, and its signature's
    bytes (the BIT STRING's content without the unused-bits octet)."""
    outer = expect(split(cert, what), SEQUENCE, what)
    parts = elements(outer, what)
    if len(parts) != 3:
        raise VerifyError(f"{what}: a certificate has three parts, not {len(parts)}")
    tbs, algorithm, sig = parts
    expect(tbs, SEQUENCE, f"{what} tbsCertificate")
    expect(algorithm, SEQUENCE, f"{what} signatureAlgorithm")
    bits = expect(sig, BIT_STRING, f"{what} signature")
    if not bits or bits[0] != 0:
        raise VerifyError(f"{what}: the signature BIT STRING has unused bits")
    return tbs.raw, algorithm.raw, bits[1:]
