"""Several services: each one's HAProxy backend, instantiated from the shipped haproxy.cfg's own.

Owns: turning the shipped config's `be_app` and `be_agent` sections and the shipped spoe.conf into
one copy per service (SWARM_CONFIG_FILE with several lines; spoa.config.service_settings), where
each `${NAME}` the service sets is replaced by the service's value - exactly what HAProxy's own
environment expansion would give, had the service's settings been the environment - and writing
them, with the services map fe_main routes by, into RUN_DIR. `run` passes the file to HAProxy after
the shipped one (`-f haproxy.cfg -f services.cfg`), so the shipped file stays the only template:
there is no second copy of the chain walk to keep in step. Written at start and when the file of
services changes; never for a scale event (the agent writes servers through the runtime API).
Must not: invent configuration of its own beyond renaming the sections.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from spoa.config import Settings
from spoa.haproxy.table import write_atomically

_SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|resolvers|peers|userlist|program|"
                      r"http-errors|ring|cache|mailers)\b(.*)$")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

SERVICES_CONFIG = "services.cfg"
SERVICES_MAP = "services.map"
ONDEMAND_MAP = "ondemand.map"


def section(config: str, header: str) -> str:
    """The text of section `header` (e.g. `backend be_app`): its header line and every line up to
    the next section, comments and blank lines dropped."""
    lines: list[str] = []
    inside = False
    for line in config.splitlines():
        if _SECTION.match(line):
            if inside:
                break
            inside = line.split("#", 1)[0].strip() == header
        if inside and line.strip() and not line.lstrip().startswith("#"):
            lines.append(line)
    if not lines:
        raise ValueError(f"no section {header!r} in the config")
    # A conditional opened after the section's last line belongs to what follows (e.g. an `.if`
    # around the next section): leave it out.
    opened: list[int] = []
    for n, line in enumerate(lines):
        if line.startswith(".if"):
            opened.append(n)
        elif line.startswith(".endif") and opened:
            opened.pop()
    if opened:
        lines = lines[:opened[0]]
    return "\n".join(lines) + "\n"


def substitute(text: str, values: Mapping[str, str]) -> str:
    """`${NAME}` -> values[NAME] for the names given; others stay for HAProxy to expand."""
    return _VARIABLE.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def backend_names(service: Settings) -> tuple[str, str]:
    """(the service's backend, its SPOE agent's backend)."""
    return service.haproxy_backend, f"{service.haproxy_backend}_agent"


def service_values(service: Settings, spoe_conf: str, pattern: bool = False) -> dict[str, str]:
    """What the service's copy of be_app, be_agent and spoe.conf read instead of the environment.
    A pattern's backend has no DNS fallback (its service is known only once the agent found it)."""
    agent_backend = backend_names(service)[1]
    values = service.haproxy_env() | {"SERVICE_NAME": service.service_name, "SPOE_CONF": spoe_conf,
                                      "AGENT_BACKEND": agent_backend}
    if pattern:
        values["SWARM_DNS_TARGET"] = "-"
    return values


@dataclass(frozen=True, slots=True)
class Rendered:
    config: str  # services.cfg: every service's backend and agent backend
    spoe: dict[str, str]  # path -> each service's spoe.conf
    services_map: str  # `<route regex> <backend>` lines, most specific route first


def render(config: str, spoe_conf: str, main: Settings, services: Sequence[Settings],
           found: Sequence[Settings] = ()) -> Rendered:
    """The copies for `services` (service_settings(main)) and the patterns' backends `found`
    (pattern_backends(main)), from the shipped config and spoe.conf."""
    backend, agent = section(config, "backend be_app"), section(config, "backend be_agent")
    out = [f"# Written by haproxy-swarm from {main.config_file} and the shipped haproxy.cfg; do not edit.\n"]
    spoe: dict[str, str] = {}
    for one in [*services, *found]:
        spoe_path = os.path.join(main.run_dir, f"{one.service_name}.spoe.conf")
        values = service_values(one, spoe_path, pattern=one in found)
        be, be_agent = backend_names(one)
        out.append(substitute(backend, values).replace("backend be_app\n", f"backend {be}\n", 1))
        out.append(substitute(agent, values).replace("backend be_agent\n", f"backend {be_agent}\n", 1))
        spoe[spoe_path] = substitute(spoe_conf, values)
    # HAProxy takes the first regular expression that matches: the most specific route first, the
    # default service (no route: `^` matches anything) last.
    # HAProxy takes the first regular expression that matches: the most specific route first, the
    # default service (no route: `^` matches anything) last. A pattern's value is `@<name>`: fe_main
    # then looks the Host up in the on-demand map, or asks the agent.
    backends = {line.name: f"@{line.name}" if line.on_demand else f"be_{line.name}" for line in main.services}
    entries = sorted(((line.route.rank, line.route.regex()) if line.route else ((9, 0, 0), "^"), backends[line.name])
                     for line in main.services)
    return Rendered("\n".join(out), spoe, "".join(f"{regex} {be}\n" for (_, regex), be in entries))


def ondemand_map(main: Settings) -> str:
    """Host -> the pattern's backend the agent gave the service it found for that Host."""
    return os.path.join(main.run_dir, ONDEMAND_MAP)


def write(rendered: Rendered, main: Settings, services: Sequence[Settings]) -> tuple[str, str]:
    """Write the files into RUN_DIR (each atomically) and create the services' (and the patterns' backends') empty
    maps and the on-demand map; returns (services.cfg path, services.map path)."""
    os.makedirs(main.run_dir, exist_ok=True)
    config_path = os.path.join(main.run_dir, SERVICES_CONFIG)
    map_path = os.path.join(main.run_dir, SERVICES_MAP)
    files = {config_path: rendered.config, map_path: rendered.services_map, **rendered.spoe}
    for path, text in files.items():
        write_atomically(path, text.encode())
    for one in services:
        for path in (one.cookie_map, one.slot_map, one.server_cookie_map, ondemand_map(main)):
            if not os.path.exists(path):
                Path(path).touch()
    return config_path, map_path


__all__ = ["SERVICES_CONFIG", "SERVICES_MAP", "Rendered", "render", "section", "substitute", "write"]
