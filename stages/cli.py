"""Command-line plumbing every stage shares: ``--config FILE``, ``--set a.b=c ...``, ``--dry-run``."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TypeVar

from rcdm.config import ConfigError, load_config, to_yaml

T = TypeVar("T")


def add_config_args(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys, e.g. --set model.dropout=0.1 data.shards=s3://bucket/feats",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """The resolved config; exits (code 2) with a one-line message on a config error, prints it on --dry-run."""
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one process says it
            print(f"config error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        sys.exit(0)
    return cfg


def fail(message: str, code: int = 2) -> None:
    """Exit with a clear one-line error (no traceback) for bad user input."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)
