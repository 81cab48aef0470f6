"""What a measured launch measures, computed from the guest's files alone.

- the kernel: the digest of the kernel file's bytes, into PCR 4;
- the command line: the digest of its UTF-8 bytes (exactly the string QEMU's `-append` hands
  the kernel, no terminating NUL), into PCR 5;
- the initrd, when there is one: the digest of the file's bytes, into PCR 5 after the command
  line.

Each in SHA-1, SHA-256, SHA-384 and SHA-512, so every bank a vTPM may have active gets its own
digest. The expected PCR values are the replay of exactly the events the vTPM will log, so the
reference values and the log cannot disagree about the arithmetic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vtpm.errors import ConfigError
from vtpm.launchrecord import Measurement, banks_of
from vtpm.tpm import eventlog
from vtpm.tpm.constants import DIGEST_SIZES, HASH_NAMES

BANKS = tuple(DIGEST_SIZES)  # every bank this project handles: SHA-1, SHA-256, -384, -512
CHUNK = 1 << 20
MAX_CMDLINE = 4096 - len("cmdline ")  # the record's limit on event data


@dataclass(frozen=True, slots=True)
class GuestFiles:
    """The guest's boot files and command line, as the launcher and QEMU see them."""

    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""


Digests = tuple[tuple[int, bytes], ...]  # (TPM_ALG_ID, digest) per bank


def bytes_digests(data: bytes) -> Digests:
    return tuple((alg, hashlib.new(HASH_NAMES[alg], data).digest()) for alg in BANKS)


def file_digests(path: Path) -> Digests:
    """The file's digests in every bank, in one pass over it."""
    hashers = [(alg, hashlib.new(HASH_NAMES[alg])) for alg in BANKS]
    try:
        with open(path, "rb") as f:
            while block := f.read(CHUNK):
                for _alg, h in hashers:
                    h.update(block)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    return tuple((alg, h.digest()) for alg, h in hashers)


def _check_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise ConfigError(f"the {what} {path} is not a file")


def measure(files: GuestFiles) -> tuple[Measurement, ...]:
    """The launch's measurements, in extend order."""
    _check_file(files.kernel, "kernel")
    if files.initrd is not None:
        _check_file(files.initrd, "initrd")
    if len(files.cmdline.encode()) > MAX_CMDLINE or "\x00" in files.cmdline:
        raise ConfigError(f"the command line must be at most {MAX_CMDLINE} bytes without NUL")
    out = [
        Measurement("kernel", f"kernel {files.kernel.name}", file_digests(files.kernel)),
        Measurement("cmdline", f"cmdline {files.cmdline}", bytes_digests(files.cmdline.encode())),
    ]
    if files.initrd is not None:
        out.append(Measurement("initrd", f"initrd {files.initrd.name}", file_digests(files.initrd)))
    return tuple(out)


def expected_pcrs(
    measurements: Sequence[Measurement], banks: Sequence[int] | None = None
) -> dict[int, dict[int, bytes]]:
    """{alg: {pcr: value}}: the PCR values a fresh vTPM holds after the launch's extends."""
    banks = tuple(banks) if banks is not None else banks_of(measurements)
    events = [m.event(banks) for m in measurements]
    return {alg: eventlog.replay(events, alg) for alg in banks}
