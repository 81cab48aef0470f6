"""Logging for the long-running commands (`manager run`, `instance run`): options and set-up."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vtpm import instanceargs
from vtpm.errors import ConfigError

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="default info",
    )
    p.add_argument(
        instanceargs.LOG_FILE, type=Path, default=None, help="log here instead of stderr"
    )


def setup(args: argparse.Namespace) -> None:
    """Send this process's log to --log-file (or stderr) at --log-level."""
    path: Path | None = args.log_file
    try:
        handler: logging.Handler = (
            logging.FileHandler(path) if path is not None else logging.StreamHandler(sys.stderr)
        )
    except OSError as e:
        raise ConfigError(f"cannot open log file {path}: {e.strerror}") from None
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(str(args.log_level).upper())
