"""Measured launch end to end: a real Manager and instances, tpm2-tools as the firmware and the
guest (`--no-guest`), tpm2-tools' own event-log parser, and `vtpm verify` on a tpm2_quote.
The QEMU boot of a real kernel is in test_launch_qemu.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    VTPM,
    ctrl_call,
    free_port_pair,
    instance,
    power_cycle,
    raw_call,
    start_instance,
    tpm2,
)
from tests.mgr import GUEST1, GUEST2, ManagerProc, manager, new_group, new_vtpm, owner_key
from vtpm.launch import digests
from vtpm.launchrecord import LaunchRecord
from vtpm.tpm import frames
from vtpm.tpm.constants import TPM_ALG
from vtpm.wire import ctrl

pytestmark = pytest.mark.integration

SECRET = b"disk key of the guest booted from kernel A"
PRIMARY = "0x81000001"
CMDLINE = "console=ttyS0 root=/dev/vda1 ro"
BANKS = {"sha1": TPM_ALG.SHA1, "sha256": TPM_ALG.SHA256}
BANKS |= {"sha384": TPM_ALG.SHA384, "sha512": TPM_ALG.SHA512}


def tcti(port: int) -> str:
    return f"swtpm:host=127.0.0.1,port={port}"


def read_pcrs(port: int, alg: int, pcrs: list[int]) -> dict[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        values = frames.parse_pcr_read(raw_call(s, frames.pcr_read(alg, pcrs)))
    return dict(zip(pcrs, values, strict=True))


def tool(
    work: Path, t: str, *argv: str, input_: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    """A tpm2-tools command; swtpm has no resource manager, so flush after each one."""
    res = tpm2(argv[0], *argv[1:], tcti=t, cwd=work, input_=input_, check=check)
    for kind in ("-t", "-l", "-s"):
        tpm2("flushcontext", kind, tcti=t, cwd=work)
    return res


@pytest.fixture
def mgr() -> Iterator[ManagerProc]:
    """A Manager in a short directory: its vTPMs' UNIX sockets must fit in 107 bytes."""
    data = Path(tempfile.mkdtemp(prefix="vtpm-launch-", dir="/tmp"))
    try:
        with manager(data / "data") as m:
            yield m
    finally:
        shutil.rmtree(data, ignore_errors=True)


def new_vtpm_with_unix_ctrl(m: ManagerProc) -> tuple[Any, int]:
    """A vTPM with raw + ctrl on TCP (tpm2-tools) and a UNIX control socket (QEMU)."""
    port = free_port_pair()
    args = ["new", "--group", "guests", "--label", GUEST1, "--start"]
    args += ["--server", f"tcp:127.0.0.1:{port}", "--ctrl", f"tcp:127.0.0.1:{port + 1}"]
    args += ["--ctrl", f"unix:{m.data_dir / 'run' / 'q.ctrl'}"]
    return m.json(*args), port


