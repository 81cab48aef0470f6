#!/usr/bin/env bash
# Installs everything the project needs on Debian 12: apt packages, a venv in .venv, the
# project (editable) with its Python dependencies. Safe to run again: it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  python3 python3-venv python3-dev # Debian's Python (built with PGO + LTO: see below)
  swtpm swtpm-tools libtpms0        # the TPM engine and the peer we compare against
  libtss2-dev pkg-config            # tpm2-pytss builds against the TSS
  tpm2-tools                        # real TPM clients for tests and the demo
  qemu-system-x86 seabios           # a real guest for the QEMU tests (qboot comes with it)
  linux-image-amd64 busybox-static cpio  # the measured-launch test boots this kernel + initrd
  libvirt-daemon-system libvirt-clients  # the libvirt acceptance test (a private libvirtd)
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "install: apt packages: ${missing[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The venv is made from Debian's own Python by default, not from whatever `python3` comes first
# on PATH: Debian builds it with profile-guided and link-time optimisation, and every vTPM is a
# Python process whose per-command cost is interpreter time (a TPM round trip costs a third
# less CPU in it than in a plain source build of the same version). PYTHON=... overrides.
PY="${PYTHON:-/usr/bin/python3}"
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "install: $PY is older than Python 3.11" >&2
  exit 1
fi
base=$("$PY" -c 'import os, sys; print(os.path.realpath(sys._base_executable))')
if [ -x .venv/bin/python ] && [ "$(.venv/bin/python -c 'import os, sys; print(os.path.realpath(sys._base_executable))')" != "$base" ]; then
  echo "install: .venv was made from another Python; making it again from $base" >&2
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "install: creating .venv ($base)" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.vtpm-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "install: Python packages (tpm2-pytss builds from source: about a minute)" >&2
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
# Byte-compile the project once: every vTPM is its own Python process, and where the
# environment sets PYTHONDONTWRITEBYTECODE each start would otherwise recompile every module
# (about a third of an instance's start time). Only changed files are compiled again.
.venv/bin/python -m compileall -q -j 0 src
# The compat directory (.venv/compat/bin): vtpm's own swtpm, swtpm_setup, swtpm_ioctl for
# orchestrators that find them by PATH (`vtpm compat dir`). Scripts already there are kept.
.venv/bin/python -m vtpm.compat.install .venv/compat/bin
