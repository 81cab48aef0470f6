"""PCR bank allocation at an instance's start (`--pcr-banks sha256` or `sha1,sha256`).

The allocation is the TPM's own persistent state: TPM2_PCR_Allocate (platform hierarchy, empty
auth, as a vTPM has it after TPM2_Startup(CLEAR)) records it, and it takes effect at the next
TPM reset. The instance therefore runs it in a TPM started for it and power-cycles the TPM
(`Instance._provision`); later starts keep the banks without the flag. Every bank the TPM
implements is named in the request, the wanted ones with all 24 PCRs and the others with none,
so the result is exactly the list given.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vtpm.errors import ConfigError, TpmError
from vtpm.tpm import frames, provcmds
from vtpm.tpm.constants import HASH_NAMES, MAX_PCR

Process = Callable[[bytes], bytes]

BY_NAME: dict[str, int] = {name: alg for alg, name in HASH_NAMES.items()}
ALL_PCRS = frozenset(range(MAX_PCR + 1))


def parse(text: str) -> tuple[int, ...]:
    """The banks (TPM_ALG ids) named in `text` ("sha256", "sha1,sha256"); "" is none."""
    if not text:
        return ()
    banks: list[int] = []
    for raw in text.split(","):
        name = raw.strip().lower()
        if name not in BY_NAME:
            raise ConfigError(
                f"--pcr-banks: unknown PCR bank {raw[:40]!r} (known: {', '.join(BY_NAME)})"
            )
        if BY_NAME[name] in banks:
            raise ConfigError(f"--pcr-banks: bank {name} is named twice")
        banks.append(BY_NAME[name])
    return tuple(banks)


def names(banks: Iterable[int]) -> str:
    """`banks` (TPM_ALG ids) as text for messages."""
    return ",".join(HASH_NAMES.get(b, f"{b:#06x}") for b in banks) or "none"


def allocate(process: Process, wanted: tuple[int, ...]) -> provcmds.PcrAllocation:
    """Ask a started TPM for exactly the banks `wanted` (from its next reset on)."""
    implemented = frames.parse_pcr_allocation(process(frames.get_capability_pcrs()))
    missing = [b for b in wanted if b not in implemented]
    if missing:
        raise TpmError(
            f"--pcr-banks: this TPM has no {names(missing)} bank (it has {names(implemented)})"
        )
    request = {alg: alg in wanted for alg in implemented}
    result = provcmds.parse_pcr_allocate(process(provcmds.pcr_allocate(request)))
    if not result.success:
        raise TpmError(
            f"TPM2_PCR_Allocate refused {names(wanted)}: {result.size_needed} bytes of PCR "
            f"memory needed, {result.size_available} available"
        )
    return result


def check(process: Process, wanted: tuple[int, ...]) -> tuple[int, ...]:
    """The active banks of a started TPM after an allocation of `wanted`; raises unless they
    are exactly `wanted`, each with all 24 PCRs."""
    allocation = frames.parse_pcr_allocation(process(frames.get_capability_pcrs()))
    now = tuple(alg for alg, pcrs in allocation.items() if pcrs)
    if set(now) != set(wanted) or any(allocation[b] != ALL_PCRS for b in wanted):
        raise TpmError(f"PCR banks after allocation are {names(now)}, not {names(wanted)}")
    return now
