"""Verify one TPM2_Quote: the signed TPMS_ATTEST, its TPMT_SIGNATURE, the AK and the PCR values.

Each check has a stable id and says what differed when it fails:

    quote.signature      the signature over the attestation is valid with the AK's public key
    quote.ak             the AK is a restricted, non-decrypting signing key fixed to its TPM
                         (a key that can sign arbitrary data could forge any attestation)
    quote.magic          TPMS_ATTEST.magic is TPM_GENERATED_VALUE (0xff544347): the TPM made it
    quote.type           TPMS_ATTEST.type is TPM_ST_ATTEST_QUOTE (0x8018)
    quote.signer         qualifiedSigner is the AK's expected qualified name
    quote.nonce          extraData is the expected qualifying data (only when one is expected)
    quote.pcr_selection  the signed PCR selection is exactly the bank and indices of the PCR
                         values supplied: nothing missing, nothing extra, no other bank
    quote.pcr_digest     the signed pcrDigest is the hash of the supplied values, index order
    quote.clock          against an earlier quote by the same AK (only when one is given): the
                         clock did not go back in the same boot, and it is not that quote

The checks are independent: one tampered field fails its own check. Digest and selection are
judged separately on purpose: a quote over PCR 23 whose value is presented as PCR 10 has a
matching digest, and only the selection check catches it (CVE-2024-29039 class; keylime's
checkquote compares the digest alone).

Clock: resetCount and restartCount of a key outside the endorsement and platform hierarchies
are obfuscated by adding a per-key constant (Part 1, 36.7), so they are compared as 32-bit
differences, which the constant does not change; quotes by different keys are not comparable.
Malformed bytes raise `VerifyError` (from `vtpm.tpm.attest` and `vtpm.tpm.public`); a verdict is
only ever given on structures that parsed.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from vtpm.errors import VerifyError
from vtpm.tpm.attest import (
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST,
    Attest,
    Signature,
    parse_attest,
    parse_signature,
)
from vtpm.tpm.constants import TPM_ALG, TPMA_OBJECT
from vtpm.tpm.hashes import HASH_BY_NAME, HASHES, hash_name
from vtpm.tpm.public import PublicKey, TpmPublic
from vtpm.verify.verdict import Check, Verdict

# Hierarchy handles: the parent "qualified name" of a primary key (Part 1, 16.6).
HIERARCHIES = {
    "owner": 0x40000001,
    "null": 0x40000007,
    "endorsement": 0x4000000B,
    "platform": 0x4000000C,
}
AK_REQUIRED = (
    TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
)
AK_FORBIDDEN = TPMA_OBJECT.DECRYPT
_HALF = 1 << 31

Ak = TpmPublic | PublicKey  # a parsed TPM2B_PUBLIC, or a bare key (PEM): no attributes, no name


def bank_alg(bank: str) -> int:
    """TPM_ALG_ID of a PCR bank name ("sha256"); VerifyError for an unknown bank."""
    info = HASH_BY_NAME.get(bank.lower()) if isinstance(bank, str) else None
    if info is None:
        raise VerifyError(f"unknown PCR bank {bank!r} (expected sha1, sha256, sha384 or sha512)")
    return info.alg


def _hex(data: bytes, limit: int = 72) -> str:
    text = data.hex()
    return text if len(text) <= limit else f"{text[:limit]}... ({len(data)} bytes)"


def _fmt_selection(bank: str, indices: Sequence[int]) -> str:
    return f"{bank}:{','.join(map(str, sorted(indices))) or '(none)'}"


def _key_of(ak: Ak) -> PublicKey:
    return ak.key if isinstance(ak, TpmPublic) else ak


# individual checks ---------------------------------------------------------------------------


def signature_problem(key: PublicKey, sig: Signature, message: bytes) -> str:
    """Why `sig` is not a valid signature of `message` by `key`; "" when it is."""
    info = HASHES.get(sig.hash_alg)
    if sig.sig_alg == TPM_ALG.NULL:
        return "the attestation is not signed (TPM_ALG_NULL)"
    if info is None:
        return f"signature hash {hash_name(sig.hash_alg)} is not supported"
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            if sig.sig_alg != TPM_ALG.ECDSA:
                return f"a {sig.scheme} signature cannot come from an ECC ECDSA key"
            if not (0 < sig.r < 1 << 528 and 0 < sig.s < 1 << 528):
                return "ECDSA r or s is out of range"
            key.verify(encode_dss_signature(sig.r, sig.s), message, ec.ECDSA(info.new()))
        elif isinstance(key, rsa.RSAPublicKey):
            if sig.sig_alg == TPM_ALG.RSASSA:
                key.verify(sig.rsa, message, padding.PKCS1v15(), info.new())
            elif sig.sig_alg == TPM_ALG.RSAPSS:
                pss = padding.PSS(padding.MGF1(info.new()), padding.PSS.AUTO)
                key.verify(sig.rsa, message, pss, info.new())
            else:
                return f"a {sig.scheme} signature cannot come from an RSA key"
        else:  # pragma: no cover - the types above are all `Ak` allows
            return f"unsupported key type {type(key).__name__}"
    except InvalidSignature:
        return f"the {sig.scheme} signature does not verify with the AK's public key"
    return ""


def check_signature(ak: Ak, attest_bytes: bytes, sig: Signature) -> Check:
    problem = signature_problem(_key_of(ak), sig, attest_bytes)
    return Check("quote.signature", not problem, problem or f"{sig.scheme} signature valid")


def ak_problem(ak: Ak) -> str:
    """Why `ak` is not an attestation key; "" when it is one."""
    if not isinstance(ak, TpmPublic):
        return (
            "the AK was given as a bare public key: its TPM attributes (restricted, fixedTPM) "
            "cannot be checked; give its TPM2B_PUBLIC"
        )
    lacking = AK_REQUIRED & ~ak.attributes
    extra = AK_FORBIDDEN & ak.attributes
    if not lacking and not extra:
        return ""
    missing = [f.name or "" for f in TPMA_OBJECT if f & lacking]
    present = [f.name or "" for f in TPMA_OBJECT if f & extra]
    problems = []
    if missing:
        problems.append("lacks " + ", ".join(m.lower() for m in missing))
    if present:
        problems.append("has " + ", ".join(p.lower() for p in present))
    if problems:
        return f"the AK ({ak.description}) is not a restricted signing key: {'; '.join(problems)}"
    return ""


def check_ak(ak: Ak) -> Check:
    problem = ak_problem(ak)
    if problem:
        return Check("quote.ak", False, problem)
    assert isinstance(ak, TpmPublic)
    return Check("quote.ak", True, f"{ak.description} restricted signing key")


def check_magic(att: Attest) -> Check:
    ok = att.magic == TPM_GENERATED_VALUE
    reason = (
        "magic is TPM_GENERATED_VALUE"
        if ok
        else f"magic is {att.magic:#010x}, not TPM_GENERATED_VALUE {TPM_GENERATED_VALUE:#010x}"
        " (not made by a TPM)"
    )
    return Check("quote.magic", ok, reason)


def check_type(att: Attest) -> Check:
    ok = att.type == TPM_ST_ATTEST.QUOTE
    if ok:
        return Check("quote.type", True, "type is TPM_ST_ATTEST_QUOTE")
    try:
        kind = f"TPM_ST_ATTEST_{TPM_ST_ATTEST(att.type).name}"
    except ValueError:
        kind = "unknown"
    return Check("quote.type", False, f"type is {att.type:#06x} ({kind}), not a quote (0x8018)")


def check_signer(att: Attest, ak: Ak, qualified_name: bytes | None) -> Check:
    got = att.qualified_signer
    if qualified_name is not None:
        ok = hmac.compare_digest(got, qualified_name)
        reason = (
            "qualifiedSigner is the AK's qualified name"
            if ok
            else f"qualifiedSigner is {_hex(got)}, expected the AK's {_hex(qualified_name)}"
        )
        return Check("quote.signer", ok, reason)
    if not isinstance(ak, TpmPublic):
        return Check(
            "quote.signer",
            False,
            f"qualifiedSigner is {_hex(got)}; the AK's name is unknown (bare key) and no "
            "qualified name was given",
        )
    if got == ak.name:
        return Check("quote.signer", True, "qualifiedSigner is the AK's name")
    for hierarchy, handle in HIERARCHIES.items():
        if got == ak.qualified_name(handle.to_bytes(4, "big")):
            why = f"qualifiedSigner is the AK's as a primary of the {hierarchy} hierarchy"
            return Check("quote.signer", True, why)
    return Check(
        "quote.signer",
        False,
        f"qualifiedSigner is {_hex(got)}: neither the AK's name {_hex(ak.name)} nor its "
        "qualified name as a primary key; give the AK's qualified name (TPM2_ReadPublic, "
        "tpm2_createak -q) to check a key with a parent",
    )


def check_nonce(att: Attest, nonce: bytes) -> Check:
    ok = hmac.compare_digest(att.extra_data, nonce)
    reason = (
        "extraData is the expected qualifying data"
        if ok
        else f"extraData is {_hex(att.extra_data) or '(empty)'}, expected {_hex(nonce)}"
    )
    return Check("quote.nonce", ok, reason)


def check_pcr_selection(att: Attest, pcrs: Mapping[int, bytes], bank: str) -> Check:
    if att.pcr_select is None:
        why = f"the attestation (type {att.type:#06x}) carries no PCR selection"
        return Check("quote.pcr_selection", False, why)
    alg = bank_alg(bank)
    signed: list[tuple[int, int]] = []
    for sel in att.pcr_select:
        signed += [(sel.hash_alg, i) for i in sel.indices]
    signed_text = " ".join(str(s) for s in att.pcr_select if s.indices) or "(nothing)"
    supplied = {(alg, i) for i in pcrs}
    supplied_text = _fmt_selection(bank, list(pcrs))
    if len(set(signed)) != len(signed):
        return Check(
            "quote.pcr_selection", False, f"the signed selection {signed_text} repeats a bank"
        )
    if set(signed) == supplied and supplied:
        return Check("quote.pcr_selection", True, f"signed selection is {signed_text}")
    unsigned = sorted(i for a, i in supplied - set(signed))
    missing = sorted(set(signed) - supplied)
    details = []
    if unsigned:
        details.append(f"supplied but not signed: {_fmt_selection(bank, unsigned)}")
    if missing:
        details.append(
            "signed but not supplied: " + " ".join(f"{hash_name(a)}:{i}" for a, i in missing)
        )
    if not supplied and not signed:
        details.append("no PCRs at all")
    return Check(
        "quote.pcr_selection",
        False,
        f"signed selection {signed_text} is not the supplied {supplied_text} "
        f"({'; '.join(details)})",
    )


def check_pcr_digest(att: Attest, pcrs: Mapping[int, bytes]) -> Check:
    signed = att.pcr_digest
    if signed is None:
        why = f"the attestation (type {att.type:#06x}) carries no PCR digest"
        return Check("quote.pcr_digest", False, why)
    by_size = {h.size: h for h in HASHES.values()}
    info = by_size.get(len(signed))
    if info is None:
        return Check("quote.pcr_digest", False, f"pcrDigest of {len(signed)} bytes: unknown hash")
    computed = info.digest(*(pcrs[i] for i in sorted(pcrs)))
    ok = hmac.compare_digest(computed, signed)
    reason = (
        f"pcrDigest ({info.name}) matches the supplied values"
        if ok
        else f"signed pcrDigest is {_hex(signed)}; the supplied values hash to {_hex(computed)}"
    )
    return Check("quote.pcr_digest", ok, reason)


def clock_problem(att: Attest, prev: Attest) -> str:
    """Why `att` cannot come after `prev` from the same TPM and key; "" when it can."""
    if att.qualified_signer != prev.qualified_signer:
        return "the earlier quote is by another signer: clocks are not comparable"
    now, then = att.clock_info, prev.clock_info
    resets = (now.reset_count - then.reset_count) % (1 << 32)
    if resets >= _HALF:
        return f"resetCount went back by {(1 << 32) - resets} (replay of an older quote?)"
    if resets:
        return ""  # a TPM reset since: the clock may have lost unsaved time
    restarts = (now.restart_count - then.restart_count) % (1 << 32)
    if restarts >= _HALF:
        return f"restartCount went back by {(1 << 32) - restarts} (replay of an older quote?)"
    if now.clock < then.clock:
        return (
            f"clock {now.clock} ms is before the earlier quote's {then.clock} ms in the same "
            "boot (replay of an older quote?)"
        )
    if now.clock == then.clock and att == prev:
        return "this is the earlier quote itself (replay?)"
    return ""  # an equal clock: two different quotes within the clock's millisecond


def check_clock(att: Attest, prev: Attest) -> Check:
    problem = clock_problem(att, prev)
    if problem:
        return Check("quote.clock", False, problem)
    delta = att.clock_info.clock - prev.clock_info.clock
    if att.clock_info.reset_count != prev.clock_info.reset_count:
        return Check("quote.clock", True, "resetCount moved forward since the earlier quote")
    return Check(
        "quote.clock", True, f"clock did not go back ({delta:+d} ms since the earlier quote)"
    )


# the whole quote -----------------------------------------------------------------------------


def verify_quote(
    attest: bytes,
    signature: bytes,
    ak: Ak,
    pcrs: Mapping[int, bytes],
    *,
    pcr_bank: str = "sha256",
    nonce: bytes | None = None,
    qualified_name: bytes | None = None,
    previous: bytes | None = None,
) -> Verdict:
    """Every quote check over one TPM2_Quote.

    `attest` is the marshalled TPMS_ATTEST, `signature` the TPMT_SIGNATURE, `pcrs` the values
    (of bank `pcr_bank`) the quote is said to cover. `nonce`: the qualifying data the verifier
    expects (no `quote.nonce` check without it). `qualified_name`: the AK's expected qualified
    name. `previous`: the TPMS_ATTEST of an earlier quote by the same AK, already verified.
    Raises VerifyError when bytes do not parse or the bank is unknown.
    """
    att = parse_attest(attest)
    prev = parse_attest(previous) if previous is not None else None
    return Verdict(
        tuple(quote_checks(att, attest, signature, ak, pcrs, pcr_bank, nonce, qualified_name, prev))
    )


def quote_checks(
    att: Attest,
    attest: bytes,
    signature: bytes,
    ak: Ak,
    pcrs: Mapping[int, bytes],
    pcr_bank: str,
    nonce: bytes | None,
    qualified_name: bytes | None,
    prev: Attest | None,
) -> list[Check]:
    """`verify_quote` on an attestation already parsed (`att`, from the bytes `attest`)."""
    sig = parse_signature(signature)
    bank_alg(pcr_bank)
    checks = [
        check_signature(ak, attest, sig),
        check_ak(ak),
        check_magic(att),
        check_type(att),
        check_signer(att, ak, qualified_name),
    ]
    if nonce is not None:
        checks.append(check_nonce(att, nonce))
    checks += [check_pcr_selection(att, pcrs, pcr_bank), check_pcr_digest(att, pcrs)]
    if prev is not None:
        checks.append(check_clock(att, prev))
    return checks
