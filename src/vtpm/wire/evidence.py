"""The documents a verifier receives: a group's provisioning bundle and deep-quote evidence.

Both are UTF-8 JSON with a `format` field; binary values are lowercase hex. They are produced by
the Manager and read by `vtpm.verify`, which trusts nothing in them until checked.

Provisioning bundle ("vtpm-group-bundle/1"):
    group:  {uuid, name, seq, labels: [..], pcr_states: [{pcrs, values}], owner_pub: PEM}
    ak:     {alg: "ecc"|"rsa", public: TPM2B_PUBLIC, name, qualified_name}
    ek:     {public: TPM2B_PUBLIC, certificate: DER or null}
    config_quote: {attest: TPMS_ATTEST, signature: TPMT_SIGNATURE, pcr_bank: "sha256",
                   pcrs: {"0": hex, ..}}  -- a TPM2_Quote by the AK whose extraData is
                   config_digest(group), the SHA-256 of the group object's canonical JSON
    manager: {uuid}
    ca:     {public: TPM2B_PUBLIC, certificate: DER, certify_attest: TPMS_ATTEST,
             certify_signature: TPMT_SIGNATURE} or null  -- the group CA (`vtpm.manager.ca`):
             its key in the hardware TPM, its self-signed certificate, and TPM2_Certify of the
             key by the AK with qualifyingData = SHA-256(certificate). null (or absent, in
             bundles from before it) for a group without a CA.

Deep-quote evidence ("vtpm-deep-quote/1"):
    info: DeepQuoteInfo (see `vtpm.wire.deepquote`), path: [{side: "L"|"R", hash}],
    host: {attest: TPMS_ATTEST, signature: TPMT_SIGNATURE, pcr_bank: "sha256",
           pcrs: {"16": hex, ..}}, batch_size: n (how many requests shared the quote)
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from vtpm.errors import LocalProtocolError, RemoteProtocolError
from vtpm.tpm.constants import DIGEST_SIZES, HASH_NAMES
from vtpm.wire.deepquote import DeepQuoteInfo, PathStep

BUNDLE_FORMAT = "vtpm-group-bundle/1"
EVIDENCE_FORMAT = "vtpm-deep-quote/1"


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def config_digest(group: dict[str, Any]) -> bytes:
    """What the AK's configuration quote carries as extraData."""
    return hashlib.sha256(canonical(group)).digest()


def _hex(raw: object, what: str) -> bytes:
    if not isinstance(raw, str):
        raise RemoteProtocolError(f"{what} must be a hex string")
    try:
        return bytes.fromhex(raw)
    except ValueError:
        raise RemoteProtocolError(f"{what} is not hex") from None


