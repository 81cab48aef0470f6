"""The demo: a vTPM Manager on a simulated hardware TPM, a group, two vTPMs, and a secret
sealed in one of them that survives a restart of the Manager.

Run it with `./dev demo` (which installs everything first). It works in ./demo-run/ (the
Manager's data directory); a Manager already running there is reused. What it started, it
stops at the end.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "demo-run"
VTPM = str(ROOT / ".venv" / "bin" / "vtpm")
ENV = dict(os.environ, VTPM_DATA_DIR=str(WORK))
SECRET = b"guest1 disk key: correct horse battery staple\n"
PERSISTENT = "0x81000001"
LABELS = ("guest1_u:vm_r:vtpm_t", "guest2_u:vm_r:vtpm_t")


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def fail(text: str) -> None:
    sys.exit(f"demo: {text}")


def vtpm(*args: str, show: bool = True) -> Any:
    """Run `vtpm ARGS --json` and return its result (printing the command)."""
    if show:
        print("    $ vtpm " + " ".join(args), flush=True)
    res = subprocess.run(
        [VTPM, *args, "--json"], env=ENV, capture_output=True, text=True, check=False
    )
    if res.returncode != 0:
        try:
            fail(f"vtpm {args[0]}: {json.loads(res.stdout)['error']}")
        except (ValueError, KeyError):
            fail(f"vtpm {args[0]} failed: {res.stderr.strip()}")
    return json.loads(res.stdout)["result"]


def tpm2(tcti: str, *args: str, stdin: bytes | None = None) -> bytes:
    print("    $ tpm2_" + " ".join(args), flush=True)
    res = subprocess.run(
        [f"tpm2_{args[0]}", *args[1:]],
        input=stdin,
        capture_output=True,
        cwd=WORK,
        env=dict(os.environ, TPM2TOOLS_TCTI=tcti),
        check=False,
    )
    if res.returncode != 0:
        fail(f"tpm2_{args[0]} failed: {res.stderr.decode(errors='replace')}")
    return res.stdout


def free_port() -> int:
    """An even port P with P and P+1 free on 127.0.0.1 (raw socket, control channel)."""
    for _ in range(500):
        port = random.randrange(20000, 60000, 2)  # noqa: S311 - a port, not a secret
        try:
            for p in (port, port + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    fail("no free TCP port pair on 127.0.0.1")
    raise AssertionError


def manager_running() -> bool:
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(str(WORK / "admin.sock"))
        except OSError:
            return False
    return True


def start_manager() -> subprocess.Popen[bytes]:
    print("    $ vtpm manager run --log-file demo-run/manager.log &", flush=True)
    proc = subprocess.Popen(
        [VTPM, "manager", "run", "--log-file", str(WORK / "manager.log")],
        env=ENV,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    while not manager_running():
        if proc.poll() is not None:
            fail(f"the Manager exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            fail("the Manager did not come up within 60 s")
        time.sleep(0.1)
    return proc


def stop_manager(proc: subprocess.Popen[bytes]) -> None:
    print("    $ kill -TERM <manager>   (every vTPM stores its state, then the Manager exits)")
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)
    print(f"    (Manager exited with code {proc.returncode})", flush=True)


def wait_running(vtpm_uuid: str) -> None:
    deadline = time.monotonic() + 30
    while vtpm("show", vtpm_uuid, show=False)["run"]["state"] != "running":
        if time.monotonic() > deadline:
            fail(f"vTPM {vtpm_uuid} did not come back")
        time.sleep(0.1)


def main() -> None:
    WORK.mkdir(exist_ok=True)
    started: list[subprocess.Popen[bytes]] = []  # the Manager this demo runs, if any
    step("the vTPM Manager, on a simulated hardware TPM (swtpm) since this host has none")
    if manager_running():
        print("    (a Manager is running in demo-run/: reusing it)")
    else:
        if not (WORK / "manager.json").exists():
            vtpm("manager", "init")
        started.append(start_manager())
    try:
        run(started)
    finally:
        if started and started[-1].poll() is None:
            stop_manager(started[-1])


def run(started: list[subprocess.Popen[bytes]]) -> None:
    st = vtpm("manager", "status")
    print(f"    hardware TPM: {st['hardware_tpm']['description']}")
    if st["hardware_tpm"].get("note"):
        print(f"    note: {st['hardware_tpm']['note']}")

    step("a group for the guests: its key sealed to the hardware TPM's current PCRs 0-7")
    owner = WORK / f"owner-{os.getpid()}.pem"
    vtpm("group", "keygen", str(owner))
    name = f"guests-{os.getpid()}"
    g = vtpm("group", "new", name, "--owner-key", f"{owner}.pub", "--label", "*:vm_r:vtpm_t")
    print(
        f"    group {g['name']} {g['uuid']}: {'unlocked' if g['status']['unlocked'] else 'LOCKED'}"
    )

    step("two vTPMs in it, labelled for guest1 and guest2, started")
    ports = {}
    uuids = {}
    for label in LABELS:
        port = free_port()
        v = vtpm(
            "new", "--group", name, "--label", label, "--start",
            "--server", f"tcp:127.0.0.1:{port}", "--ctrl", f"tcp:127.0.0.1:{port + 1}",
        )  # fmt: skip
        ports[label], uuids[label] = port, v["uuid"]
        print(f"    vTPM {v['uuid']} ({label}): {v['run']['state']}, pid {v['run']['pid']}")

    tcti = f"swtpm:host=127.0.0.1,port={ports[LABELS[0]]}"
    step("a real client (tpm2-tools) seals a secret in guest1's vTPM")
    tpm2(tcti, "startup", "-c")
    tpm2(tcti, "createprimary", "-C", "o", "-c", "primary.ctx")
    tpm2(tcti, "evictcontrol", "-C", "o", "-c", "primary.ctx", PERSISTENT)
    tpm2(tcti, "flushcontext", "-t")
    tpm2(tcti, "create", "-C", PERSISTENT, "-i-", "-u", "seal.pub", "-r", "seal.priv", stdin=SECRET)

    step("restart the Manager")
    if not started:
        print("    (the Manager was not started by this demo: restart it yourself to see this)")
    else:
        stop_manager(started[-1])
        started.append(start_manager())
        for label in LABELS:
            wait_running(uuids[label])
        print("    both vTPMs are running again (started by the Manager: they were running)")

    step("guest1's client unseals the secret")
    tpm2(tcti, "startup", "-c")
    tpm2(tcti, "load", "-C", PERSISTENT, "-u", "seal.pub", "-r", "seal.priv", "-c", "seal.ctx")
    out = tpm2(tcti, "unseal", "-c", "seal.ctx")
    print(f"    unsealed: {out.decode().strip()}")
    if out != SECRET:
        fail("the unsealed secret differs")

    step("no key and no secret in clear in the data directory")
    hits = [
        p for p in WORK.rglob("*")
        if p.is_file() and not p.is_socket() and SECRET.strip() in p.read_bytes()
    ]  # fmt: skip
    print(f"    files holding the secret in clear: {len(hits)}")
    if hits:
        fail(f"secret found in clear in {hits}")

    step("clean up: delete the two vTPMs and the group")
    for label in LABELS:
        vtpm("del", uuids[label])
    vtpm("group", "del", name)
    for f in ("primary.ctx", "seal.pub", "seal.priv", "seal.ctx", owner.name, owner.name + ".pub"):
        (WORK / f).unlink(missing_ok=True)
    step("demo finished: the secret survived the Manager's restart")


if __name__ == "__main__":
    main()
