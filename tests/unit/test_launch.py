"""vtpm.launch (digests, record, event log, QEMU argv), vtpm.platform.xlcfg and the verifier's
event-log replay, without a TPM: the TPM's side is in tests/integration/test_launch.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from vtpm.errors import ConfigError
from vtpm.instance import launchlog as launch_log
from vtpm.launch import digests, guest
from vtpm.launchrecord import LaunchRecord, Measurement
from vtpm.platform import xlcfg
from vtpm.tpm import eventlog
from vtpm.tpm.constants import DIGEST_SIZES, TPM_ALG
from vtpm.verify.eventlog import policy_entry, replay_checks
from vtpm.verify.expected import Expected

BANKS = (TPM_ALG.SHA1, TPM_ALG.SHA256, 0x000C, 0x000D)


@pytest.fixture
def files(tmp_path: Path) -> digests.GuestFiles:
    (tmp_path / "vmlinuz-a").write_bytes(b"kernel A " * 1000)
    (tmp_path / "initrd.img").write_bytes(b"initrd " * 300)
    return digests.GuestFiles(
        tmp_path / "vmlinuz-a", tmp_path / "initrd.img", "console=ttyS0 root=/dev/vda1"
    )


def test_measurements_are_file_and_cmdline_digests(files: digests.GuestFiles) -> None:
    ms = digests.measure(files)
    assert [(m.kind, m.pcr, m.event_data) for m in ms] == [
        ("kernel", 4, "kernel vmlinuz-a"),
        ("cmdline", 5, "cmdline console=ttyS0 root=/dev/vda1"),
        ("initrd", 5, "initrd initrd.img"),
    ]
    assert ms[0].digest(TPM_ALG.SHA256) == hashlib.sha256(files.kernel.read_bytes()).digest()
    assert ms[1].digest(TPM_ALG.SHA1) == hashlib.sha1(files.cmdline.encode()).digest()
    assert ms[2].digest(0x000D) == hashlib.sha512(b"initrd " * 300).digest()
    assert ms[0].banks == BANKS


def test_expected_values_are_the_extend_chain(files: digests.GuestFiles) -> None:
    ms = digests.measure(files)
    want = digests.expected_pcrs(ms)[TPM_ALG.SHA256]
    k, c, i = (m.digest(TPM_ALG.SHA256) or b"" for m in ms)
    assert want[4] == hashlib.sha256(bytes(32) + k).digest()
    assert want[5] == hashlib.sha256(hashlib.sha256(bytes(32) + c).digest() + i).digest()


def test_no_initrd_and_empty_cmdline(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"k")
    ms = digests.measure(digests.GuestFiles(tmp_path / "k"))
    assert [m.kind for m in ms] == ["kernel", "cmdline"]
    assert ms[1].digest(TPM_ALG.SHA256) == hashlib.sha256(b"").digest()


def test_missing_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"the kernel .* is not a file"):
        digests.measure(digests.GuestFiles(tmp_path / "nope"))
    (tmp_path / "k").write_bytes(b"k")
    with pytest.raises(ConfigError, match="the initrd"):
        digests.measure(digests.GuestFiles(tmp_path / "k", tmp_path / "nope"))


def test_record_round_trip_and_strictness(files: digests.GuestFiles, tmp_path: Path) -> None:
    rec = LaunchRecord(digests.measure(files))
    path = tmp_path / "r.json"
    rec.save(path)
    assert LaunchRecord.load(path) == rec
    raw = rec.to_json()
    assert raw["format"] == "vtpm-launch/1"
    bad_pcr = json.loads(json.dumps(raw))
    bad_pcr["measurements"][0]["pcr"] = 0
    bad_order = json.loads(json.dumps(raw))
    bad_order["measurements"].reverse()
    bad_key = json.loads(json.dumps(raw)) | {"extra": 1}
    bad_digest = json.loads(json.dumps(raw))
    bad_digest["measurements"][1]["digests"]["sha256"] = "00"
    for bad, msg in (
        (bad_pcr, "measured into PCR 4"),
        (bad_order, "kernel, cmdline\\[, initrd\\] in that order"),
        (bad_key, "unknown key"),
        (bad_digest, "bad digest"),
    ):
        with pytest.raises(ConfigError, match=msg):
            LaunchRecord.from_json(bad)


def test_launch_log_parses_and_replays_to_the_expected_values(
    files: digests.GuestFiles,
) -> None:
    ms = digests.measure(files)
    data = launch_log.build(ms, (TPM_ALG.SHA256, 0x000C))
    log = eventlog.parse(data)
    assert log.banks == (TPM_ALG.SHA256, 0x000C)
    assert [e.data for e in log.events] == [m.event_data.encode() for m in ms]
    assert all(e.type == eventlog.EventType.EV_IPL for e in log.events)
    want = digests.expected_pcrs(ms)
    assert eventlog.replay(log.events, 0x000C) == want[0x000C]


# verify.eventlog ------------------------------------------------------------------------------


def _policy(ms: tuple[Measurement, ...]) -> Expected:
    values = digests.expected_pcrs(ms)[TPM_ALG.SHA256]
    return Expected.from_json(
        {
            "format": "vtpm-verify-policy/1",
            "vtpm_pcrs": {"sha256": {str(p): v.hex() for p, v in values.items()}},
            "event_log": policy_entry([m.event(BANKS) for m in ms]),
        }
    )


def test_replay_checks_pass_and_name_the_differing_event(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz-a").write_bytes(b"A")
    (tmp_path / "vmlinuz-b").write_bytes(b"B")
    a = digests.measure(digests.GuestFiles(tmp_path / "vmlinuz-a", None, "quiet"))
    b = digests.measure(digests.GuestFiles(tmp_path / "vmlinuz-b", None, "quiet"))
    c = digests.measure(digests.GuestFiles(tmp_path / "vmlinuz-a", None, "quiet single"))
    expected = _policy(a)
    for ms, bad in ((a, None), (b, "event 1 (PCR 4"), (c, "event 2 (PCR 5")):
        log = launch_log.build(ms, BANKS)
        pcrs = digests.expected_pcrs(ms)[TPM_ALG.SHA256]
        checks = {ch.id: ch for ch in replay_checks(log, pcrs, "sha256", expected)}
        assert checks["eventlog.parse"].ok and checks["eventlog.replay"].ok
        assert checks["eventlog.expected"].ok is (bad is None), checks["eventlog.expected"]
        if bad is not None:
            assert checks["eventlog.expected"].reason.startswith(bad)
    # a log that does not match the quoted values
    log = launch_log.build(b, BANKS)
    found = replay_checks(log, digests.expected_pcrs(a)[TPM_ALG.SHA256], "sha256", None)
    replay = next(ch for ch in found if ch.id == "eventlog.replay")
    assert not replay.ok and "PCR 4: the log (event 1: PCR 4, EV_IPL" in replay.reason
    # PCR 5 not quoted at all
    only4 = {4: digests.expected_pcrs(b)[TPM_ALG.SHA256][4]}
    found = replay_checks(log, only4, "sha256", None)
    replay = next(ch for ch in found if ch.id == "eventlog.replay")
    assert replay.reason == "PCR 5 is extended by the log but not quoted"


def test_replay_checks_with_values_only_and_bad_logs(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"k")
    ms = digests.measure(digests.GuestFiles(tmp_path / "k"))
    values = digests.expected_pcrs(ms)[TPM_ALG.SHA256]
    wrong = Expected.from_json(
        {"format": "vtpm-verify-policy/1", "vtpm_pcrs": {"sha256": {"4": "00" * 32}}}
    )
    log = launch_log.build(ms, (TPM_ALG.SHA256,))
    checks = {c.id: c for c in replay_checks(log, values, "sha256", wrong)}
    assert not checks["eventlog.expected"].ok
    assert "PCR 4 replays to" in checks["eventlog.expected"].reason
    assert 'event 1: PCR 4, EV_IPL "kernel k"' in checks["eventlog.expected"].reason
    # no sha1 digests in the log
    checks = {c.id: c for c in replay_checks(log, values, "sha1", None)}
    assert checks["eventlog.parse"].reason == "the log has sha256 digests, no sha1"
    assert [c.id for c in replay_checks(b"junk", values, "sha256", None)] == ["eventlog.parse"]


# QEMU argv ------------------------------------------------------------------------------------


def test_qemu_argv_defaults_and_user_overrides(files: digests.GuestFiles) -> None:
    spec = guest.GuestSpec(files, Path("/run/a,b.ctrl"), name="g1", memory=512)
    argv = guest.qemu_argv(spec)
    assert argv[:2] == ["qemu-system-x86_64", "-machine"]
    assert argv[3:7] == ["-accel", "kvm", "-accel", "tcg"]
    assert argv[9:13] == ["-display", "none", "-vga", "none"]
    assert "socket,id=vtpm0,path=/run/a,,b.ctrl" in argv
    assert argv[argv.index("-append") + 1] == files.cmdline
    assert argv[argv.index("-bios") + 1] == str(guest.DEFAULT_FIRMWARE)
    user = guest.extra_args(["-accel tcg -serial 'file:/tmp/con sole.log'", "-bios=x"])
    assert user == ("-accel", "tcg", "-serial", "file:/tmp/con sole.log", "-bios=x")
    argv = guest.qemu_argv(guest.GuestSpec(files, Path("/c"), extra=user, firmware=None))
    assert argv.count("-accel") == 1 and "-bios" not in argv and argv[-5:] == list(user)


# xl configs -----------------------------------------------------------------------------------


def test_xl_config(tmp_path: Path) -> None:
    cfg = tmp_path / "guest.cfg"
    cfg.write_text(
        "# a guest\n"
        'name = "guest1"; memory = 256\n'
        "kernel = '/boot/vmlinuz'\n"
        'ramdisk = "initrd.img"   # beside the config\n'
        'extra = "console=ttyS0 \\"q\\""\n'
        'root = "/dev/vda1"\n'
        'extra += " quiet"\n'
        "vtpm = [\n"
        '   "backend=vtpmmgr, uuid=ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839",\n'
        "]\n"
        "disk = [ 'file:/x.img,xvda,w' ]\n"
    )
    g = xlcfg.load(cfg)
    assert g.kernel == Path("/boot/vmlinuz") and g.ramdisk == tmp_path / "initrd.img"
    assert g.cmdline == 'root=/dev/vda1 console=ttyS0 "q" quiet'
    assert (g.name, g.memory, str(g.vtpm_uuid)) == (
        "guest1",
        256,
        "ac0a5b9e-cbe2-4c07-b43b-1d69e46fb839",
    )
    # cmdline= wins over root=/extra=
    cfg.write_text('kernel="k"\ncmdline="a b"\nextra="c"\n')
    assert xlcfg.load(cfg).cmdline == "a b"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('name = "g"\n', "no kernel"),
        ('kernel = "k" "l"\n', ":1: unexpected"),
        ('kernel = "k"\nvtpm = ["uuid=1", "uuid=2"]\n', "exactly one vTPM"),
        ('kernel = "k"\nvtpm = ["backend=x"]\n', "names no uuid"),
        ('kernel = "k"\nvtpm = ["uid=x"]\n', "expected backend"),
        ('kernel = ["k"\n', "not closed"),
        ("kernel = $\n", ":1: unexpected '\\$'"),
        ('kernel = "k"\nmemory = "lots"\n', "memory must be a positive number"),
    ],
)
def test_xl_config_errors(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=message):
        xlcfg.load(cfg)


def test_digest_sizes_cover_the_banks() -> None:
    assert all(b in DIGEST_SIZES for b in BANKS)
