"""The project's exception tree.

One root, `VtpmError`, so a caller (the CLI) can turn any expected failure into one clear line.
Errors that a peer could use to learn which check failed (unseal, decrypt, auth) are opaque on
purpose: their message never says more than that the operation failed.
"""

from __future__ import annotations


class VtpmError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(VtpmError):
    """Invalid local configuration or command-line input (what the operator wrote)."""


class RequestError(VtpmError):
    """A peer's request is well-formed on the wire but asks for something invalid (an
    argument out of range, a uuid that is not one). Its message goes back to that peer."""


class RemoteProtocolError(VtpmError):
    """A peer sent bytes that break the protocol; the connection is dropped, others go on."""


class LocalProtocolError(VtpmError):
    """We were asked to send something the protocol does not allow (a bug on our side)."""


class TpmError(VtpmError):
    """The TPM engine failed (library load, init, state handling)."""


class TpmResponseError(TpmError):
    """A TPM answered a command with an error code, or with a response that does not parse."""


class DeviceError(VtpmError):
    """A vTPM control operation is not possible in the device's current state."""


class EngineLoadError(TpmError):
    """libtpms could not be loaded or is of an unsupported version."""


class StateError(VtpmError):
    """A stored state blob is missing, unreadable, or fails its integrity check."""


class StateIntegrityError(StateError):
    """A state blob was tampered with, truncated, or belongs to another vTPM: refused."""


class StateKeyError(VtpmError):
    """The state key could not be obtained (bad key file, closed fd, wrong length)."""


class InstanceLockedError(VtpmError):
    """Another process already runs this vTPM (its state directory is locked)."""


class HwTpmError(VtpmError):
    """The hardware TPM (or its simulator) is unreachable or failed a command."""


class SealError(VtpmError):
    """Sealing to, or unsealing from, the hardware TPM failed. Opaque on purpose: the message
    never says which policy check failed."""


class AuthError(VtpmError):
    """A request is not authorised: bad or missing signature, unknown or refused peer."""


class ReplayError(AuthError):
    """A signed request's sequence number is not above the last one accepted."""


class LabelError(VtpmError):
    """A security label is malformed, or the label policy refuses a peer."""


class ManagerError(VtpmError):
    """The Manager refused or failed an operation (unknown vTPM, locked group, ...)."""


class InstanceExitedError(ManagerError):
    """A vTPM's instance process exited before it reported that it serves."""


class VerifyError(VtpmError):
    """Evidence given to the verifier is malformed (bytes that do not parse, a bad document)."""


class EventLogError(VerifyError):
    """An event log does not parse (not crypto-agile, truncated, inconsistent digests)."""


class LaunchError(VtpmError):
    """A measured launch was refused or failed (wrong label, an extend failed, no guest)."""
