"""Several services behind one `haproxy-swarm run`, on loopback: for the demo and the tests.

Owns: one dnsmasq serving `tasks.<name>` for each service, each service's backends on its own
loopback network (127.0.<10+k>.x, so an answer's X-Served-By tells which service served it), a
SWARM_CONFIG_FILE with one line per service, and `haproxy-swarm run` reading it. Scaling a service
changes its DNS records and backend processes; `rewrite` changes the file while `run` is running.
Must not: leave a process behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Self

from spoa.config import DEFAULT_ON_DEMAND
from spoa.local.backends import Backend
from spoa.local.ports import free_port, free_ports
from spoa.local.stack import Stack, parse_servers_state


@dataclass
class Service:
    """One service of the file: its line's route and options, and its task slots."""

    name: str
    route: str | None  # None: the default service
    options: str = ""
    tasks: Sequence[Backend] = ()
    members: Sequence[int] = ()

    def line(self, port: int) -> str:
        target = f"tasks.{self.name}:{port}"
        return " ".join(word for word in (self.route or "", target, self.options) if word)


# A service that is in DNS only, for a pattern to find (`Services(..., patterns=...)`).
ON_DEMAND = "(on demand)"


class Services(Stack):
    """`Stack`, with several services from a SWARM_CONFIG_FILE instead of one SWARM_SERVICE."""

    def __init__(self, services: Sequence[tuple[str, str | None, str]], n_slots: int = 4,
                 env: Mapping[str, str] | None = None, refresh: float = 0.5,
                 patterns: Sequence[tuple[str, str]] = (), ports: tuple[int, int, int] | None = None) -> None:
        """`services`: (name, route or None for the default service, options) per line; a route
        ON_DEMAND: in DNS only, for `patterns` to find: (route such as `*.apps.example.com`,
        options) lines whose target is `tasks.{1}:<port>`. `ports`: (traffic, stats, metrics)."""
        port = free_port("127.0.10.2")
        super().__init__(n_slots=0, env=env, refresh=refresh, backend_port=port, ports=ports)
        self.patterns = list(patterns)
        # SPOP ports: one per service, one per slot of each pattern (max=, 8 by default), one more.
        self.agent_port = free_ports(len(services) + sum(_max(options) for _, options in patterns) + 1)
        self.services = {
            name: Service(name, route, options,
                          [Backend(f"127.0.{10 + k}.{i + 2}", port, name=f"{name}-{i + 1}") for i in range(n_slots)])
            for k, (name, route, options) in enumerate(services)}
        self.tasks = [task for service in self.services.values() for task in service.tasks]
        self.config_file = os.path.join(self.run_dir, "my-config")
        self.write_config()

    def write_config(self, names: Iterable[str] | None = None) -> None:
        """Write the file with the services `names` (all by default), atomically, as Swarm does."""
        self.listed = [n for n in (self.services if names is None else names) if self.services[n].route != ON_DEMAND]
        lines = [self.services[n].line(self.backend_port) for n in self.listed]
        lines += [f"{route} tasks.{{1}}:{self.backend_port} {options}".rstrip() for route, options in self.patterns]
        tmp = self.config_file + ".tmp"
        with open(tmp, "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, self.config_file)

    def env(self) -> dict[str, str]:
        env = super().env()
        del env["SWARM_SERVICE"]
        return env | {"SWARM_CONFIG_FILE": self.config_file}

    def start(self, members: Iterable[int] = (0, 1), wait: bool = True, start_backends: bool = True,
              members_of: Mapping[str, Iterable[int]] | None = None) -> Self:
        """Start with the task slots `members` of every service in DNS (`members_of`: other slots
        for the services it names)."""
        try:
            for service in self.services.values():
                service.members = sorted(set((members_of or {}).get(service.name, members)))
                if start_backends:
                    for i in service.members:
                        service.tasks[i].start()
            super().start(members=(), wait=False, start_backends=False)  # DNS: scale() below
            if wait:
                for name in self.listed:
                    self.wait_service(name, self.services[name].members)
        except BaseException:
            self.stop()  # `with` never reaches __exit__ when __enter__ fails: nothing may be left running
            raise
        return self

    def scale(self, members: Iterable[int], wait: bool = True, start_backends: bool = True,
              stop_removed: bool = True) -> None:
        """(Stack.start's hook) DNS for every service as it is now; `members` is ignored."""
        self._publish_dns()

    def scale_service(self, name: str, members: Iterable[int], wait: bool = True,
                      start_backends: bool = True) -> None:
        service = self.services[name]
        wanted = sorted(set(members))
        if start_backends:
            for i in wanted:
                service.tasks[i].start()
        service.members = wanted
        self._publish_dns()
        if wait:
            self.wait_service(name, wanted)
            # As a Swarm task ends its requests in flight on SIGTERM: a removed task stops once the
            # agent has drained and deleted its server (DRAIN_TIMEOUT), not while a request waits on it.
            self.wait_removed(name)
        for i, task in enumerate(service.tasks):
            if i not in wanted:
                task.stop()

    def wait_removed(self, name: str, timeout: float = 20.0) -> None:
        """Wait until be_`name` holds no server of a task that is not a member (drained and deleted)."""
        service = self.services[name]
        gone = {t.address for i, t in enumerate(service.tasks) if i not in service.members}
        deadline = time.monotonic() + timeout
        while any(f"{r['srv_addr']}:{r['srv_port']}" in gone for r in self.servers_of(name)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"be_{name} still holds a removed task's server:\n{self.log_tail()}")
            time.sleep(0.05)

    def _publish_dns(self) -> None:
        self.dns.set_hosts({f"tasks.{s.name}": [s.tasks[i].ip for i in s.members]
                            for s in self.services.values() if s.members})

    # ------------------------------------------------------------------ HAProxy's view

    def service_of(self, address: str | None) -> str | None:
        """The service whose task has `address` (an answer's X-Served-By), or None."""
        return next((s.name for s in self.services.values() for t in s.tasks if t.address == address), None)

    def servers_of(self, name: str) -> list[dict[str, str]]:
        try:
            rows = parse_servers_state(self.command(f"show servers state be_{name}"))
        except OSError:
            return []
        return [r for r in rows if not r.get("srv_name", "").startswith("dns")]

    def up_of(self, name: str) -> set[str]:
        return {f"{r['srv_addr']}:{r['srv_port']}" for r in self.servers_of(name)
                if r.get("srv_op_state") == "2" and r.get("srv_admin_state") == "0"}

    def wait_service(self, name: str, slots: Iterable[int], timeout: float = 20.0) -> float:
        """Wait until HAProxy has exactly the task slots `slots` of service `name` UP and the
        agent's /readyz answers 200. Returns the seconds it took."""
        want = {self.services[name].tasks[i].address for i in slots}
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            self.check_running()
            if self.up_of(name) == want and self.readyz()[0] == 200:
                return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"be_{name}: {sorted(self.up_of(name))} UP, wanted {sorted(want)}; /readyz "
                           f"{self.readyz()}; log:\n{self.log_tail()}")


def _max(options: str) -> int:
    """A pattern line's max= (spoa.config.DEFAULT_ON_DEMAND when not given)."""
    return next((int(word[4:]) for word in options.split() if word.startswith("max=")), DEFAULT_ON_DEMAND)


__all__ = ["ON_DEMAND", "Service", "Services"]
