"""The launch's TCG event log, written by the vTPM instance beside the vTPM.

The log is a crypto-agile TCG log (`vtpm.tpm.eventlog`): the Spec ID header announcing the
vTPM's active banks, then one TCG_PCR_EVENT2 per launch extend, in extend order:

    PCR 4  EV_IPL (0x0D)  "kernel <file name>"     digest of the kernel file
    PCR 5  EV_IPL (0x0D)  "cmdline <command line>" digest of the command line's UTF-8 bytes
    PCR 5  EV_IPL (0x0D)  "initrd <file name>"     digest of the initrd file (when given)

EV_IPL is the PFP's type for what an initial program loader measures (GRUB logs the kernel,
initrd and command line with it too); its event data is free-form, here UTF-8 text without a
NUL. The log describes the PCRs since the last TPM2_Startup(CLEAR): it is rewritten, not
appended to, each time the instance applies the launch, and replaced atomically, so a reader
never sees half a log.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from vtpm.launchrecord import Measurement, write_atomic
from vtpm.tpm import eventlog
from vtpm.tpm.constants import DIGEST_SIZES

LOG_MODE = 0o640  # nothing secret: measurements only


def build(measurements: Sequence[Measurement], banks: Sequence[int]) -> bytes:
    """The log bytes for `measurements` extended in `banks` (KeyError for a missing digest)."""
    events = tuple(m.event(banks) for m in measurements)
    return eventlog.encode(eventlog.EventLog(tuple((b, DIGEST_SIZES[b]) for b in banks), events))


def write(path: Path, data: bytes) -> None:
    write_atomic(path, data, LOG_MODE)
