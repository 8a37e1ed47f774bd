"""The services' HAProxy backends, rendered from the shipped haproxy.cfg's `be_app`, with their members.

Owns: turning the shipped config's `be_app` (and, for several services, `be_agent` and spoe.conf)
into one copy per service (SWARM_CONFIG_FILE; spoa.config.service_settings), where each `${NAME}`
the service sets is replaced by the service's value - exactly what HAProxy's own environment
expansion would give, had the service's settings been the environment - and writing them, with
the services map fe_main routes by, into RUN_DIR. One service or fifty take this one path (the one
service of a one-line file keeps the names `be_app` and `be_agent`). `run` passes the file to HAProxy
after the shipped one (`-f haproxy.cfg -f services.cfg`; RENDERED=1 keeps the shipped `be_app` out),
so the shipped file stays the only template: there is no second copy of the chain walk to keep in
step. Each backend also lists the servers the agent holds in it at that moment (`server` lines with
the keywords of its `add server`), so a reload starts from the same servers, and, through the
server-state file `run` saves beside it, with the same health: nobody moves. Written at start, when
the file of services changes, before a reload and when the agent's servers changed; never needed
for a scale event itself (the agent writes servers through the runtime API).
Must not: invent configuration of its own beyond renaming the sections and listing the servers.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from spoa.config import Settings
from spoa.haproxy.answers import ServerState
from spoa.haproxy.reconcile import CheckSettings, owned_members, server_keywords
from spoa.haproxy.table import write_atomically

_SECTION = re.compile(r"^(global|defaults|frontend|backend|listen|resolvers|peers|userlist|program|"
                      r"http-errors|ring|cache|mailers)\b(.*)$")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

SERVICES_CONFIG = "services.cfg"
SERVICES_MAP = "services.map"
SERVER_STATE = "servers.state"
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
    # around the next section), and one closed in it that it did not open (an `.if` around this
    # section) to what precedes it: leave both out.
    opened: list[int] = []
    unmatched: set[int] = set()
    for n, line in enumerate(lines):
        if line.startswith(".if"):
            opened.append(n)
        elif line.startswith(".endif"):
            if opened:
                opened.pop()
            else:
                unmatched.add(n)
    if opened:
        lines = lines[:opened[0]]
    return "\n".join(line for n, line in enumerate(lines) if n not in unmatched) + "\n"


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


def server_lines(servers: Sequence[ServerState], checks: CheckSettings) -> str:
    """The `server` lines of the agent's servers among `servers` (one backend's), as `add server`
    creates them. Other servers (an operator's, the DNS fallback's) are left out."""
    return "".join(f"    server {member.server_name} {member.address} {server_keywords(checks)}\n"
                   for _, member in owned_members(servers))


def with_servers(section_text: str, lines: str) -> str:
    """The section with the `server` lines right under its header: the stats page lists a backend's
    servers in their config order, so the service's tasks come before its DNS fallback's slots."""
    header, _, body = section_text.partition("\n")
    return f"{header}\n{lines}{body}"


@dataclass(frozen=True, slots=True)
class Rendered:
    config: str  # services.cfg: every service's backend and agent backend
    spoe: dict[str, str]  # path -> each service's spoe.conf
    services_map: str  # `<route regex> <backend>` lines, most specific route first


def render(config: str, spoe_conf: str, main: Settings, services: Sequence[Settings],
           found: Sequence[Settings] = (), servers: Mapping[str, Sequence[ServerState]] | None = None,
           checks: CheckSettings | None = None) -> Rendered:
    """The copies for `services` (service_settings(main)) and the patterns' backends `found`
    (pattern_backends(main)), from the shipped config and spoe.conf; `servers`: what HAProxy holds,
    by backend name (`show servers state`), whose agent-owned servers each copy lists."""
    servers = servers or {}
    checks = checks or CheckSettings()
    backend, agent = section(config, "backend be_app"), section(config, "backend be_agent")
    out = [f"# Written by haproxy-swarm from {main.config_file} and the shipped haproxy.cfg; do not edit.\n"]
    if not main.services:
        # The one service of a one-line file: the shipped names (be_app, be_agent, spoe.conf as it is).
        values = main.haproxy_env() | {"SERVICE_NAME": "-", "AGENT_BACKEND": "be_agent"}
        out.append(with_servers(substitute(backend, values), server_lines(servers.get("be_app", ()), checks)))
        out.append(substitute(section(config, "backend be_app_dns"), values))
        out.append(substitute(agent, values))
        return Rendered("\n".join(out), {}, "")
    spoe: dict[str, str] = {}
    for one in [*services, *found]:
        spoe_path = os.path.join(main.run_dir, f"{one.service_name}.spoe.conf")
        values = service_values(one, spoe_path, pattern=one in found)
        be, be_agent = backend_names(one)
        out.append(with_servers(substitute(backend, values).replace("backend be_app\n", f"backend {be}\n", 1),
                                server_lines(servers.get(be, ()), checks)))
        out.append(substitute(agent, values).replace("backend be_agent\n", f"backend {be_agent}\n", 1))
        spoe[spoe_path] = substitute(spoe_conf, values)
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


__all__ = ["SERVER_STATE", "SERVICES_CONFIG", "SERVICES_MAP", "Rendered", "render", "section", "substitute", "write"]
