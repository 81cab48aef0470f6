"""libvirt runs a guest's TPM: the same scenario against the real swtpm (the harness's own check)
and against vtpm's compat directory (the acceptance test of the swtpm front door).

A private libvirtd (tests/libvirt.py) with a directory of `swtpm`, `swtpm_setup`, `swtpm_ioctl`
first on its PATH runs a q35 TCG guest (Debian's kernel, a busybox initrd, `<tpm
model='tpm-crb'><backend type='emulator' version='2.0'/>`). The guest's /init reads the RSA EK
certificate's NV index 0x01c00002 through /dev/tpm0, extends PCR 16 with a known digest, prints
what it saw on the serial console and then stays up (printing PCR 16 every second), so the domain
can be saved and restored. The scenario: define + start, `virsh save` + `restore` (PCR 16 kept),
`destroy` + `start` (NV kept), `undefine --keep-tpm` (state kept) and `--tpm` (state removed),
and a domain with `<encryption secret=...>` and `<active_pcr_banks><sha256/>` booted twice."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from tests import libvirt as lvh
from tests.guest import (
    KERNELS,
    SHELL_TPM,
    build_initrd,
    console_values,
    nv_from_console,
    octal,
    pcr_extend_sha256,
    response_code,
    shell_nv_dump,
)
from tests.helpers import VTPM
from tests.mgr import ALL_GUESTS, ManagerProc, manager, new_group, owner_key
from vtpm.wire.evidence import Evidence

# quiet machine: about 70 s against swtpm, 3 min against vtpm (libvirtd's start, nine TCG boots,
# two Managers); twice that under load
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

EK_CERT_RSA = 0x01C00002
EXTEND_DIGEST = hashlib.sha256(b"vtpm libvirt acceptance test, PCR 16").digest()
PCR16 = hashlib.sha256(bytes(32) + EXTEND_DIGEST).hexdigest()  # after one extend from zero
READY = "GUEST-READY"
BOOT_TIMEOUT = 120.0

INIT = f"""#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
{SHELL_TPM}
{shell_nv_dump(EK_CERT_RSA, "EK")}
echo "EXTEND=$(tpm '{octal(pcr_extend_sha256(16, EXTEND_DIGEST))}')"
exec 3<&-
echo "BANKS=$(cd /sys/class/tpm/tpm0 && echo pcr-*)"
echo "PCR16=$(/bin/busybox cat /sys/class/tpm/tpm0/pcr-sha256/16)"
echo "{READY}"
n=0
while true; do
    /bin/busybox sleep 1
    n=$(( n + 1 ))
    echo "TICK=$n $(/bin/busybox cat /sys/class/tpm/tpm0/pcr-sha256/16)"
done
"""

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>console=ttyS0 panic=-1 quiet</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='usb' model='none'/>
    <serial type='file'>
      <source path='{console}' append='on'/>
      <target port='0'/>
    </serial>
    <tpm model='tpm-crb'>
      <backend type='emulator' version='2.0'>{backend}</backend>
    </tpm>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@dataclass(frozen=True, slots=True)
class Boot:
    """What the guest's /init printed in one boot."""

    ek_size: int
    ek_cert: bytes
    banks: tuple[str, ...]
    pcr16: str
    console: str


@dataclass
class Domain:
    lv: lvh.Libvirt
    name: str
    uuid: str
    console: Path
    xml: Path

    @classmethod
    def define(
        cls, lv: lvh.Libvirt, work: Path, initrd: Path, name: str, backend: str = ""
    ) -> Domain:
        dom_uuid = str(uuid.uuid4())
        console = work / f"{name}.console"
        xml = work / f"{name}.xml"
        xml.write_text(
            DOMAIN_XML.format(
                name=name, uuid=dom_uuid, kernel=KERNELS[-1], initrd=initrd,
                console=console, backend=backend,
            )
        )  # fmt: skip
        lv.virsh("define", str(xml))
        return cls(lv, name, dom_uuid, console, xml)

    @property
    def state_dir(self) -> Path:
        """The TPM state directory libvirt gave this domain (in the private libvirt's tree)."""
        return self.lv.dirs.swtpm_state / self.uuid

    def text(self, since: int = 0) -> str:
        if not self.console.exists():
            return ""
        return self.console.read_bytes()[since:].decode(errors="replace").replace("\r", "")

    def offset(self) -> int:
        return self.console.stat().st_size if self.console.exists() else 0

    def state(self) -> str:
        return self.lv.virsh("domstate", self.name).stdout.strip()

    def wait_console(self, since: int, done: Callable[[str], bool], what: str) -> str:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while True:
            text = self.text(since)
            if done(text):
                return text
            if time.monotonic() > deadline or self.state() != "running":
                raise AssertionError(
                    f"{self.name}: {what} not seen within {BOOT_TIMEOUT:.0f} s "
                    f"(domain {self.state()}):\n{text[-3000:]}\n{self.lv.dirs.daemon_log()}"
                )
            time.sleep(0.2)

    def start(self) -> Boot:
        since = self.offset()
        self.lv.virsh("start", self.name)
        text = self.wait_console(since, lambda t: f"\n{READY}\n" in f"\n{t}", "the guest's /init")
        size, cert = nv_from_console(text, "EK")
        extend = console_values(text, "EXTEND")
        assert len(extend) == 1 and response_code(bytes.fromhex(extend[0])) == 0, text[-3000:]
        (banks,) = console_values(text, "BANKS")
        (pcr16,) = console_values(text, "PCR16")
        return Boot(size, cert, tuple(banks.split()), pcr16.lower(), text)

    def tick_after(self, since: int) -> str:
        """PCR 16 as the guest prints it next, after console offset `since`."""
        text = self.wait_console(since, lambda t: bool(console_values(t, "TICK")), "a tick")
        return console_values(text, "TICK")[0].split()[1].lower()