@pytest.fixture
def guest_files(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name, content in (("vmlinuz-a", b"kernel A" * 4096), ("vmlinuz-b", b"kernel B" * 4096)):
        out[name] = tmp_path / name
        out[name].write_bytes(content)
    out["initrd"] = tmp_path / "initrd.img"
    out["initrd"].write_bytes(b"initrd" * 1000)
    return out


def launch_args(kernel: Path, initrd: Path, cmdline: str = CMDLINE) -> list[str]:
    return ["--kernel", str(kernel), "--initrd", str(initrd), "--append", cmdline]


def seal(work: Path, t: str) -> None:
    """A secret sealed under the vTPM's current PCR 4 and 5 (sha256)."""
    tool(work, t, "createprimary", "-C", "o", "-c", "primary.ctx")
    tool(work, t, "evictcontrol", "-C", "o", "-c", "primary.ctx", PRIMARY)
    tool(work, t, "createpolicy", "--policy-pcr", "-l", "sha256:4,5", "-L", "pcr.policy")
    tool(
        work, t, "create", "-C", PRIMARY, "-L", "pcr.policy", "-i-", "-u", "s.pub", "-r", "s.priv",
        input_=SECRET,
    )  # fmt: skip


def unseal(work: Path, t: str) -> subprocess.CompletedProcess[bytes]:
    tool(work, t, "load", "-C", PRIMARY, "-u", "s.pub", "-r", "s.priv", "-c", "s.ctx")
    return tool(work, t, "unseal", "-c", "s.ctx", "-p", "pcr:sha256:4,5", check=False)


def quote_and_verify(
    work: Path, t: str, policy: Path, log: Path
) -> subprocess.CompletedProcess[str]:
    """tpm2_quote over sha256 PCR 4,5 with a fresh AK, checked by `vtpm verify`."""
    tool(work, t, "createek", "-c", "ek.ctx", "-G", "ecc", "-u", "ek.pub")
    tool(
        work, t, "createak", "-C", "ek.ctx", "-c", "ak.ctx", "-G", "ecc", "-g", "sha256", "-s",
        "ecdsa", "-u", "ak.pub", "-n", "ak.name", "-q", "ak.qname",
    )  # fmt: skip
    nonce = os.urandom(16).hex()
    tool(
        work, t, "quote", "-c", "ak.ctx", "-l", "sha256:4,5", "-q", nonce, "-m", "q.msg",
        "-s", "q.sig", "-o", "q.pcrs",
    )  # fmt: skip
    argv = [*VTPM, "verify", "--ak-public", str(work / "ak.pub")]
    argv += ["--ak-qualified-name", str(work / "ak.qname"), "--quote", str(work / "q.msg")]
    argv += ["--signature", str(work / "q.sig"), "--pcrs", str(work / "q.pcrs")]
    argv += ["--nonce", nonce, "--policy", str(policy), "--event-log", str(log)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def deep_quote_and_verify(
    m: ManagerProc, work: Path, u: str, policy: Path, log: Path
) -> subprocess.CompletedProcess[str]:
    """A deep quote of the vTPM asked on the host, checked by `vtpm verify` with the log."""
    bundle, evidence, nonce = work / "bundle.json", work / "evidence.json", os.urandom(8).hex()
    if not bundle.exists():
        m.cli("group", "provision", "guests", "-o", str(bundle))
    m.cli("quote", "--deep", u, "--nonce", nonce, "-o", str(evidence))
    return m.cli(
        "verify", "--bundle", str(bundle), "--evidence", str(evidence), "--nonce", nonce,
        "--policy", str(policy), "--event-log", str(log),
        check=False,
    )  # fmt: skip


def lines(result: subprocess.CompletedProcess[str], prefix: str) -> list[str]:
    return [ln for ln in result.stdout.splitlines() if ln.startswith(prefix)]


def test_launch_binds_secrets_to_kernel_cmdline_and_initrd(
    tmp_path: Path, mgr: ManagerProc, guest_files: dict[str, Path]
) -> None:
    new_group(mgr, "guests", owner_key(tmp_path))
    v, port = new_vtpm(mgr, "guests", GUEST1)
    u, t = v["uuid"], tcti(port)
    a, b, initrd = guest_files["vmlinuz-a"], guest_files["vmlinuz-b"], guest_files["initrd"]
    # something earlier in PCR 4, saved with the instance's Shutdown(STATE) when it stops
    tpm2("startup", "-c", tcti=t)
    tpm2("pcrextend", f"4:sha256={'ab' * 32}", tcti=t)

    policy = tmp_path / "expected-a.json"
    mgr.cli("launch", "reference", *launch_args(a, initrd), "-o", str(policy))
    expected = json.loads(policy.read_text())
    assert expected["format"] == "vtpm-verify-policy/1"
    assert [e["data"] for e in expected["event_log"]["events"]] == [
        "kernel vmlinuz-a",
        f"cmdline {CMDLINE}",
        "initrd initrd.img",
    ]

    out = mgr.json("launch", u, *launch_args(a, initrd), "--no-guest", "--vtpm-label", GUEST1)
    assert out["guest"] is None
    assert out["expected_pcrs"]["sha256"] == expected["vtpm_pcrs"]["sha256"]
    log = Path(out["event_log"])
    assert not log.exists()  # written when the launch is applied
    # the vTPM is fresh: nothing to resume, and the earlier PCR 4 is gone
    res = tpm2("startup", tcti=t, check=False)
    assert res.returncode != 0 and b"value is out of range" in res.stderr  # TPM_RC_VALUE
    tpm2("startup", "-c", tcti=t)  # the "firmware"
    for bank, alg in BANKS.items():
        got = read_pcrs(port, alg, [4, 5])
        assert {str(p): v.hex() for p, v in got.items()} == out["expected_pcrs"][bank], bank
    # the event log: tpm2-tools parses it and replays it to the same values
    parsed = subprocess.run(
        ["tpm2_eventlog", str(log)], capture_output=True, text=True, check=True, timeout=30
    )
    assert parsed.stdout.count("EventType: EV_IPL") == 3
    assert expected["vtpm_pcrs"]["sha256"]["4"] in parsed.stdout

    work = tmp_path / "tpm"
    work.mkdir()
    seal(work, t)
    assert unseal(work, t).stdout == SECRET
    for r in (
        quote_and_verify(work, t, policy, log),
        deep_quote_and_verify(mgr, work, u, policy, log),
    ):
        assert r.returncode == 0, r.stdout + r.stderr
        assert "PASS eventlog.expected: all 3 event(s) are the expected launch's" in r.stdout

    # a guest reboot (QEMU: ctrl INIT, then the firmware's Startup): measured again
    power_cycle_ctrl(port)
    tpm2("startup", "-c", tcti=t)
    assert read_pcrs(port, TPM_ALG.SHA256, [4, 5]) == {
        int(k): bytes.fromhex(x) for k, x in expected["vtpm_pcrs"]["sha256"].items()
    }
    assert unseal(work, t).stdout == SECRET

    # kernel B, then kernel A with another command line: the secret stays sealed, and the
    # verifier names the event that differs
    for args, differs in (
        (launch_args(b, initrd), 'event 1 (PCR 4, EV_IPL "kernel vmlinuz-b") differs'),
        (
            launch_args(a, initrd, CMDLINE + " init=/bin/sh"),
            f'event 2 (PCR 5, EV_IPL "cmdline {CMDLINE} init=/bin/sh") differs',
        ),
    ):
        mgr.json("launch", u, *args, "--no-guest")
        tpm2("startup", "-c", tcti=t)
        res = unseal(work, t)
        assert res.returncode != 0 and SECRET not in res.stdout
        r = quote_and_verify(work, t, policy, log)
        assert r.returncode == 1, r.stdout + r.stderr
        assert "PASS eventlog.replay" in r.stdout  # the log tells the truth about the PCRs
        (fail,) = lines(r, "FAIL eventlog.expected")
        assert differs in fail, fail
        (pcrs_fail,) = lines(r, "FAIL quote.pcrs_expected")
        assert ("PCR 4 is" in pcrs_fail) is ("vmlinuz-b" in differs)
        assert ("PCR 5 is" in pcrs_fail) is ("cmdline" in differs)
        r = deep_quote_and_verify(mgr, work, u, policy, log)
        assert r.returncode == 1, r.stdout + r.stderr
        assert [ln.split(":")[0] for ln in lines(r, "FAIL")] == [
            "FAIL deep.vtpm_pcrs",
            "FAIL eventlog.expected",
        ]
        assert differs in lines(r, "FAIL eventlog.expected")[0]

    # kernel A again: the same measurements, the secret is back
    mgr.json("launch", u, *launch_args(a, initrd), "--no-guest")
    tpm2("startup", "-c", tcti=t)
    assert unseal(work, t).stdout == SECRET

    # the launch ends with its instance: restarted plain, the PCRs are empty and stay so
    mgr.json("stop", u)
    assert not log.exists()
    mgr.json("start", u)
    res = tpm2("startup", tcti=t, check=False)  # no Startup(STATE) into the launch's PCRs
    assert res.returncode != 0
    tpm2("startup", "-c", tcti=t)
    assert read_pcrs(port, TPM_ALG.SHA256, [4, 5]) == {4: bytes(32), 5: bytes(32)}
    audit = mgr.json("audit", "--limit", "50")
    assert sum(1 for e in audit if e["action"] == "vtpm.launch" and e["outcome"] == "ok") == 4


def power_cycle_ctrl(port: int) -> None:
    """What QEMU does at a guest reset: the control channel's INIT."""
    assert ctrl_call(("127.0.0.1", port + 1), ctrl.Init(0)) == ctrl.Result(0)


def _qemu_processes(marker: str) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def test_wrong_label_is_refused_and_touches_nothing(
    tmp_path: Path, mgr: ManagerProc, guest_files: dict[str, Path]
) -> None:
    new_group(mgr, "guests", owner_key(tmp_path))
    v, port = new_vtpm_with_unix_ctrl(mgr)
    u, t = v["uuid"], tcti(port)
    tpm2("startup", "-c", tcti=t)
    tpm2("pcrextend", f"16:sha256={'cd' * 32}", tcti=t)
    pcr16 = read_pcrs(port, TPM_ALG.SHA256, [16])
    before = mgr.json("show", u)
    marker = f"vtpm-test-{os.getpid()}-{tmp_path.name}"
    res = mgr.cli(
        "launch", u, *launch_args(guest_files["vmlinuz-a"], guest_files["initrd"]),
        "--vtpm-label", GUEST2, "--qemu", f"-name {marker} -accel tcg",
        check=False,
    )  # fmt: skip
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [
        f"vtpm: error: launch refused: vTPM {u} has label {GUEST1}, not {GUEST2}"
    ]
    assert "Traceback" not in res.stderr
    assert _qemu_processes(marker) == []
    after = mgr.json("show", u)
    assert after["run"]["pid"] == before["run"]["pid"]  # not restarted
    assert after["state_blobs"] == before["state_blobs"]
    assert read_pcrs(port, TPM_ALG.SHA256, [16]) == pcr16  # the same TPM session
    assert not (mgr.data_dir / "vtpms" / f"{u}.launch.json").exists()

    # without a guest to start, the Manager refuses (and audits it); --json: as data
    res = mgr.cli(
        "launch", u, "--kernel", str(guest_files["vmlinuz-a"]), "--no-guest",
        "--vtpm-label", GUEST2, "--json",
        check=False,
    )  # fmt: skip
    assert res.returncode == 1
    assert json.loads(res.stdout) == {
        "ok": False,
        "error": f"launch refused: vTPM {u} has label {GUEST1}, not {GUEST2}",
    }
    assert mgr.json("show", u)["run"]["pid"] == before["run"]["pid"]
    assert read_pcrs(port, TPM_ALG.SHA256, [16]) == pcr16
    refused = [e for e in mgr.json("audit") if e["action"] == "vtpm.launch"]
    assert [e["outcome"] for e in refused] == ["refused"]


def test_qemu_that_does_not_start_withdraws_the_launch(
    tmp_path: Path, mgr: ManagerProc, guest_files: dict[str, Path]
) -> None:
    new_group(mgr, "guests", owner_key(tmp_path))
    v = mgr.json("new", "--group", "guests", "--label", GUEST1, "--start")  # ctrl=unix default
    u = v["uuid"]
    marker = f"vtpm-test-{os.getpid()}-{tmp_path.name}"
    res = mgr.cli(
        "launch", u, "--kernel", str(guest_files["vmlinuz-a"]),
        "--qemu", f"-name {marker} -accel tcg -no-such-option",
        check=False,
    )  # fmt: skip
    assert res.returncode == 1
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("vtpm: error: QEMU did not start the guest: ")
    assert "-no-such-option" in line
    assert _qemu_processes(marker) == []
    after = mgr.json("show", u)
    assert after["run"]["state"] == "running"
    assert not (mgr.data_dir / "vtpms" / f"{u}.launch.json").exists()
    assert any(e["action"] == "vtpm.launch.cancel" for e in mgr.json("audit"))


def _record(files: dict[str, Path], keep: set[int]) -> LaunchRecord:
    full = digests.measure(digests.GuestFiles(files["vmlinuz-a"], files["initrd"], CMDLINE))
    cut = [
        type(m)(m.kind, m.event_data, tuple((a, d) for a, d in m.digests if a in keep))
        for m in full
    ]
    return LaunchRecord(tuple(cut))


def test_an_extend_that_fails_refuses_or_disables_the_tpm(
    tmp_path: Path, guest_files: dict[str, Path]
) -> None:
    sha1_256: set[int] = {TPM_ALG.SHA1, TPM_ALG.SHA256}
    rec = tmp_path / "launch.json"
    log = tmp_path / "launch.eventlog"
    LaunchRecord(_record(guest_files, sha1_256).measurements, None, log).save(rec)
    state, key = tmp_path / "state", tmp_path / "key"

    # all four banks are active: the rehearsal at start fails, the instance refuses to run,
    # and the TPM is as it was (a Startup(STATE) still resumes the earlier PCR 8)
    with instance(state, key, mssim=False) as inst:
        t = inst.tcti_swtpm
        tpm2("startup", "-c", tcti=t)
        tpm2("pcrextend", f"8:sha256={'ef' * 32}", tcti=t)
        assert inst.port is not None
        pcr8 = read_pcrs(inst.port, TPM_ALG.SHA256, [8])
    with pytest.raises(RuntimeError) as err:
        start_instance(state, key, mssim=False, extra=["--launch", str(rec)])
    assert "the sha384 bank is active but the launch has no sha384 digest of the kernel" in str(
        err.value
    )
    assert "Traceback" not in str(err.value)
    with instance(state, key, mssim=False) as inst:
        tpm2("startup", tcti=inst.tcti_swtpm)  # STATE: resumes
        assert inst.port is not None
        assert read_pcrs(inst.port, TPM_ALG.SHA256, [8]) == pcr8
        # only sha1 and sha256 from the next TPM reset on
        tpm2("pcrallocate", "sha1:all+sha256:all+sha384:none+sha512:none", tcti=inst.tcti_swtpm)

    with instance(state, key, mssim=False, extra=["--launch", str(rec)]) as inst:
        t = inst.tcti_swtpm
        assert inst.port is not None
        tpm2("startup", "-c", tcti=t)
        assert log.exists()
        # the guest turns a bank on that the launch has no digest for; at its next boot the
        # extend fails and its TPM stops working
        tpm2("pcrallocate", "sha384:all", tcti=t)
        power_cycle(inst)
        res = tpm2("startup", "-c", tcti=t, check=False)
        assert res.returncode != 0
        assert tpm2("getrandom", "8", tcti=t, check=False).returncode != 0
        assert not log.exists()
        text = inst.log()
        assert "measured launch failed: the sha384 bank is active" in text
        assert "using the wrong vTPM will yield a non-functioning guest" in text
