"""`vtpm verify`: check a deep quote, a plain TPM quote, or a provisioning bundle.

    vtpm verify --bundle B.json --evidence E.json --nonce HEX [--policy P.json]
                [--previous E0.json] [--event-log LOG] [--json]
    vtpm verify --ak-public AK --quote MSG --signature SIG --pcrs PCRS [--pcr-list BANK:I,J..]
                [--ak-qualified-name QN] [--nonce HEX] [--policy P.json] [--previous MSG0]
                [--event-log LOG] [--json]
    vtpm verify --bundle B.json [--ek-cert EK.der [--policy P.json]] [--json]

With --ek-cert (DER or PEM), the EK certificate's chain to the group's AK is checked too
(`vtpm.verify.chain`: chain.*), and with --evidence the deep quote must be of that vTPM
(deep.ek).

Plain quotes take tpm2-tools 5.x files: `tpm2_quote -m` (TPMS_ATTEST), `-s` (TPMT_SIGNATURE,
its default `tss` format), `-o` (PCR values: the default serialized form, or with `-F values`
the bare values, which need `--pcr-list` in the quote's order), `tpm2_createak -u` (TPM2B_PUBLIC,
or PEM with `-f pem`) and `-q` (the AK's qualified name). PCR values may also be JSON:
{"sha256": {"0": "hex", ...}}.

Output: one line per check, `PASS|FAIL id: reason`, then the verdict; `--json` prints the
verdict as JSON. Exit 0 only when every check passes; 1 otherwise, or on unusable input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vtpm.errors import ConfigError, VerifyError, VtpmError
from vtpm.files import read_limited
from vtpm.tpm.attest import TPM_GENERATED_VALUE
from vtpm.tpm.hashes import HASH_BY_NAME, hash_name
from vtpm.tpm.public import parse_public
from vtpm.verify.bundle import verify_bundle
from vtpm.verify.chain import GroupCaEvidence, load_certificate, verify_chain
from vtpm.verify.deepquote import compare_pcrs, verify_deep_quote
from vtpm.verify.expected import Expected
from vtpm.verify.quote import Ak, verify_quote
from vtpm.verify.verdict import Check, Verdict
from vtpm.wire.evidence import Bundle, Evidence

MAX_FILE = 1 << 20
MAX_EVENT_LOG = 64 << 20
EVENTLOG_MODULE = "vtpm.verify.eventlog"

# tpm2-tools' serialized PCR file: host-order (little-endian) C structures, written whole
_SEL_SIZE = 4 + 16 * 8  # TPML_PCR_SELECTION: count, 16 x {u16 hash, u8 size, u8[4], pad}
_DIGEST_LIST_SIZE = 4 + 8 * (2 + 64)  # TPML_DIGEST: count, 8 x TPM2B_DIGEST{u16, u8[64]}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "verify",
        help="verify a deep quote, a TPM quote or a group bundle",
        description="Check a deep quote (--bundle, --evidence, --nonce), a plain TPM quote made "
        "with tpm2-tools (--ak-public, --quote, --signature, --pcrs), or a group's provisioning "
        "bundle alone (--bundle). Prints every check; exits 0 only when all pass.",
    )
    p.add_argument("--bundle", type=Path, metavar="JSON", help="the group's provisioning bundle")
    p.add_argument("--evidence", type=Path, metavar="JSON", help="deep-quote evidence")
    p.add_argument("--nonce", metavar="HEX", help="the nonce the verifier sent")
    p.add_argument("--policy", type=Path, metavar="JSON", help="expected values")
    p.add_argument(
        "--previous",
        type=Path,
        metavar="FILE",
        help="an earlier evidence (deep) or attestation (plain) by the same AK, to check the "
        "TPM clock did not go back (a replayed older quote fails)",
    )
    p.add_argument("--ak-public", type=Path, metavar="FILE", help="AK: TPM2B_PUBLIC or PEM")
    p.add_argument(
        "--ak-qualified-name", metavar="FILE|HEX", help="the AK's qualified name (tpm2_createak -q)"
    )
    p.add_argument("--quote", type=Path, metavar="MSG", help="TPMS_ATTEST (tpm2_quote -m)")
    p.add_argument("--signature", type=Path, metavar="SIG", help="TPMT_SIGNATURE (tpm2_quote -s)")
    p.add_argument("--pcrs", type=Path, metavar="FILE", help="PCR values (tpm2_quote -o, or JSON)")
    p.add_argument(
        "--pcr-list", metavar="BANK:I,J", help="selection of a bare-values PCR file (-F values)"
    )
    p.add_argument("--event-log", type=Path, metavar="FILE", help="replay this event log too")
    p.add_argument(
        "--ek-cert",
        type=Path,
        metavar="FILE",
        help="a vTPM EK certificate (DER or PEM): check its chain to the bundle's AK, and that "
        "the deep quote (--evidence) is of that vTPM",
    )
    p.add_argument("--json", action="store_true", help="print the verdict as JSON")
    p.set_defaults(func=cmd_verify)


# input files --------------------------------------------------------------------------------


def _read(path: Path, what: str, limit: int = MAX_FILE) -> bytes:
    return read_limited(path, what, limit)


def _json(path: Path, what: str, data: bytes | None = None) -> object:
    """The JSON document in `path` (or its bytes `data`, already read); VerifyError if it is
    not JSON or nests deeper than the parser can follow."""
    try:
        return json.loads(_read(path, what) if data is None else data)
    except (UnicodeDecodeError, ValueError) as e:
        raise VerifyError(f"{what} {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise VerifyError(f"{what} {path} is nested too deeply to be read") from None


def _document(path: Path, what: str, parse: Callable[[object], Any]) -> Any:
    raw = _json(path, what)
    try:
        return parse(raw)
    except (VtpmError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise VerifyError(f"{what} {path}: {e}") from None


def _hex_arg(text: str, what: str) -> bytes:
    cleaned = text.strip().lower().removeprefix("0x")
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not hex") from None


def load_ak(path: Path) -> Ak:
    """TPM2B_PUBLIC (tpm2_createak -u) or a PEM public key (tpm2_createak -f pem)."""
    data = _read(path, "AK public key")
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as e:
            raise VerifyError(f"AK public key {path}: not a PEM public key ({e})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise VerifyError(f"AK public key {path}: not an RSA or ECC key")
        return key
    try:
        return parse_public(data)
    except VerifyError as e:
        raise VerifyError(f"AK public key {path}: {e}") from None


def load_attest(path: Path, what: str) -> bytes:
    """TPMS_ATTEST as tpm2_quote -m writes it; a TPM2B_ATTEST (size first) is unwrapped."""
    data = _read(path, what)
    magic = struct.pack(">I", TPM_GENERATED_VALUE)
    if len(data) >= 6 and int.from_bytes(data[:2], "big") == len(data) - 2 and data[2:6] == magic:
        return data[2:]
    return data


def parse_pcr_list(text: str) -> tuple[str, list[int]]:
    """`sha256:0,1,16` (tpm2-tools syntax, one bank)."""
    bank, sep, rest = text.partition(":")
    if not sep or bank.lower() not in HASH_BY_NAME or ("+" in rest):
        raise ConfigError(f"--pcr-list {text!r}: expected one bank, e.g. sha256:0,1,16")
    try:
        indices = [int(i) for i in rest.split(",")]
    except ValueError:
        raise ConfigError(f"--pcr-list {text!r}: PCR indices must be numbers") from None
    if len(set(indices)) != len(indices) or not all(0 <= i <= 23 for i in indices):
        raise ConfigError(f"--pcr-list {text!r}: indices must be unique, in 0..23")
    return bank.lower(), indices


def _pcrs_from_json(raw: object, path: Path) -> tuple[str, dict[int, bytes]]:
    try:
        expected = Expected.from_json(
            {"format": "vtpm-verify-policy/1", "vtpm_pcrs": raw}
        ).vtpm_pcrs
    except ConfigError as e:
        raise VerifyError(f"PCR values {path}: {str(e).replace('vtpm_pcrs', 'values')}") from None
    assert expected is not None
    if len(expected) != 1:
        raise VerifyError(f"PCR values {path}: give the values of one bank")
    ((bank, values),) = expected.items()
    return bank, dict(values)


def _pcrs_serialized(data: bytes, path: Path) -> tuple[str, dict[int, bytes]]:
    what = f"PCR values {path}"
    if len(data) < _SEL_SIZE + 4:
        raise VerifyError(f"{what}: not a tpm2-tools PCR file (too short)")
    (count,) = struct.unpack_from("<I", data, 0)
    if not 1 <= count <= 16:
        raise VerifyError(f"{what}: not a tpm2-tools PCR file (selection count {count})")
    wanted: list[tuple[int, int]] = []
    for n in range(count):
        alg, size = struct.unpack_from("<HB", data, 4 + 8 * n)
        bitmap = data[4 + 8 * n + 3 : 4 + 8 * n + 3 + min(size, 4)]
        wanted += [
            (alg, 8 * i + b) for i, byte in enumerate(bitmap) for b in range(8) if byte >> b & 1
        ]
    (lists,) = struct.unpack_from("<I", data, _SEL_SIZE)
    if len(data) != _SEL_SIZE + 4 + lists * _DIGEST_LIST_SIZE or lists > 64:
        raise VerifyError(f"{what}: not a tpm2-tools PCR file (size {len(data)} bytes)")
    digests: list[bytes] = []
    for k in range(lists):
        base = _SEL_SIZE + 4 + k * _DIGEST_LIST_SIZE
        (n_digests,) = struct.unpack_from("<I", data, base)
        if n_digests > 8:
            raise VerifyError(f"{what}: a digest list holds {n_digests} digests (at most 8)")
        for d in range(n_digests):
            off = base + 4 + d * 66
            (size,) = struct.unpack_from("<H", data, off)
            if size > 64:
                raise VerifyError(f"{what}: a digest of {size} bytes")
            digests.append(data[off + 2 : off + 2 + size])
    if len(digests) != len(wanted) or not wanted:
        raise VerifyError(f"{what}: {len(digests)} values for {len(wanted)} selected PCRs")
    banks = {alg for alg, _ in wanted}
    if len(banks) != 1:
        raise VerifyError(f"{what}: values of several banks; quote one bank")
    bank = hash_name(banks.pop())
    if bank not in HASH_BY_NAME:
        raise VerifyError(f"{what}: unsupported bank {bank}")
    out = {index: value for (_alg, index), value in zip(wanted, digests, strict=True)}
    for index, value in out.items():
        if len(value) != HASH_BY_NAME[bank].size:
            raise VerifyError(f"{what}: PCR {index} is not a {bank} value")
    return bank, out


def load_pcrs(path: Path, pcr_list: str | None) -> tuple[str, dict[int, bytes]]:
    """(bank, {index: value}) from JSON, tpm2-tools serialized, or bare values + pcr_list."""
    data = _read(path, "PCR values")
    if pcr_list is not None:
        bank, indices = parse_pcr_list(pcr_list)
        size = HASH_BY_NAME[bank].size
        if len(data) != size * len(indices):
            raise VerifyError(
                f"PCR values {path}: {len(data)} bytes, but {len(indices)} {bank} values are "
                f"{size * len(indices)}"
            )
        return bank, {i: data[n * size : (n + 1) * size] for n, i in enumerate(indices)}
    if data.lstrip().startswith(b"{"):
        return _pcrs_from_json(_json(path, "PCR values", data), path)
    return _pcrs_serialized(data, path)


def _qualified_name(text: str | None) -> bytes | None:
    if text is None:
        return None
    path = Path(text)
    if path.exists():
        return _read(path, "AK qualified name")
    return _hex_arg(text, "--ak-qualified-name")


# event-log hook -------------------------------------------------------------------------------


def event_log_checks(
    path: Path, pcrs: dict[int, bytes], bank: str, expected: Expected | None
) -> list[Check]:
    log = _read(path, "event log", MAX_EVENT_LOG)
    try:
        module = importlib.import_module(EVENTLOG_MODULE)
    except ModuleNotFoundError as e:
        if e.name not in (EVENTLOG_MODULE, None):
            raise
        raise ConfigError(
            f"--event-log: event-log replay is not available ({EVENTLOG_MODULE} is missing)"
        ) from None
    replay = getattr(module, "replay_checks", None)
    if not callable(replay):
        raise ConfigError(f"--event-log: {EVENTLOG_MODULE} has no replay_checks()")
    return list(cast(list[Check], replay(log, pcrs, bank, expected)))


# modes ----------------------------------------------------------------------------------------


def _bundle(path: Path) -> tuple[Bundle, GroupCaEvidence | None]:
    """The bundle document and its group CA (None when it has none)."""
    raw = _json(path, "bundle")
    try:
        bundle = Bundle.from_json(raw)
        return bundle, GroupCaEvidence.from_bundle(bundle)
    except (VtpmError, ValueError, TypeError, KeyError, AttributeError) as e:
        raise VerifyError(f"bundle {path}: {e}") from None


def _chain(
    args: argparse.Namespace, bundle: Bundle, ca: GroupCaEvidence | None, expected: Expected | None
) -> Verdict:
    return verify_chain(bundle, ca, _read(args.ek_cert, "EK certificate"), expected)


def _deep(args: argparse.Namespace, expected: Expected | None) -> Verdict:
    if args.bundle is None or args.nonce is None:
        raise ConfigError("--evidence needs --bundle and --nonce")
    bundle, ca = _bundle(args.bundle)
    evidence: Evidence = _document(args.evidence, "evidence", Evidence.from_json)
    previous = None
    if args.previous is not None:
        previous = _document(args.previous, "previous evidence", Evidence.from_json)
    nonce = _hex_arg(args.nonce, "--nonce")
    ek_cert = None
    if args.ek_cert is not None:
        ek_cert = load_certificate(_read(args.ek_cert, "EK certificate"), str(args.ek_cert))
    verdict = verify_bundle(bundle)
    verdict = verdict.plus(
        verify_deep_quote(
            evidence, bundle, nonce=nonce, expected=expected, previous=previous,
            ek_certificate=ek_cert,
        ).checks
    )  # fmt: skip
    if args.ek_cert is not None:
        verdict = verdict.plus(_chain(args, bundle, ca, expected).checks)
    if args.event_log is not None:
        info = evidence.info
        bank = hash_name(info.pcr_bank)
        verdict = verdict.plus(event_log_checks(args.event_log, info.pcr_dict(), bank, expected))
    return verdict


def _plain(args: argparse.Namespace, expected: Expected | None) -> Verdict:
    missing = [
        flag
        for flag, value in (
            ("--ak-public", args.ak_public),
            ("--signature", args.signature),
            ("--pcrs", args.pcrs),
        )
        if value is None
    ]
    if missing:
        raise ConfigError(f"--quote needs {', '.join(missing)}")
    if args.ek_cert is not None:
        raise ConfigError("--ek-cert needs --bundle (a plain quote has no group CA)")
    ak = load_ak(args.ak_public)
    attest = load_attest(args.quote, "quote")
    signature = _read(args.signature, "signature")
    bank, pcrs = load_pcrs(args.pcrs, args.pcr_list)
    previous = load_attest(args.previous, "previous quote") if args.previous else None
    verdict = verify_quote(
        attest,
        signature,
        ak,
        pcrs,
        pcr_bank=bank,
        nonce=None if args.nonce is None else _hex_arg(args.nonce, "--nonce"),
        qualified_name=_qualified_name(args.ak_qualified_name),
        previous=previous,
    )
    if args.nonce is None and not args.json:
        sys.stderr.write(
            "vtpm verify: note: no --nonce given; the quote's freshness is unchecked\n"
        )
    if expected is not None:
        verdict = verdict.plus(_plain_policy(expected, pcrs, bank))
    if args.event_log is not None:
        verdict = verdict.plus(event_log_checks(args.event_log, pcrs, bank, expected))
    return verdict


def _plain_policy(expected: Expected, pcrs: dict[int, bytes], bank: str) -> list[Check]:
    out: list[Check] = []
    unshowable = [
        key
        for key, value in (
            ("vtpm_uuid", expected.vtpm_uuid),
            ("group", expected.group),
            ("label", expected.label),
            ("host_pcrs", expected.host_pcrs),
        )
        if value is not None
    ]
    if unshowable:
        why = f"a plain quote cannot show the policy's {', '.join(unshowable)} (a deep quote can)"
        out.append(Check("quote.policy", False, why))
    if expected.vtpm_pcrs is not None:
        out.append(compare_pcrs("quote.pcrs_expected", pcrs, bank, expected.vtpm_pcrs))
    return out


def _print(verdict: Verdict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(verdict.to_json()))
        return
    for c in verdict.checks:
        print(f"{'PASS' if c.ok else 'FAIL'} {c.id}: {c.reason}")
    failed = verdict.failed()
    total = len(verdict.checks)
    if verdict.ok:
        print(f"verdict: PASS ({total} checks)")
    else:
        ids = ", ".join(c.id for c in failed)
        print(f"verdict: FAIL ({len(failed)} of {total} checks failed: {ids or 'no checks'})")


def cmd_verify(args: argparse.Namespace) -> int:
    expected = Expected.load(args.policy) if args.policy is not None else None
    if args.evidence is not None:
        verdict = _deep(args, expected)
    elif args.quote is not None:
        verdict = _plain(args, expected)
    elif args.bundle is not None:
        if args.event_log is not None or args.nonce is not None:
            raise ConfigError("--bundle alone verifies the bundle; --nonce/--event-log need more")
        bundle, ca = _bundle(args.bundle)
        verdict = verify_bundle(bundle)
        if args.ek_cert is not None:
            verdict = verdict.plus(_chain(args, bundle, ca, expected).checks)
    else:
        raise ConfigError(
            "give --bundle with --evidence (deep quote), --quote with --ak-public (TPM quote), "
            "or --bundle alone"
        )
    _print(verdict, args.json)
    return 0 if verdict.ok else 1
