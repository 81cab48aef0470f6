"""The instance's side of a measured launch: the launch's extends, applied after the guest's
TPM2_Startup(CLEAR), and the event log that records them.

Why after Startup: QEMU's control channel re-initialises the TPM at every guest reset (STOP,
INIT), and the firmware (or Linux, when the firmware does not) sends TPM2_Startup(CLEAR), which
resets PCR 4 and 5. Extends made before that would be wiped. So the instance interposes on
every command (`Device.execute`, whatever the frontend): when a TPM2_Startup(CLEAR) succeeds,
it extends the launch's measurements (kernel into PCR 4; command line, then initrd into PCR 5)
in every bank that has PCR 4 or 5 allocated (TPM2_GetCapability(TPM_CAP_PCRS)), writes the
event log, and only then answers the Startup. While a launch is armed, commands are serialized
with the device's power changes, so no other command (nor a control-channel INIT) runs between
the Startup and the extends.

Locality: the extends are sent at locality 0 (the caller's locality is restored after). The PC
Client profile lets PCR 0..15 be extended from any locality, so PCR 4 and 5 accept them
whatever locality the guest's Startup came from.

Freshness: when armed, at instance start, any saved volatile state is discarded and the TPM is
taken through TPM2_Startup(CLEAR) - a rehearsal of the launch's extends - TPM2_Shutdown(CLEAR)
and power-off. The rehearsal proves every extend works before any guest is started; when one
fails, the TPM's permanent state is put back as it was before the rehearsal, the instance stops
and the launcher refuses. Shutdown(CLEAR) also makes a TPM2_Startup(STATE) impossible
(TPM_RC_VALUE), so the guest cannot resume PCR values saved by an earlier run: the first Startup
it can make is a CLEAR, and that applies the launch. At instance exit (`end`) the TPM is taken
through Startup(CLEAR)/Shutdown(CLEAR) again, so no later run can resume the launch's PCRs.

Reboots: the launch is re-applied after every TPM2_Startup(CLEAR) for the life of the instance
process. A guest reset within one QEMU process boots the same -kernel/-initrd/-append again, so
the same measurements are true again (as pv-grub measures at every boot); without them PCR 4/5
would stay empty after a reboot and secrets sealed to the launch would be lost. The event log is
rewritten each time (it describes the PCRs since the last reset). A TPM2_Startup(STATE) after a
guest's own Shutdown(STATE) resumes the PCRs of that same launch and is left alone. The launch
ends with the instance: QEMU's CMD_SHUTDOWN at exit stops it, and the Manager restarts it
without `--launch`.

Failure: an extend that fails after a guest's Startup (a bank without a recorded digest, the
TPM failing) disables the TPM: every later command, the Startup included, is answered with
TPM_RC_FAILURE, the reason is logged, and the event log is removed. A guest started on the wrong
vTPM gets no working TPM rather than a TPM whose PCRs claim a launch that did not happen.
"""

from __future__ import annotations

import logging
import struct

from vtpm.engine.engine import StateType, TpmVersion
from vtpm.errors import LaunchError, TpmResponseError, VtpmError
from vtpm.instance import launchlog as launch_log
from vtpm.instance.device import Device, failure_response
from vtpm.launchrecord import LaunchRecord
from vtpm.tpm import frames
from vtpm.tpm.constants import HASH_NAMES, TPM_RC, TPM_SU

log = logging.getLogger(__name__)

LAUNCH_PCRS = frozenset({4, 5})
EXTEND_LOCALITY = 0
_STARTUP_CLEAR = frames.startup(TPM_SU.CLEAR)


def is_startup_clear(command: bytes) -> bool:
    """TPM2_Startup(TPM_SU_CLEAR), the one command that resets PCR 4 and 5."""
    return command == _STARTUP_CLEAR


