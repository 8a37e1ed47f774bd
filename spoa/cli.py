"""Command line: `haproxy-swarm agent|run|demo|status`. Parses flags, builds Settings, dispatches."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from spoa import __version__
from spoa.config import ConfigError, add_arguments, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="haproxy-swarm", description=__doc__)
    parser.add_argument("--version", action="version", version=f"haproxy-swarm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    agent = sub.add_parser("agent", help="run the SPOE agent")
    add_arguments(agent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args)
    except ConfigError as e:
        print(f"haproxy-swarm: configuration error: {e}", file=sys.stderr)
        return 2
    print(settings)
    return 0