def state_holds(dom: Domain, data: bytes) -> bool:
    """Whether any file in the domain's TPM state directory holds `data` in clear."""
    files = (f for f in dom.state_dir.rglob("*") if f.is_file() and not f.is_symlink())
    return any(data in f.read_bytes() for f in files)


def check_boot(boot: Boot) -> x509.Certificate:
    """What every boot must show: the RSA EK certificate, whole, and PCR 16 extended once."""
    assert boot.pcr16 == PCR16, boot.console[-3000:]
    assert boot.ek_size > 0 and len(boot.ek_cert) == boot.ek_size, boot.console[-3000:]
    return x509.load_der_x509_certificate(boot.ek_cert)


class Checks:
    """What the scenario asks of the TPM emulator beyond what the guest sees (none here)."""

    def booted(self, dom: Domain, boot: Boot) -> None:
        """After a boot: the guest's TPM is the one expected."""

    def restored(self, dom: Domain) -> None:
        """After save + restore: the TPM state (PCR 16 extended once) is kept."""

    def kept(self, dom: Domain) -> None:
        """After `undefine --keep-tpm`."""

    def removed(self, dom: Domain) -> None:
        """After `undefine --tpm`."""


def run_scenario(lv: lvh.Libvirt, work: Path, initrd: Path, checks: Checks) -> None:
    dom = Domain.define(lv, work, initrd, "lvguest1")
    first = dom.start()
    cert = check_boot(first)
    checks.booted(dom, first)
    assert dom.state_dir.is_dir(), "libvirt made no TPM state directory"

    # save + restore: the TPM's state travels in the saved image; PCR 16 is still extended once
    image = work / "lvguest1.save"
    lv.virsh("save", dom.name, str(image))
    assert dom.state() == "shut off"
    since = dom.offset()
    lv.virsh("restore", str(image))
    assert dom.tick_after(since) == PCR16, dom.text(since)[-3000:]
    checks.restored(dom)

    # destroy + start: a fresh boot on the same NV (the same EK certificate)
    lv.virsh("destroy", dom.name)
    second = dom.start()
    assert check_boot(second) == cert
    assert second.ek_cert == first.ek_cert
    checks.booted(dom, second)
    lv.virsh("destroy", dom.name)

    lv.virsh("undefine", dom.name, "--keep-tpm")
    assert dom.state_dir.is_dir(), "undefine --keep-tpm removed the TPM state"
    checks.kept(dom)
    lv.virsh("define", str(dom.xml))
    lv.virsh("undefine", dom.name, "--tpm")
    assert not dom.state_dir.exists(), "undefine --tpm kept the TPM state"
    checks.removed(dom)

    # an encrypted state and only the SHA-256 bank: booted twice, so the state opens again
    secret = str(uuid.uuid4())
    (work / "secret.xml").write_text(
        f"<secret ephemeral='no' private='yes'><uuid>{secret}</uuid>"
        "<usage type='vtpm'><name>lvguest2 vTPM</name></usage></secret>"
    )
    lv.virsh("secret-define", str(work / "secret.xml"))
    value = work / "secret.bin"
    value.write_bytes(os.urandom(32))
    lv.virsh("secret-set-value", secret, "--file", str(value), "--plain")
    value.unlink()
    backend = f"<encryption secret='{secret}'/><active_pcr_banks><sha256/></active_pcr_banks>"
    enc = Domain.define(lv, work, initrd, "lvguest2", backend)
    boot = enc.start()
    cert = check_boot(boot)
    assert boot.banks == ("pcr-sha256",), boot.console[-3000:]
    checks.booted(enc, boot)
    lv.virsh("destroy", enc.name)
    again = enc.start()
    assert check_boot(again) == cert and again.banks == ("pcr-sha256",)
    lv.virsh("destroy", enc.name)
    lv.virsh("undefine", enc.name, "--tpm")
    checks.removed(enc)


