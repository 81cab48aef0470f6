"""`swtpm_setup`: the command line, as a frozen `SetupArgs`.

What orchestrators pass (all parsed here): libvirt `--tpm2 --tpm-state DIR --vmid NAME:UUID
--logfile LOG --createek --create-ek-cert --create-platform-cert --lock-nvram --not-overwrite`
(`--pwdfile-fd N --cipher aes-256-cbc` for an encrypted state; `--pcr-banks sha256 --reconfigure`
to change banks; `--create-config-files skip-if-exist`; `--print-capabilities`), Proxmox
`--tpmstate file://VOL ... --config /etc/swtpm_setup.conf --runas 0 --not-overwrite --tpm2 --ecc`.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass

from vtpm.compat.options import Kind, Spec, Treat, UsageError, parse, parse_int
from vtpm.compat.socket_args import SecretSource, StateArg, state_uri

PROGRAM = "swtpm_setup"
PCR_BANKS = ("sha1", "sha256", "sha384", "sha512")


class SetupAction(enum.StrEnum):
    SETUP = "setup"
    VERSION = "version"
    HELP = "help"
    CAPABILITIES = "capabilities"
    CONFIG_FILES = "config-files"  # --create-config-files: nothing to create here


class OverwriteArg(enum.StrEnum):
    """The values of `vtpm.wire.compat.Overwrite`."""

    FAIL = "fail"
    KEEP = "keep"
    REPLACE = "replace"


@dataclass(frozen=True, slots=True)
class SetupArgs:
    action: SetupAction
    state: StateArg | None = None
    vm_name: str | None = None
    vm_uuid: uuid.UUID | None = None
    eks: tuple[str, ...] = ()
    ek_certs: bool = False
    platform_cert: bool = False
    lock_nvram: bool = False
    pcr_banks: tuple[str, ...] = ()
    reconfigure: bool = False
    overwrite: OverwriteArg = OverwriteArg.FAIL
    secret: SecretSource | None = None
    logfile: str | None = None
    notes: tuple[str, ...] = ()


_V = Kind.VALUE
_TPM12 = "a TPM 1.2 option: TPM 1.2 is not supported"
SPECS = (
    Spec(("--tpm2",)),
    Spec(("--tpm-state", "--tpmstate"), _V),
    Spec(("--vmid",), _V),
    Spec(("--logfile",), _V),
    Spec(("--createek",)),
    Spec(("--ecc",)),
    Spec(("--create-ek-cert",)),
    Spec(("--create-platform-cert",)),
    Spec(("--lock-nvram",)),
    Spec(("--not-overwrite",)),
    Spec(("--overwrite",)),
    Spec(("--pcr-banks",), _V),
    Spec(("--reconfigure",)),
    Spec(("--pwdfile-fd",), _V),
    Spec(("--pwdfile",), _V),
    Spec(("--keyfile-fd",), _V),
    Spec(("--keyfile",), _V),
    Spec(("--cipher",), _V),
    Spec(("--rsa-keysize",), _V),
    Spec(("--decryption",)),
    Spec(("--create-config-files",), _V),
    Spec(("--print-capabilities",)),
    Spec(("--version",)),
    Spec(("--help", "-h")),
    Spec(
        ("--config",),
        _V,
        Treat.IGNORED,
        "certificates come from the vTPM's group CA in the Manager, no tool is configured",
    ),
    Spec(("--runas",), _V, Treat.IGNORED, "the Manager creates the vTPM, no user is switched"),
    Spec(("--tpm",), _V, Treat.IGNORED, "no swtpm is started here: the Manager runs the vTPM"),
    Spec(("--swtpm_ioctl",), _V, Treat.IGNORED, "no swtpm is started here"),
    Spec(("--display",), Kind.FLAG, Treat.IGNORED, "use `vtpm ek UUID` to see the EKs"),
    Spec(("--allow-signing",), Kind.FLAG, Treat.REFUSED, "signing EKs are not supported"),
    Spec(("--write-ek-cert-files",), _V, Treat.REFUSED, "not supported: use `vtpm ek UUID`"),
    Spec(
        ("--profile", "--profile-name", "--profile-file"),
        _V,
        Treat.REFUSED,
        "TPM profiles are not supported",
    ),
    Spec(("--profile-remove-disabled",), _V, Treat.REFUSED, "TPM profiles are not supported"),
    Spec(("--print-profiles",), Kind.FLAG, Treat.REFUSED, "TPM profiles are not supported"),
    Spec(("--tcsd-system-ps-file",), _V, Treat.REFUSED, _TPM12),
    Spec(
        ("--take-ownership", "--owner-well-known", "--srk-well-known"),
        Kind.FLAG,
        Treat.REFUSED,
        _TPM12,
    ),
    Spec(("--ownerpass", "--srkpass"), _V, Treat.REFUSED, _TPM12),
)


def vmid(text: str) -> tuple[str | None, uuid.UUID | None]:
    """`NAME:UUID` (libvirt), `UUID`, or a name alone."""
    name, sep, tail = text.rpartition(":")
    for candidate, rest in ((tail, name if sep else None), (text, None)):
        try:
            return (rest or None), uuid.UUID(candidate)
        except ValueError:
            continue
    return text or None, None


def _secret(p_fd: str | None, p_file: str | None, what: str) -> SecretSource | None:
    if p_fd is not None:
        return SecretSource(fd=parse_int(p_fd, what + "-fd", 0, 1 << 20))
    if p_file is not None:
        return SecretSource(path=p_file)
    return None


def parse_setup_args(argv: list[str]) -> SetupArgs:
    p = parse(argv, SPECS)
    notes = list(p.notes)
    if p.has("--help"):
        return SetupArgs(SetupAction.HELP)
    if p.has("--version"):
        return SetupArgs(SetupAction.VERSION)
    if p.has("--print-capabilities"):
        return SetupArgs(SetupAction.CAPABILITIES)
    if p.has("--create-config-files"):
        for part in (p.last("--create-config-files") or "").split(","):
            if part and part not in ("overwrite", "skip-if-exist", "root"):
                raise UsageError(f"--create-config-files: {part!r} is not an option of it")
        return SetupArgs(SetupAction.CONFIG_FILES)
    if p.positional:
        raise UsageError(f"unexpected argument {p.positional[0]!r}")
    if not p.has("--tpm2"):
        raise UsageError("TPM 1.2 is not supported: pass --tpm2")
    text = p.last("--tpm-state")
    if text is None:
        raise UsageError("--tpm-state DIR (or --tpmstate file://FILE) is required")
    state = state_uri(text, "--tpm-state")
    name, vm_uuid = vmid(p.last("--vmid") or "")  # without: the Manager looks in the path
    keysize = p.last("--rsa-keysize")
    if keysize is not None and keysize != "2048":
        raise UsageError(f"--rsa-keysize {keysize}: only 2048 is supported")
    cipher = p.last("--cipher")
    if cipher is not None and cipher not in ("aes-128-cbc", "aes-256-cbc"):
        raise UsageError(f"--cipher {cipher}: aes-128-cbc or aes-256-cbc")
    if p.has("--overwrite") and p.has("--not-overwrite"):
        raise UsageError("--overwrite and --not-overwrite contradict each other")
    overwrite = (
        OverwriteArg.REPLACE
        if p.has("--overwrite")
        else OverwriteArg.KEEP
        if p.has("--not-overwrite")
        else OverwriteArg.FAIL
    )
    banks: tuple[str, ...] = ()
    if p.last("--pcr-banks") is not None:
        banks = tuple(b.strip() for b in (p.last("--pcr-banks") or "").split(",") if b.strip())
        bad = [b for b in banks if b not in PCR_BANKS]
        if bad or not banks:
            raise UsageError(
                f"--pcr-banks: {','.join(bad) or 'empty'}: one or more of {','.join(PCR_BANKS)}"
            )
    reconfigure = p.has("--reconfigure")
    if reconfigure and not banks:
        raise UsageError("--reconfigure needs --pcr-banks")
    ek_certs = p.has("--create-ek-cert")
    platform = p.has("--create-platform-cert")
    createek = p.has("--createek") or ek_certs or platform  # the certificates need an EK
    secret = _secret(p.last("--pwdfile-fd"), p.last("--pwdfile"), "--pwdfile")
    secret = secret or _secret(p.last("--keyfile-fd"), p.last("--keyfile"), "--keyfile")
    return SetupArgs(
        SetupAction.SETUP,
        state=state,
        vm_name=name,
        vm_uuid=vm_uuid,
        eks=(("ecc256",) if p.has("--ecc") else ("rsa2048",))
        if createek and not reconfigure
        else (),
        ek_certs=ek_certs and not reconfigure,
        platform_cert=platform and not reconfigure,
        lock_nvram=p.has("--lock-nvram"),
        pcr_banks=banks,
        reconfigure=reconfigure,
        overwrite=overwrite,
        secret=secret,
        logfile=p.last("--logfile"),
        notes=tuple(notes),
    )


HELP = """\
usage: swtpm_setup --tpm2 --tpm-state DIR|file://FILE [OPTIONS]