class Launch:
    """A launch armed on `device`: `arm()` once at start; it makes itself the device's
    `Interposer`, so the device then calls `execute` for every command and `end` at close."""

    def __init__(self, device: Device, record: LaunchRecord) -> None:
        if device.version is not TpmVersion.TPM20:
            raise LaunchError("a measured launch needs a TPM 2.0 vTPM")
        self._device = device
        self._record = record
        self.failed = ""
        self.applied = 0  # how many times the launch was applied (guest boots)
        self._failure = failure_response(TpmVersion.TPM20)

    # start ----------------------------------------------------------------------------------

    def arm(self) -> None:
        """Make the TPM fresh, rehearse the extends, and interpose on the device's commands."""
        dev = self._device
        before = dev.get_state_blob(StateType.PERMANENT)
        try:
            banks = self._reset_to_clear(rehearse=True)
        except VtpmError:
            # refused: the TPM is put back as it was (no rehearsal PCRs left to resume)
            dev.power_off(orderly=False)
            dev.set_state_blob(StateType.PERMANENT, before)
            raise
        self._remove_log()  # it describes an earlier launch
        dev.power_on()
        dev.interpose(self)
        log.info(
            "measured launch armed (%s; banks %s): applied after each TPM2_Startup(CLEAR)",
            ", ".join(m.event_data for m in self._record.measurements),
            ", ".join(HASH_NAMES.get(b, hex(b)) for b in banks),
        )

    def end(self) -> None:
        """At instance exit (`device.Interposer`, from `Device.close`): remove the event log
        and leave the TPM off with Shutdown(CLEAR), so no later run of this vTPM can
        TPM2_Startup(STATE) into the launch's PCR values. Logs, never raises."""
        try:
            self._remove_log()  # the PCRs it describes are gone
            self._reset_to_clear(rehearse=False)
        except VtpmError as e:
            log.error("could not close the measured launch with TPM2_Shutdown(CLEAR): %s", e)

    def _reset_to_clear(self, *, rehearse: bool) -> tuple[int, ...]:
        """Power the TPM on without saved volatile state, Startup(CLEAR) (then, rehearsing, the
        launch's extends), Shutdown(CLEAR), power off. The banks extended."""
        dev = self._device
        dev.power_on(delete_volatile=True)
        self._expect(dev.process(frames.startup(TPM_SU.CLEAR)), "TPM2_Startup(CLEAR)")
        banks = self._extend() if rehearse else ()
        self._expect(dev.process(frames.shutdown(TPM_SU.CLEAR)), "TPM2_Shutdown(CLEAR)")
        # TPM2_Shutdown(CLEAR) was the orderly shutdown: the usual Shutdown(STATE) at stop
        # would let a Startup(STATE) resume these PCRs
        dev.power_off(orderly=False)
        return banks

    @staticmethod
    def _expect(response: bytes, what: str) -> None:
        rc = frames.response_code(response)
        if rc != TPM_RC.SUCCESS:
            raise LaunchError(f"{what} failed with TPM_RC {rc:#x}")

    # every command, while armed ---------------------------------------------------------------

    def execute(self, command: bytes, locality: int | None) -> bytes:
        """Run `command`; after a successful TPM2_Startup(CLEAR), apply the launch first.
        (`device.Interposer`: the device's power lock is held.)"""
        if self.failed:
            return self._failure
        response = self._device.process(command, locality)
        if is_startup_clear(command) and frames.response_code(response) == TPM_RC.SUCCESS:
            try:
                banks = self._extend()
                self._write_log(banks)
            except LaunchError as e:
                self._fail(str(e))
                return self._failure
            self.applied += 1
            log.info("measured launch applied after TPM2_Startup(CLEAR) (boot %d)", self.applied)
        return response

    def _fail(self, why: str) -> None:
        self.failed = why
        try:
            self._remove_log()
        except LaunchError as e:
            log.error("%s", e)
        log.error(
            "measured launch failed: %s; this vTPM now fails every command (using the wrong "
            "vTPM will yield a non-functioning guest)",
            why,
        )

    # the extends ----------------------------------------------------------------------------

    def _extend(self) -> tuple[int, ...]:
        """Extend every measurement at locality 0; the banks extended, or LaunchError."""
        dev = self._device
        caller = dev.locality
        try:
            try:
                alloc = frames.parse_pcr_allocation(
                    dev.process(frames.get_capability_pcrs(), EXTEND_LOCALITY)
                )
            # ValueError, struct.error: until tpm.frames raises TpmResponseError for them
            except (TpmResponseError, ValueError, struct.error) as e:
                raise LaunchError(f"reading the active PCR banks failed: {e}") from None
            banks = tuple(sorted(alg for alg, pcrs in alloc.items() if pcrs & LAUNCH_PCRS))
            for m in self._record.measurements:
                digests: dict[int, bytes] = {}
                for alg in banks:
                    if m.pcr not in alloc[alg]:
                        continue
                    d = m.digest(alg)
                    if d is None:
                        name = HASH_NAMES.get(alg, f"{alg:#06x}")
                        raise LaunchError(
                            f"the {name} bank is active but the launch has no {name} digest "
                            f"of the {m.kind}"
                        )
                    digests[alg] = d
                if not digests:
                    raise LaunchError(f"PCR {m.pcr} is allocated in no bank")
                resp = dev.process(frames.pcr_extend(m.pcr, digests), EXTEND_LOCALITY)
                rc = frames.response_code(resp)
                if rc != TPM_RC.SUCCESS:
                    raise LaunchError(
                        f"extending the {m.kind} into PCR {m.pcr} failed with TPM_RC {rc:#x}"
                    )
            return banks
        finally:
            dev.set_locality(caller)

    # the event log --------------------------------------------------------------------------

    def _write_log(self, banks: tuple[int, ...]) -> None:
        path = self._record.event_log
        if path is None:
            return
        try:
            launch_log.write(path, launch_log.build(self._record.measurements, banks))
        except OSError as e:
            raise LaunchError(f"cannot write the event log {path}: {e.strerror}") from None

    def _remove_log(self) -> None:
        """Remove the event log: it no longer describes the PCRs. LaunchError if it stays."""
        path = self._record.event_log
        if path is None:
            return
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise LaunchError(f"cannot remove the stale event log {path}: {e.strerror}") from None