@pytest.fixture(scope="module")
def initrd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_initrd(tmp_path_factory.mktemp("initrd"), INIT)


@pytest.fixture
def work() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="lvt-", dir="/tmp"))  # short UNIX socket paths
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def need_libvirt() -> None:
    gone = lvh.missing()
    if gone:
        pytest.skip(f"needs {', '.join(gone)} (installed by ./dev install)")


def host_path() -> str:
    return os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")


class SwtpmChecks(Checks):
    """The real swtpm keeps its state in tpm2/tpm2-00.permall, in clear unless the domain has an
    `<encryption>` secret (which shows that `state_holds` finds what is there)."""

    def booted(self, dom: Domain, boot: Boot) -> None:
        assert (dom.state_dir / "tpm2" / "tpm2-00.permall").is_file()
        encrypted = "<encryption" in dom.xml.read_text()
        assert state_holds(dom, boot.ek_cert) is not encrypted


def test_libvirt_runs_the_real_swtpm(work: Path, initrd: Path) -> None:
    """The harness's own check: the scenario passes with the real swtpm."""
    need_libvirt()
    bindir = work / "bin"
    bindir.mkdir()
    for name in ("swtpm", "swtpm_setup", "swtpm_ioctl"):
        real = shutil.which(name, path="/usr/bin")
        if real is None:
            pytest.skip(f"needs /usr/bin/{name} (swtpm, swtpm-tools: ./dev install)")
        (bindir / name).symlink_to(real)
    with lvh.private_libvirt(f"{bindir}:{host_path()}") as lv:
        run_scenario(lv, work, initrd, SwtpmChecks())


# --- vtpm's compat directory -------------------------------------------------------------


def compat_dir() -> Path | None:
    """`vtpm compat dir` (or $VTPM_TEST_COMPAT_DIR, a directory written by `python -m
    vtpm.compat.install DIR`); None only when this vtpm has no `compat dir` command. A command
    that exists but finds no directory is a failed install step, not a reason to skip."""
    override = os.environ.get("VTPM_TEST_COMPAT_DIR")
    if override:
        return Path(override)
    res = subprocess.run(
        [*VTPM, "compat", "dir"], capture_output=True, text=True, check=False, timeout=60
    )
    if res.returncode == 2:  # a usage error: no such command
        return None
    assert res.returncode == 0, f"vtpm compat dir: {res.stderr.strip()}"
    d = Path(res.stdout.strip())
    assert (d / "swtpm").is_file(), f"vtpm compat dir names {d}, which has no swtpm"
    return d


@dataclass
class VtpmChecks(Checks):
    mgr: ManagerProc
    bundle: Path
    work: Path

    def listed(self) -> dict[str, Any]:
        return {v["uuid"]: v for v in self.mgr.json("list")}

    def deep_quote(self, dom: Domain, policy: dict[str, Any]) -> Evidence:
        nonce = os.urandom(16).hex()
        ev = self.work / "evidence.json"
        self.mgr.cli("quote", "--deep", dom.uuid, "--nonce", nonce, "-o", str(ev))
        pol = self.work / "policy.json"
        pol.write_text(json.dumps({"format": "vtpm-verify-policy/1", **policy}))
        res = self.mgr.cli(
            "verify", "--bundle", str(self.bundle), "--evidence", str(ev),
            "--nonce", nonce, "--policy", str(pol), "--json", check=False,
        )  # fmt: skip
        verdict = json.loads(res.stdout)
        assert res.returncode == 0 and verdict["ok"] is True, verdict
        return Evidence.from_json(json.loads(ev.read_text()))

    def booted(self, dom: Domain, boot: Boot) -> None:
        assert not state_holds(dom, boot.ek_cert), "the vTPM's state is on disk in clear"
        v = self.listed().get(dom.uuid)
        assert v is not None, f"vtpm list shows no vTPM {dom.uuid}: {self.listed()}"
        assert v["label"] == f"{dom.name}_u:vm_r:vtpm_t", v
        assert v["run"]["state"] == "running", v
        # SeaBIOS measured into this vTPM: a deep quote verifies, with PCR 0 non-zero and the
        # guest's PCR 16
        ev = self.deep_quote(dom, {"vtpm_uuid": dom.uuid, "vtpm_pcrs": {"sha256": {"16": PCR16}}})
        pcrs = ev.info.pcr_dict()
        assert pcrs[0] != bytes(32), pcrs
        assert pcrs[16].hex() == PCR16
        # the guest's EK certificate is the one the Manager issued for this vTPM
        res = subprocess.run(
            [*VTPM, "ek", "show", dom.uuid, "--format", "der", "--kind", "ek-rsa2048"],
            env=dict(os.environ, VTPM_DATA_DIR=str(self.mgr.data_dir)),
            capture_output=True,
            check=True,
        )
        assert boot.ek_cert == res.stdout

    def restored(self, dom: Domain) -> None:
        ev = self.deep_quote(dom, {"vtpm_uuid": dom.uuid, "vtpm_pcrs": {"sha256": {"16": PCR16}}})
        assert ev.info.pcr_dict()[16].hex() == PCR16

    def kept(self, dom: Domain) -> None:
        time.sleep(3)  # the Manager looks for removed state locations every ~2 s
        assert dom.uuid in self.listed(), "undefine --keep-tpm deleted the vTPM"

    def removed(self, dom: Domain) -> None:
        deadline = time.monotonic() + 15
        while dom.uuid in self.listed():
            assert time.monotonic() < deadline, "undefine --tpm left the vTPM in `vtpm list`"
            time.sleep(0.5)


