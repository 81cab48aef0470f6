"""The compat directory: `<venv>/compat/bin/` with `swtpm`, `swtpm_setup`, `swtpm_ioctl`.

Each is a Python script whose `#!` line is the virtualenv's python by its absolute path (not a
shell wrapper): the kernel then names the process after the script, so `ps` and `ss -p` show
`swtpm`. Orchestrators find them by PATH (`vtpm compat dir` prints the directory to put first).
Nothing is ever written to /usr/bin. `python -m vtpm.compat.install DIR` (scripts/install.sh)
writes them; unchanged scripts are left alone, so running it again costs nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from vtpm.errors import ConfigError
from vtpm.files import write_atomic

PROGRAMS = {
    "swtpm": "vtpm.compat.frontdoor",
    "swtpm_setup": "vtpm.compat.setup",
    "swtpm_ioctl": "vtpm.compat.ioctl",
}
SUBDIR = ("compat", "bin")


def default_dir(prefix: str = sys.prefix) -> Path:
    """Where the compat directory of this Python's environment is."""
    return Path(prefix).joinpath(*SUBDIR)


def script(name: str, python: str) -> str:
    return (
        f"#!{python}\n"
        f"# vtpm's {name} (written by scripts/install.sh: `vtpm compat dir`); do not edit\n"
        "import sys\n\n"
        f"from {PROGRAMS[name]} import main\n\n"
        "sys.exit(main())\n"
    )


def install(directory: Path, python: str) -> list[str]:
    """Write the scripts that are missing or differ; the names written."""
    if not os.path.isabs(python):
        raise ConfigError(f"the interpreter path {python} must be absolute")
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PROGRAMS:
        path = directory / name
        text = script(name, python)
        try:
            same = path.read_text() == text and os.access(path, os.X_OK)
        except OSError:
            same = False
        if not same:
            write_atomic(path, text.encode(), 0o755)
            os.chmod(path, 0o755)  # noqa: S103  (programs: everyone may run them)
            written.append(name)
    return written


def installed(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in PROGRAMS)


def main(argv: list[str] | None = None) -> int:
    """`python -m vtpm.compat.install [DIR]`: DIR defaults to this environment's."""
    words = sys.argv[1:] if argv is None else argv
    directory = Path(words[0]).absolute() if words else default_dir()
    # the venv's interpreter by its own path (a symlink): resolving it would leave the venv
    python = os.path.join(sys.prefix, "bin", "python")
    written = install(directory, python)
    if written:
        print(f"install: compat programs in {directory}: {', '.join(written)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
