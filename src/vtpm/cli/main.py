"""The `vtpm` command: parse arguments, run one action, turn expected errors into one line.

Only this package calls `sys.exit`. Every action returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from vtpm import __version__
from vtpm.cli import (
    group_cmd,
    instance_cmd,
    launch_cmd,
    manager_cmd,
    quote_cmd,
    verify_cmd,
    vtpm_cmd,
)
from vtpm.errors import VtpmError

EXIT_ERROR = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit through our own path (code 2, one line)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vtpm",
        description="Virtual TPMs for Linux guests, rooted in the host's hardware TPM.",
    )
    parser.add_argument("--version", action="version", version=f"vtpm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    manager_cmd.register(sub)
    group_cmd.register(sub)
    vtpm_cmd.register(sub)
    quote_cmd.register(sub)
    instance_cmd.register(sub)
    launch_cmd.register(sub)
    verify_cmd.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    try:
        code = int(args.func(args))
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