def copy_state(src: Path, dst: Path) -> None:
    """The files of state directory `src` into `dst` (the directory itself stays: its inode is
    how the Manager knows it)."""
    for f in sorted(src.rglob("*")):
        target = dst / f.relative_to(src)
        if f.is_dir():
            target.mkdir(exist_ok=True)
        elif f.is_file():
            shutil.copy2(f, target)


def rollback_scenario(lv: lvh.Libvirt, work: Path, initrd: Path, m: ManagerProc) -> None:
    """An older copy of the state put back is refused at `virsh start` with a message naming
    `vtpm accept-state`; after that command the domain starts on the older state."""

    def stopped() -> None:  # the instance has stored its last state
        deadline = time.monotonic() + 30
        while m.json("show", dom.uuid)["run"]["state"] == "running":
            assert time.monotonic() < deadline, f"vTPM {dom.uuid} still runs after destroy"
            time.sleep(0.2)

    dom = Domain.define(lv, work, initrd, "lvguest3")
    first = dom.start()
    lv.virsh("destroy", dom.name)
    stopped()
    old = work / "old-state"
    shutil.copytree(dom.state_dir, old, symlinks=True)
    check_boot(dom.start())  # TPM2_Startup and Shutdown change the NV state: a newer one
    lv.virsh("destroy", dom.name)
    stopped()
    copy_state(old, dom.state_dir)
    res = lv.virsh("start", dom.name, check=False)
    swtpm_log = lv.dirs.log / "swtpm" / "libvirt" / "qemu" / f"{dom.name}-swtpm.log"
    said = res.stderr + (swtpm_log.read_text(errors="replace") if swtpm_log.exists() else "")
    assert res.returncode != 0, "an older state put back was used"
    assert f"vtpm accept-state {dom.uuid}" in said, said[-3000:]
    m.cli("accept-state", dom.uuid)
    again = dom.start()
    assert check_boot(again) == check_boot(first)
    lv.virsh("destroy", dom.name)
    lv.virsh("undefine", dom.name, "--tpm")


def test_libvirt_runs_vtpm_through_the_compat_directory(work: Path, initrd: Path) -> None:
    """The acceptance test of the swtpm front door: the same scenario with vtpm's compat
    directory first on libvirt's PATH and a Manager with the front door enabled."""
    compat = compat_dir()
    if compat is None:
        pytest.skip("this vtpm has no `vtpm compat dir` command (the front door is not built)")
    need_libvirt()
    data = work / "data"
    sock = work / "compat.sock"
    with manager(data) as m:
        new_group(m, "guests", owner_key(work), labels=(ALL_GUESTS,))
        m.cli("compat", "enable", "--group", "guests", "--socket", str(sock))
    env = {"VTPM_COMPAT_SOCKET": str(sock)}
    # the front door opens at the Manager's start; the Manager runs in libvirt's mount namespace,
    # so the state locations it records are the ones libvirt creates and removes
    with (
        lvh.private_libvirt(f"{compat}:{host_path()}", env) as lv,
        manager(data, prefix=lv.in_namespace()) as m,
    ):
        bundle = work / "bundle.json"
        m.cli("group", "provision", "guests", "-o", str(bundle))
        try:
            run_scenario(lv, work, initrd, VtpmChecks(m, bundle, work))
            rollback_scenario(lv, work, initrd, m)
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- manager.log\n{m.log()[-5000:]}") from None
