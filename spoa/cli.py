"""Command line: `haproxy-swarm agent|run|demo|status|health`.

Owns: parsing flags, building the one `Settings` object, setting up logs and dispatching. A bad
setting stops here with a message naming it (exit code 2). Must not: hold logic of its own.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence

from spoa import __version__
from spoa.config import ConfigError, HostPort, Settings, add_arguments, load_settings, parse_host_port
from spoa.logs import setup_logging


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="haproxy-swarm",
        description="Sticky, reload-free HAProxy routing to the members of a DNS-discovered service.")
    parser.add_argument("--version", action="version", version=f"haproxy-swarm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = sub.add_parser("agent", help="run the SPOE agent (DNS → ring → decisions, HAProxy servers)")
    add_arguments(agent)
    run = sub.add_parser("run", help="run HAProxy (the shipped config) and the agent together, supervised")
    add_arguments(run)
    run.add_argument("--print-config", action="store_true",
                     help="print the services' backends as `run` renders them for HAProxy (RUN_DIR/services.cfg, "
                          "read after the shipped haproxy.cfg) and exit")

    demo = sub.add_parser("demo", help="the local demo: real HAProxy, DNS and backends, a scripted scale-up/down")
    demo.add_argument("--traffic-port", type=int, default=8099)
    demo.add_argument("--stats-port", type=int, default=8888)
    demo.add_argument("--metrics-port", type=int, default=9101)
    demo.add_argument("--no-wait", action="store_true",
                      help="stop after the walk-through instead of waiting for Ctrl-C")

    status = sub.add_parser("status", help="members, their health and share of the ring, for a running instance")
    status.add_argument("--metrics", default=None,
                        help="the agent's metrics base URL [default: from METRICS_LISTEN, else http://127.0.0.1:9101]")
    status.add_argument("--haproxy-socket", default=None, help="HAProxy admin socket [env HAPROXY_SOCKET]")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    health = sub.add_parser("health", help="exit 0 when URL answers 200 (the image's HEALTHCHECK)")
    health.add_argument("--url", default=None,
                        help="[default: /healthz of the agent at METRICS_LISTEN, else http://127.0.0.1:9101]")
    return parser


def local_metrics_url(environ: Mapping[str, str]) -> str:
    """The base URL of this container's agent metrics, from METRICS_LISTEN (a wildcard address is
    reached on loopback), so the HEALTHCHECK and `status` follow an operator's METRICS_LISTEN."""
    try:
        hp = parse_host_port(environ.get("METRICS_LISTEN") or "0.0.0.0:9101")
    except ValueError:
        hp = HostPort("127.0.0.1", 9101)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(hp.host, hp.host)
    return f"http://{HostPort(host, hp.port)}"


def _settings(args: argparse.Namespace) -> Settings | None:
    try:
        settings = load_settings(args)
    except ConfigError as e:
        print(f"haproxy-swarm: configuration error: {e}", file=sys.stderr)
        return None
    setup_logging(settings.log_level, settings.log_format)
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("agent", "run"):
        settings = _settings(args)
        if settings is None:
            return 2
        if args.command == "agent":
            from spoa.app import run_agent

            return run_agent(settings)
        from spoa.supervisor import rendered_config, run

        if args.print_config:
            print(rendered_config(settings), end="")
            return 0
        return run(settings, reload_settings=lambda: load_settings(args))
    if args.command == "demo":
        from spoa.demo import DemoPorts
        from spoa.demo import main as demo_main

        return demo_main(DemoPorts(args.traffic_port, args.stats_port, args.metrics_port), wait=not args.no_wait)
    if args.command == "status":
        from spoa.status import main as status_main

        return status_main(args.metrics or local_metrics_url(os.environ), args.haproxy_socket, as_json=args.json)
    if args.command == "health":
        url = args.url or local_metrics_url(os.environ) + "/healthz"
        try:
            with urllib.request.urlopen(url, timeout=3) as resp:
                return 0 if resp.status == 200 else 1
        except (urllib.error.URLError, OSError) as e:
            print(f"haproxy-swarm health: {url}: {e}", file=sys.stderr)
            return 1
    return 2