def _obj(raw: object, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise RemoteProtocolError(f"{what} must be an object")
    return raw


def _pcrs(raw: object, what: str) -> dict[int, bytes]:
    out = {}
    for k, v in _obj(raw, what).items():
        try:
            idx = int(k)
        except ValueError:
            raise RemoteProtocolError(f"{what}: {k!r} is not a PCR index") from None
        out[idx] = _hex(v, f"{what}[{k}]")
    return out


@dataclass(frozen=True, slots=True)
class SignedQuote:
    """A TPM2_Quote as the TPM returned it, with the PCR values the quote claims to cover."""

    attest: bytes  # TPMS_ATTEST, marshalled
    signature: bytes  # TPMT_SIGNATURE, marshalled
    pcrs: dict[int, bytes]
    pcr_bank: str = "sha256"

    def to_json(self) -> dict[str, Any]:
        return {
            "attest": self.attest.hex(),
            "signature": self.signature.hex(),
            "pcr_bank": self.pcr_bank,
            "pcrs": {str(k): v.hex() for k, v in sorted(self.pcrs.items())},
        }

    @classmethod
    def from_json(cls, raw: object, what: str) -> SignedQuote:
        d = _obj(raw, what)
        bank = d.get("pcr_bank", "sha256")
        if not isinstance(bank, str):
            raise RemoteProtocolError(f"{what}.pcr_bank must be a string")
        return cls(
            _hex(d.get("attest"), f"{what}.attest"),
            _hex(d.get("signature"), f"{what}.signature"),
            _pcrs(d.get("pcrs", {}), f"{what}.pcrs"),
            bank,
        )


@dataclass(frozen=True, slots=True)
class Bundle:
    group: dict[str, Any]
    ak_alg: str
    ak_public: bytes  # TPM2B_PUBLIC
    ak_name: bytes
    ak_qualified_name: bytes
    ek_public: bytes  # TPM2B_PUBLIC
    ek_certificate: bytes | None
    config_quote: SignedQuote
    manager_uuid: str
    ca_public: bytes | None = None  # TPM2B_PUBLIC of the group CA key
    ca_certificate: bytes | None = None  # DER, self-signed
    ca_certify_attest: bytes | None = None  # TPMS_ATTEST of TPM2_Certify by the AK
    ca_certify_signature: bytes | None = None  # TPMT_SIGNATURE

    def __post_init__(self) -> None:
        parts = (self.ca_public, self.ca_certificate, self.ca_certify_attest)
        given = [p is not None for p in (*parts, self.ca_certify_signature)]
        if any(given) and not all(given):
            raise LocalProtocolError("a bundle's CA has all four parts or none")

    def _ca_json(self) -> dict[str, str] | None:
        if self.ca_public is None:
            return None
        return {
            "public": self.ca_public.hex(),
            "certificate": (self.ca_certificate or b"").hex(),
            "certify_attest": (self.ca_certify_attest or b"").hex(),
            "certify_signature": (self.ca_certify_signature or b"").hex(),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "format": BUNDLE_FORMAT,
            "group": self.group,
            "ak": {
                "alg": self.ak_alg,
                "public": self.ak_public.hex(),
                "name": self.ak_name.hex(),
                "qualified_name": self.ak_qualified_name.hex(),
            },
            "ek": {
                "public": self.ek_public.hex(),
                "certificate": None if self.ek_certificate is None else self.ek_certificate.hex(),
            },
            "config_quote": self.config_quote.to_json(),
            "manager": {"uuid": self.manager_uuid},
            "ca": self._ca_json(),
        }

    @classmethod
    def from_json(cls, raw: object) -> Bundle:
        d = _obj(raw, "bundle")
        if d.get("format") != BUNDLE_FORMAT:
            raise RemoteProtocolError(f"not a {BUNDLE_FORMAT} document")
        ak = _obj(d.get("ak"), "ak")
        ek = _obj(d.get("ek"), "ek")
        cert = ek.get("certificate")
        alg = ak.get("alg")
        if alg not in ("ecc", "rsa"):
            raise RemoteProtocolError("ak.alg must be ecc or rsa")
        return cls(
            group=_obj(d.get("group"), "group"),
            ak_alg=str(alg),
            ak_public=_hex(ak.get("public"), "ak.public"),
            ak_name=_hex(ak.get("name"), "ak.name"),
            ak_qualified_name=_hex(ak.get("qualified_name"), "ak.qualified_name"),
            ek_public=_hex(ek.get("public"), "ek.public"),
            ek_certificate=None if cert is None else _hex(cert, "ek.certificate"),
            config_quote=SignedQuote.from_json(d.get("config_quote"), "config_quote"),
            manager_uuid=str(_obj(d.get("manager", {}), "manager").get("uuid", "")),
            **_ca_fields(d.get("ca")),
        )


def _ca_fields(raw: object) -> dict[str, bytes | None]:
    if raw is None:
        return {}
    ca = _obj(raw, "ca")
    keys = ("public", "certificate", "certify_attest", "certify_signature")
    return {f"ca_{k}": _hex(ca.get(k), f"ca.{k}") for k in keys}


@dataclass(frozen=True, slots=True)
class Evidence:
    info: DeepQuoteInfo
    path: tuple[PathStep, ...]
    host: SignedQuote
    batch_size: int = 1

    def to_json(self) -> dict[str, Any]:
        return {
            "format": EVIDENCE_FORMAT,
            "info": self.info.marshal().hex(),
            "path": [{"side": s.side, "hash": s.sibling.hex()} for s in self.path],
            "host": self.host.to_json(),
            "batch_size": self.batch_size,
        }

    @classmethod
    def from_json(cls, raw: object) -> Evidence:
        d = _obj(raw, "evidence")
        if d.get("format") != EVIDENCE_FORMAT:
            raise RemoteProtocolError(f"not a {EVIDENCE_FORMAT} document")
        steps = d.get("path", [])
        if not isinstance(steps, list):
            raise RemoteProtocolError("path must be a list")
        try:
            path = tuple(
                PathStep(str(_obj(s, "path step").get("side")), _hex(s.get("hash"), "path hash"))
                for s in steps
            )
        except LocalProtocolError as e:
            raise RemoteProtocolError(f"path: {e}") from None
        batch = d.get("batch_size", 1)
        return cls(
            DeepQuoteInfo.unmarshal(_hex(d.get("info"), "info")),
            path,
            SignedQuote.from_json(d.get("host"), "host"),
            batch if isinstance(batch, int) else 1,
        )


# compact binary form: what travels inside a TPM response (the guest's vendor command) ----------
#   u32 info length | info | u8 n | n x (u8 side 0=L 1=R | 32-byte hash) |
#   u16 attest length | attest | u16 signature length | signature |
#   u16 bank | u8 n | n x (u8 index | digest) | u16 batch size

_BANK_IDS = {name: alg for alg, name in HASH_NAMES.items()}


def encode_evidence(ev: Evidence) -> bytes:
    """The compact binary form; LocalProtocolError if `ev` does not fit it."""
    bank = _BANK_IDS.get(ev.host.pcr_bank)
    if bank is None:
        raise LocalProtocolError(f"deep-quote evidence: unknown bank {ev.host.pcr_bank!r}")
    try:
        return _encode(ev, bank)
    except struct.error as e:  # a length or count beyond its field
        raise LocalProtocolError(f"deep-quote evidence does not fit its layout: {e}") from None


def _encode(ev: Evidence, bank: int) -> bytes:
    info = ev.info.marshal()
    out = [struct.pack(">I", len(info)), info, struct.pack(">B", len(ev.path))]
    out += [struct.pack(">B", s.side == "R") + s.sibling for s in ev.path]
    q = ev.host
    out += [struct.pack(">H", len(q.attest)), q.attest, struct.pack(">H", len(q.signature))]
    out += [q.signature, struct.pack(">HB", bank, len(q.pcrs))]
    out += [struct.pack(">B", i) + v for i, v in sorted(q.pcrs.items())]
    out.append(struct.pack(">H", ev.batch_size))
    return b"".join(out)


def decode_evidence(data: bytes) -> Evidence:
    """Parse peer bytes; any defect is a RemoteProtocolError."""
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise RemoteProtocolError("deep-quote evidence is truncated")
        pos += n
        return data[pos - n : pos]

    def u(fmt: str) -> int:
        s = struct.Struct(fmt)
        return int(s.unpack(take(s.size))[0])

    info = DeepQuoteInfo.unmarshal(take(u(">I")))
    path = []
    for _ in range(u(">B")):
        side = take(1)[0]
        if side > 1:
            raise RemoteProtocolError("deep-quote evidence: bad path side")
        path.append(PathStep("R" if side else "L", take(32)))
    attest = take(u(">H"))
    signature = take(u(">H"))
    bank = u(">H")
    size = DIGEST_SIZES.get(bank)
    if size is None:
        raise RemoteProtocolError(f"deep-quote evidence: unknown bank {bank:#06x}")
    pcrs = {}
    for _ in range(u(">B")):
        idx = take(1)[0]
        pcrs[idx] = take(size)
    batch = u(">H")
    if pos != len(data):
        raise RemoteProtocolError("deep-quote evidence: bytes after the end")
    return Evidence(
        info, tuple(path), SignedQuote(attest, signature, pcrs, HASH_NAMES[bank]), batch
    )