vtpm's swtpm_setup: asks the vTPM Manager (socket $VTPM_COMPAT_SOCKET, default
/run/vtpm/compat.sock) to create the vTPM of this state location, keyed and labelled by the
Manager (group from its compat configuration, label NAME_u:vm_r:vtpm_t), with EKs and
certificates from the group's CA. It holds no key.

  --tpm2                       required (TPM 1.2 is not supported)
  --tpm-state DIR | --tpmstate dir://DIR | file://FILE
  --vmid NAME:UUID             the vTPM's uuid and the user field of its label
  --createek [--ecc]           an RSA-2048 EK (ECC P-256 with --ecc)
  --create-ek-cert --create-platform-cert --lock-nvram
  --not-overwrite | --overwrite    keep / replace an existing vTPM (default: refuse)
  --pcr-banks sha256[,...] [--reconfigure]   (--reconfigure: change the banks only)
  --pwdfile-fd N | --pwdfile F | --keyfile-fd N | --keyfile F [--cipher aes-256-cbc]
                               a passphrase mixed into the vTPM's key by the Manager
  --rsa-keysize 2048  --decryption     accepted (the only supported form)
  --logfile F                  the result is also written there
  --create-config-files [skip-if-exist|overwrite][,root]
                               succeeds: there are no per-user configuration files to create
  --config F, --runas U, --tpm P, --swtpm_ioctl P, --display    accepted and ignored: the
                               Manager creates the vTPM and its certificates, no user is switched
  --print-capabilities  --version  --help
"""
