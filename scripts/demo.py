"""The demo: a vTPM instance serving tpm2-tools; a secret sealed in it survives a restart.

Run it with `./dev demo` (which installs everything first). It works in ./demo-run/ and
removes what it started when it ends.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "demo-run"
VTPM = [str(ROOT / ".venv" / "bin" / "vtpm")]
SECRET = b"guest1 disk key: correct horse battery staple\n"
PERSISTENT = "0x81000001"


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


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
    sys.exit("demo: no free TCP port pair on 127.0.0.1")


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
        sys.exit(f"demo: tpm2_{args[0]} failed: {res.stderr.decode(errors='replace')}")
    return res.stdout


def start(port: int) -> subprocess.Popen[bytes]:
    cmd = [
        *VTPM,
        "instance",
        "run",
        "--state-dir",
        str(WORK / "state"),
        "--key-file",
        str(WORK / "state.key"),
        "--server",
        f"tcp:127.0.0.1:{port}",
        "--ctrl",
        f"tcp:127.0.0.1:{port + 1}",
        "--log-file",
        str(WORK / "instance.log"),
    ]
    print("    $ " + " ".join(["vtpm", *cmd[1:]]), flush=True)
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(
                f"demo: the instance exited: {proc.stderr.read().decode() if proc.stderr else ''}"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("demo: the instance did not come up")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(20)
    print(f"    (instance stopped with exit code {proc.returncode}; state stored)", flush=True)


def main() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    port = free_port()
    tcti = f"swtpm:host=127.0.0.1,port={port}"

    step("make a state key (the Manager will hold it; for a lone instance it is a 0600 file)")
    subprocess.run([*VTPM, "instance", "keygen", str(WORK / "state.key")], check=True)

    step("start a vTPM instance (TPM 2.0 on libtpms, raw socket + control channel)")
    proc = start(port)
    try:
        step("a real client (tpm2-tools) seals a secret in it")
        tpm2(tcti, "startup", "-c")
        tpm2(tcti, "createprimary", "-C", "o", "-c", "primary.ctx")
        tpm2(tcti, "evictcontrol", "-C", "o", "-c", "primary.ctx", PERSISTENT)
        tpm2(tcti, "flushcontext", "-t")
        tpm2(
            tcti,
            "create",
            "-C",
            PERSISTENT,
            "-i-",
            "-u",
            "seal.pub",
            "-r",
            "seal.priv",
            stdin=SECRET,
        )
    finally:
        step("stop the instance (SIGTERM: orderly TPM shutdown, state encrypted to disk)")
        stop(proc)

    step("the state on disk holds no clear text")
    for blob in sorted((WORK / "state").glob("*.blob")):
        clear = SECRET.strip() in blob.read_bytes()
        print(f"    {blob.name}: {blob.stat().st_size} bytes, secret in clear: {clear}")
        if clear:
            sys.exit("demo: secret found in clear on disk")

    step("start it again; the client unseals the secret")
    proc = start(port)
    try:
        tpm2(tcti, "startup", "-c")
        tpm2(tcti, "load", "-C", PERSISTENT, "-u", "seal.pub", "-r", "seal.priv", "-c", "seal.ctx")
        out = tpm2(tcti, "unseal", "-c", "seal.ctx")
        print(f"    unsealed: {out.decode().strip()}")
        if out != SECRET:
            sys.exit("demo: the unsealed secret differs")
    finally:
        stop(proc)
    step("demo finished: the secret survived the restart")


if __name__ == "__main__":
    main()
