"""A real Linux guest for tests: Debian's kernel (/boot/vmlinuz-*) and a busybox initrd whose
/init is a shell script, plus the pieces such scripts use to talk to the guest's TPM: raw TPM
commands written to /dev/tpm0 (the kernel's raw device; its resource manager, /dev/tpmrm0,
refuses unknown command codes) with the response read back and printed in hex on the console."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

QEMU = shutil.which("qemu-system-x86_64")
BUSYBOX = Path("/bin/busybox")
KERNELS = sorted(Path("/boot").glob("vmlinuz-*"))
MISSING = [
    what
    for what, ok in (
        ("qemu-system-x86_64", QEMU is not None),
        ("a kernel in /boot (linux-image-amd64)", bool(KERNELS)),
        ("/bin/busybox (busybox-static)", BUSYBOX.exists()),
        ("cpio", shutil.which("cpio") is not None),
    )
    if not ok
]


def build_initrd(work: Path, init: str) -> Path:
    """A busybox initrd (newc cpio) in `work` whose /init is the script `init`."""
    if MISSING:
        pytest.skip(f"needs {', '.join(MISSING)} (installed by ./dev install)")
    root = work / "root"
    for d in ("bin", "dev", "proc", "sys"):
        (root / d).mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    (root / "init").write_text(init)
    (root / "init").chmod(0o755)
    files = subprocess.run(
        ["find", "."], cwd=root, capture_output=True, check=True, text=True
    ).stdout
    out = work / "initrd.cpio"
    with out.open("wb") as f:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=root,
            input=files.encode(),
            stdout=f,
            check=True,
        )
    return out


def octal(data: bytes) -> str:
    """`data` as busybox printf octal escapes."""
    return "".join(f"\\{b:03o}" for b in data)


# Shell functions for /init (busybox sh). fd 3 keeps /dev/tpm0 open between the write and the
# read: the kernel drops a response whose file is closed. One printf reaches the device in one
# write(), one command.
#   tpm ESCAPED      send one command (printf escapes), print the response in hex
#   u16 N / u32 N    N as printf octal escapes, big-endian
SHELL_TPM = r"""
exec 3<>/dev/tpm0
tpm() {
    /bin/busybox printf "$1" >&3
    /bin/busybox dd bs=4096 count=1 <&3 2>/dev/null | /bin/busybox hexdump -v -e '1/1 "%02x"'
}
o8() { /bin/busybox printf '\\%03o' $(( $1 & 255 )); }
u16() { echo -n "$(o8 $(( $1 >> 8 )))$(o8 $1)"; }
u32() { echo -n "$(o8 $(( $1 >> 24 )))$(o8 $(( $1 >> 16 )))$(o8 $(( $1 >> 8 )))$(o8 $1)"; }
"""

TPM_ST_NO_SESSIONS = 0x8001
TPM_ST_SESSIONS = 0x8002
TPM_CC_NV_READ = 0x0000014E
TPM_CC_NV_READPUBLIC = 0x00000169
TPM_CC_PCR_EXTEND = 0x00000182
TPM_RH_OWNER = 0x40000001
TPM_RS_PW = 0x40000009
TPM_ALG_SHA256 = 0x000B
PASSWORD_SESSION = struct.pack(">IHBH", TPM_RS_PW, 0, 0, 0)  # empty password, no nonce


def nv_read_public(index: int) -> bytes:
    """TPM2_NV_ReadPublic(index) (TPM 2.0 Part 3, 31.6)."""
    return struct.pack(">HIII", TPM_ST_NO_SESSIONS, 14, TPM_CC_NV_READPUBLIC, index)


def pcr_extend_sha256(pcr: int, digest: bytes) -> bytes:
    """TPM2_PCR_Extend(pcr, {sha256: digest}) with an empty password (Part 3, 22.2)."""
    assert len(digest) == 32
    body = struct.pack(">II", pcr, len(PASSWORD_SESSION)) + PASSWORD_SESSION
    body += struct.pack(">IH", 1, TPM_ALG_SHA256) + digest
    return struct.pack(">HII", TPM_ST_SESSIONS, 10 + len(body), TPM_CC_PCR_EXTEND) + body


def response_code(response: bytes) -> int:
    _tag, size, rc = struct.unpack_from(">HII", response)
    assert size == len(response), response.hex()
    return int(rc)


def nv_public_data_size(response: bytes) -> int:
    """dataSize of a TPM2_NV_ReadPublic response's TPMS_NV_PUBLIC."""
    assert response_code(response) == 0, response.hex()
    (policy_size,) = struct.unpack_from(">H", response, 10 + 2 + 4 + 2 + 4)
    (size,) = struct.unpack_from(">H", response, 10 + 2 + 4 + 2 + 4 + 2 + policy_size)
    return int(size)


def nv_read_data(response: bytes) -> bytes:
    """The TPM2B_MAX_NV_BUFFER of a successful TPM2_NV_Read response (with sessions)."""
    assert response_code(response) == 0, response.hex()
    (size,) = struct.unpack_from(">H", response, 14)
    return response[16 : 16 + size]


def shell_nv_dump(index: int, marker: str, chunk: int = 512) -> str:
    """/init lines that print TPM2_NV_ReadPublic(index) as `<marker>PUB=hex`, then read the whole
    index in chunks (TPM2_NV_Read with an empty password, by the owner, or by the index's own
    auth when the owner may not read it) and print each response as `<marker>READ=hex`."""
    return f"""
pub=$(tpm '{octal(nv_read_public(index))}')
echo "{marker}PUB=$pub"
if [ "${{pub:12:8}}" = 00000000 ]; then
    pol=$(( 0x${{pub:44:4}} ))
    size=$(( 0x${{pub:$(( 48 + pol * 2 )):4}} ))
    auth={TPM_RH_OWNER}
    off=0
    while [ $off -lt $size ]; do
        n=$(( size - off )); [ $n -gt {chunk} ] && n={chunk}
        cmd="$(u16 {TPM_ST_SESSIONS})$(u32 35)$(u32 {TPM_CC_NV_READ})$(u32 $auth)$(u32 {index})"
        cmd="$cmd$(u32 9)$(u32 {TPM_RS_PW})$(u16 0)$(o8 0)$(u16 0)$(u16 $n)$(u16 $off)"
        r=$(tpm "$cmd")
        if [ "${{r:12:8}}" != 00000000 ] && [ $auth = {TPM_RH_OWNER} ]; then
            auth={index}
            continue
        fi
        echo "{marker}READ=$r"
        [ "${{r:12:8}}" = 00000000 ] || break
        off=$(( off + n ))
    done
fi
"""


def console_values(text: str, key: str) -> list[str]:
    """The values of the console lines `key=value`, in order."""
    prefix = key + "="
    return [line[len(prefix) :].strip() for line in text.splitlines() if line.startswith(prefix)]


def nv_from_console(text: str, marker: str) -> tuple[int, bytes]:
    """(dataSize, the bytes read) of the one `shell_nv_dump` printed in `text`."""
    pubs = console_values(text, marker + "PUB")
    assert len(pubs) == 1, text[-3000:]
    size = nv_public_data_size(bytes.fromhex(pubs[0]))
    data = b"".join(nv_read_data(bytes.fromhex(r)) for r in console_values(text, marker + "READ"))
    return size, data
