"""The compat programs' command lines, as the orchestrators write them (libvirt, Proxmox, Incus,
LXD, the tpm2-tools harness), parsed into their dataclasses; refusals are one line."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from vtpm.compat import capabilities, frontdoor, ioctl, setup
from vtpm.compat.options import Kind, Spec, Treat, UsageError, parse, suboptions
from vtpm.compat.setup_args import OverwriteArg, SetupAction, parse_setup_args, vmid
from vtpm.compat.socket_args import (
    Action,
    Listen,
    ListenKind,
    LogArg,
    PidArg,
    SecretSource,
    SocketArgs,
    StateArg,
    parse_socket_args,
)

VM = "3f1e1c52-8a7b-4a55-9a34-9d1c2c0f3b11"


def sock(cmdline: str) -> SocketArgs:
    return parse_socket_args(cmdline.split())


# the generic grammar ----------------------------------------------------------------------


def test_both_value_forms_and_pairs() -> None:
    specs = [Spec(("--a",), Kind.VALUE), Spec(("-f",)), Spec(("--save",), Kind.PAIR)]
    one = parse(["--a", "x=1,y", "-f", "--save", "volatile", "F"], specs)
    two = parse(["--a=x=1,y", "-f", "--save=volatile", "F"], specs)
    assert one == two
    assert one.values == {"--a": ("x=1,y",), "-f": ("",), "--save": ("volatile F",)}


def test_unknown_options_are_noted_not_fatal() -> None:
    p = parse(["--new-thing", "v", "--other=1", "--flagonly", "-x"], [Spec(("-x",))])
    assert p.values == {"-x": ("",)}
    assert len(p.notes) == 3
    assert "--new-thing" in p.notes[0] and "(v)" in p.notes[0]


def test_refused_and_malformed_options_are_one_line() -> None:
    specs = [Spec(("--no",), Kind.VALUE, Treat.REFUSED, "not here"), Spec(("--v",), Kind.VALUE)]
    with pytest.raises(UsageError, match=r"^--no: not here$"):
        parse(["--no", "x"], specs)
    with pytest.raises(UsageError, match="needs a value"):
        parse(["--v"], specs)
    with pytest.raises(UsageError, match="takes no value"):
        parse(["--f=1"], [Spec(("--f",))])


def test_suboptions() -> None:
    notes: list[str] = []
    sub = suboptions(
        "type=unixio,path=/a,b,zz=1,,path=/c", "--ctrl", ("type", "path", "b"), notes=notes
    )
    assert sub.items == (("type", "unixio"), ("b", ""), ("path", "/c"))
    assert notes and "zz" in notes[0]
    with pytest.raises(UsageError, match="--ctrl clientfd: no"):
        suboptions("clientfd=4", "--ctrl", ("type",), refused={"clientfd": "no"})


# swtpm socket -----------------------------------------------------------------------------


def test_libvirt_socket(tmp_path: Path) -> None:
    st = tmp_path / VM / "tpm2"
    a = parse_socket_args(
        [
            "socket",
            "--ctrl",
            f"type=unixio,path={tmp_path}/s.sock,mode=0600",
            "--tpmstate",
            f"dir={st},mode=0600",
            "--log",
            f"file={tmp_path}/log",
            "--terminate",
            "--tpm2",
            "--key",
            "pwdfd=7,mode=aes-256-cbc",
            "--migration-key",
            "pwdfd=8,mode=aes-256-cbc",
        ]
    )
    assert a.action is Action.RUN
    assert a.state == StateArg("dir", str(st), 0o600)
    assert a.ctrl == Listen(ListenKind.UNIX, path=f"{tmp_path}/s.sock", mode=0o600)
    assert a.server is None
    assert a.terminate and not a.daemon and a.pid is None
    assert a.log == LogArg(path=f"{tmp_path}/log")
    assert a.key == SecretSource(fd=7) and a.migration_key == SecretSource(fd=8)
    assert not a.incoming and not a.release_lock_outgoing
    assert a.notes == ()


def test_proxmox_socket() -> None:
    a = parse_socket_args(
        [
            "socket",
            "--tpmstate",
            "backend-uri=file:///dev/pve/vm-100-disk-1,mode=0600",
            "--ctrl",
            "type=unixio,path=/var/run/qemu-server/100.swtpm,mode=0600",
            "--pid",
            "file=/var/run/qemu-server/100.swtpm.pid",
            "--terminate",
            "--daemon",
            "--log",
            "file=/run/qemu-server/100-swtpm.log,level=1,prefix=[id=1700000000]",
            "--tpm2",
        ]
    )
    assert a.state == StateArg("file", "/dev/pve/vm-100-disk-1", 0o600)
    assert a.ctrl == Listen(ListenKind.UNIX, path="/var/run/qemu-server/100.swtpm")
    assert a.pid == PidArg(path="/var/run/qemu-server/100.swtpm.pid")
    assert a.daemon and a.terminate
    assert a.log == LogArg(path="/run/qemu-server/100-swtpm.log", level=1, prefix="[id=1700000000]")


def test_incus_relative_path_and_lxd_fd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    a = sock("socket --tpm2 --tpmstate dir=tpm --ctrl type=unixio,path=tpm/swtpm-0.sock")
    assert a.state == StateArg("dir", str(tmp_path / "tpm"))
    assert a.ctrl == Listen(ListenKind.UNIX, path="tpm/swtpm-0.sock")
    b = sock("socket --tpm2 --tpmstate dir=/d --ctrl type=unixio,fd=3")
    assert b.ctrl == Listen(ListenKind.FD, fd=3)
    for form in ("incoming", "release-lock-outgoing,incoming", "release-lock-outgoing"):
        with pytest.raises(UsageError, match="--migration: moving a running vTPM"):
            sock(f"socket --tpm2 --tpmstate dir=/d --migration {form} --ctrl=type=unixio,path=/s")


def test_tpm2_tools_harness_forms() -> None:
    a = sock(
        "socket --tpm2 --server port=2321 --ctrl type=tcp,port=2322 --seccomp action=none "
        "--flags not-need-init --tpmstate dir=/tmp/x"
    )
    assert a.server == Listen(ListenKind.TCP, port=2321)
    assert a.ctrl == Listen(ListenKind.TCP, port=2322)
    assert not a.startup_clear
    assert any("--seccomp" in n for n in a.notes)
    b = sock(
        "socket --tpm2 --server type=tcp,port=2321,bindaddr=::1 --ctrl type=tcp,port=2322,"
        "bindaddr=127.0.0.2 --flags not-need-init,startup-clear --tpmstate dir=/tmp/x"
    )
    assert b.server == Listen(ListenKind.TCP, host="::1", port=2321)
    assert b.ctrl == Listen(ListenKind.TCP, host="127.0.0.2", port=2322)
    assert b.startup_clear
    c = sock("socket --tpm2 -p 2321 --tpmstate dir=/x")
    assert c.server == Listen(ListenKind.TCP, port=2321)


def test_ctrl_terminate_suboption_and_key_forms(tmp_path: Path) -> None:
    a = sock("socket --tpm2 --tpmstate dir=/d --ctrl type=unixio,path=/s,terminate --key fd=5")
    assert a.terminate and a.key == SecretSource(fd=5)
    b = sock(
        "socket --tpm2 --tpmstate dir=/d --ctrl type=unixio,path=/s "
        f"--key pwdfile={tmp_path}/p,remove"
    )
    assert b.key == SecretSource(path=f"{tmp_path}/p", remove=True)


@pytest.mark.parametrize(
    ("cmdline", "message"),
    [
        ("socket --tpmstate dir=/d --ctrl type=unixio,path=/s", "TPM 1.2 is not supported"),
        ("socket --tpm2 --ctrl type=unixio,path=/s", "--tpmstate is required"),
        ("socket --tpm2 --tpmstate dir=/d", "nothing to serve"),
        ("socket --tpm2 --tpmstate dir=/d --ctrl type=unixio,clientfd=4", "clientfd"),
        ("socket --tpm2 --tpmstate dir=/d --ctrl type=unixio,path=/s,mode=0666", "every user"),
        ("socket --tpm2 --tpmstate dir=/d --ctrl type=tcp", "needs port"),
        ("socket --tpm2 --tpmstate backend-uri=nvme://x --ctrl type=tcp,port=1", "nvme://"),
        ("socket --tpm2 --tpmstate dir=/d --ctrl type=tcp,port=1 --chroot /x", "--chroot"),
        (
            "socket --tpm2 --tpmstate dir=/d --ctrl type=tcp,port=1 --flags startup-state",
            "startup-state",
        ),
        (
            "socket --tpm2 --tpmstate dir=/d --ctrl type=tcp,port=1 --key pwdfd=3,mode=rot13",
            "rot13",
        ),
        ("socket --tpm2 --tpmstate dir=/d --ctrl type=tcp,port=1 --profile name=x", "profiles"),
        ("cuse --tpm2 --tpmstate dir=/d", "cuse is not supported"),
        ("chardev --tpm2 --tpmstate dir=/d --vtpm-proxy", "/dev/vtpmx"),
        ("--tpm2", "first argument must be socket"),
    ],
)
def test_socket_refusals(cmdline: str, message: str) -> None:
    if "vtpm-proxy" in cmdline and os.path.exists("/dev/vtpmx"):
        message = "chardev is not supported"
    with pytest.raises(UsageError, match=message) as err:
        sock(cmdline)
    assert "\n" not in str(err.value)


def test_socket_actions() -> None:
    assert sock("socket --print-capabilities").action is Action.CAPABILITIES
    assert sock("--version").action is Action.VERSION
    assert sock("socket --help").action is Action.HELP


# swtpm_setup ------------------------------------------------------------------------------


def test_libvirt_setup(tmp_path: Path) -> None:
    st = f"/var/lib/libvirt/swtpm/{VM}/tpm2"
    a = parse_setup_args(
        f"--tpm2 --tpm-state {st} --vmid guest1:{VM} --logfile {tmp_path}/l --createek "
        "--create-ek-cert --create-platform-cert --lock-nvram --not-overwrite "
        "--pwdfile-fd 9 --cipher aes-256-cbc".split()
    )
    assert a.action is SetupAction.SETUP
    assert a.state == StateArg("dir", st)
    assert (a.vm_name, a.vm_uuid) == ("guest1", uuid.UUID(VM))
    assert a.eks == ("rsa2048",) and a.ek_certs and a.platform_cert and a.lock_nvram
    assert a.overwrite is OverwriteArg.KEEP
    assert a.secret == SecretSource(fd=9)
    assert a.logfile == f"{tmp_path}/l"
    b = parse_setup_args(
        f"--tpm2 --tpm-state {st} --logfile L --pcr-banks sha256 --reconfigure".split()
    )
    assert b.reconfigure and b.pcr_banks == ("sha256",) and b.eks == ()
    assert b.vm_uuid is None and b.vm_name is None  # the Manager reads the uuid in the path
    assert b.overwrite is OverwriteArg.FAIL


def test_proxmox_setup() -> None:
    a = parse_setup_args(
        [
            "--tpmstate",
            "file:///dev/pve/vm-100-disk-1",
            "--createek",
            "--create-ek-cert",
            "--create-platform-cert",
            "--lock-nvram",
            "--config",
            "/etc/swtpm_setup.conf",
            "--runas",
            "0",
            "--not-overwrite",
            "--tpm2",
            "--ecc",
        ]
    )
    assert a.state == StateArg("file", "/dev/pve/vm-100-disk-1")
    assert a.eks == ("ecc256",) and a.vm_uuid is None
    assert len(a.notes) == 2  # --config and --runas: accepted, ignored, logged


def test_setup_small_things() -> None:
    assert parse_setup_args(["--print-capabilities"]).action is SetupAction.CAPABILITIES
    got = parse_setup_args(["--create-config-files", "skip-if-exist"])
    assert got.action is SetupAction.CONFIG_FILES
    assert (
        parse_setup_args(["--tpm2", "--tpm-state=/d", "--overwrite"]).overwrite
        is OverwriteArg.REPLACE
    )
    only_cert = parse_setup_args(["--tpm2", "--tpm-state", "/d", "--create-ek-cert"])
    assert only_cert.eks == ("rsa2048",)  # a certificate needs an EK
    assert vmid("vm:with:colons") == ("vm:with:colons", None)
    assert vmid(VM) == (None, uuid.UUID(VM))


@pytest.mark.parametrize(
    ("cmdline", "message"),
    [
        ("--tpm-state /d --createek", "TPM 1.2"),
        ("--tpm2", "--tpm-state"),
        ("--tpm2 --tpm-state /d --overwrite --not-overwrite", "contradict"),
        ("--tpm2 --tpm-state /d --pcr-banks sha3", "sha3"),
        ("--tpm2 --tpm-state /d --reconfigure", "needs --pcr-banks"),
        ("--tpm2 --tpm-state /d --rsa-keysize 3072", "only 2048"),
        ("--tpm2 --tpm-state /d --allow-signing", "signing"),
        ("--tpm2 --tpm-state /d --take-ownership", "TPM 1.2"),
        ("--create-config-files bogus", "bogus"),
    ],
)
def test_setup_refusals(cmdline: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_setup_args(cmdline.split())


# swtpm_ioctl ------------------------------------------------------------------------------


def test_ioctl_args() -> None:
    a = ioctl.parse_ioctl_args(["--unix", "/run/s.sock", "-s"])
    assert a == ioctl.IoctlArgs(ioctl.Op.SHUTDOWN, "", "/run/s.sock", None)
    b = ioctl.parse_ioctl_args(["--tcp", ":2322", "--info", "3"])
    assert b == ioctl.IoctlArgs(ioctl.Op.INFO, "3", None, ("127.0.0.1", 2322))
    c = ioctl.parse_ioctl_args(["--tcp=localhost", "--save", "permanent", "/tmp/f"])
    assert c == ioctl.IoctlArgs(ioctl.Op.SAVE, "permanent /tmp/f", None, ("localhost", 6546))
    with pytest.raises(UsageError, match="exactly one"):
        ioctl.parse_ioctl_args(["--unix", "/s"])
    with pytest.raises(UsageError, match="one command at a time"):
        ioctl.parse_ioctl_args(["--unix", "/s", "-i", "-s"])
    with pytest.raises(UsageError, match="character devices"):
        ioctl.parse_ioctl_args(["-c", "/dev/vtpm0"])


# capabilities -----------------------------------------------------------------------------


def test_capabilities_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert frontdoor.run(["socket", "--print-capabilities"], {}, print) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["type"] == "swtpm"
    # what libvirt looks for, and never TPM 1.2
    assert {"cmdarg-pwd-fd", "tpm-2.0"} <= set(doc["features"])
    assert "cmdarg-migration" not in doc["features"]  # --migration is refused
    assert "tpm-1.2" not in doc["features"]
    assert setup.run(["--print-capabilities"], {}, print) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["type"] == "swtpm_setup"
    want = {
        "tpm-2.0",
        "cmdarg-pwdfile-fd",
        "cmdarg-create-config-files",
        "cmdarg-reconfigure-pcr-banks",
    }
    assert want <= set(doc["features"]) and "tpm-1.2" not in doc["features"]
    assert "tpm12-not-need-root" not in doc["features"]
    assert len(set(capabilities.SWTPM_FEATURES)) == len(capabilities.SWTPM_FEATURES)


def test_state_uri_forms() -> None:
    a = sock("socket --tpm2 --tpmstate backend-uri=dir:///var/x --ctrl type=unixio,path=/s")
    assert a.state == StateArg("dir", "/var/x")
    b = parse_setup_args(["--tpm2", "--tpmstate", "dir:///var/y"])
    assert b.state == StateArg("dir", "/var/y")


@pytest.mark.parametrize(
    "runner",
    [
        lambda argv: frontdoor.run(argv, {}, print),
        lambda argv: setup.run(argv, {}, print),
        lambda argv: ioctl.run(argv, print),
    ],
)
def test_help_and_version(runner: object, capsys: pytest.CaptureFixture[str]) -> None:
    assert callable(runner)
    assert runner(["--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: ")
    assert runner(["--version"]) == 0
    assert capsys.readouterr().out.startswith("vtpm ")
