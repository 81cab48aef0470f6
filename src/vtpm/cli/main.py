"""The `vtpm` command: parse arguments, run one action, turn expected errors into one line.

Only this package calls `sys.exit`. Every action returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence

from vtpm import __version__
from vtpm.errors import VtpmError

# command modules, in `vtpm --help` order; each has register(subparsers)
COMMANDS = {
    "manager": "vtpm.cli.manager_cmd",
    "group": "vtpm.cli.group_cmd",
    "vtpm": "vtpm.cli.vtpm_cmd",
    "ek": "vtpm.cli.ek_cmd",
    "compat": "vtpm.cli.compat_cmd",
    "quote": "vtpm.cli.quote_cmd",
    "instance": "vtpm.cli.instance_cmd",
    "launch": "vtpm.cli.launch_cmd",
    "verify": "vtpm.cli.verify_cmd",
}

EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit through our own path (code 2, one line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `only`, just that command module's (a vTPM instance process loads
    only what `vtpm instance` needs, which makes it start faster)."""
    parser = _Parser(
        prog="vtpm",
        description="Virtual TPMs for Linux guests, rooted in the host's hardware TPM.",
    )
    parser.add_argument("--version", action="version", version=f"vtpm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, module in COMMANDS.items():
        if only is None or only == name:
            importlib.import_module(module).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    words = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser("instance" if words[:1] == ["instance"] else None)
    args = parser.parse_args(words)
    as_json = bool(getattr(args, "json", False))
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not as a traceback at exit
    except BrokenPipeError:
        # the reader went away (`vtpm ... | head -1`): what was left unsaid is lost, say so once
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.stderr.write("vtpm: error: the output was closed before all of it was written\n")
        code = EXIT_ERROR
    except VtpmError as e:
        if as_json:
            print(json.dumps({"ok": False, "error": str(e)}))
        else:
            sys.stderr.write(f"vtpm: error: {e}\n")
        code = EXIT_ERROR
    except KeyboardInterrupt:
        code = 130
    finally:
        logging.shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main()
