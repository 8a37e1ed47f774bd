"""The Swarm test's hands: the docker CLI, the swarm's lifecycle, task lookups, HAProxy's stats
seen from inside a task, and the arithmetic over the users' records.

Owns: everything the test starts on the Docker engine (the swarm when it was not active, stacks,
Swarm configs, the client container) and taking it all down again, also when a test fails;
`Swarm.close()` reports anything still there. Must not: touch a swarm, stack, config or container
it did not create, or send traffic anywhere but 127.0.0.1 and the containers the test started.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))  # tests/polling.py, shared with the rest of the suite
from polling import wait_for  # noqa: E402

__all__ = ["REPO", "Images", "Record", "Swarm", "docker", "wait_for"]

# Debian's client, which matches Debian's daemon (scripts/dockerd prints the same path).
DOCKER = "/usr/bin/docker"


def docker(*args: str, input: str | None = None, timeout: float = 120.0, check: bool = True) -> str:
    """Run `docker ARGS` and return its stdout; fails naming the command and its stderr."""
    proc = subprocess.run([DOCKER, *args], input=input, capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass(frozen=True)
class Images:
    debian: str
    haproxy: str
    backend: str
    project: str

    @classmethod
    def build(cls) -> Images:
        """scripts/swarm-images: builds what changed, seconds when nothing did."""
        proc = subprocess.run([str(REPO / "scripts" / "swarm-images")], capture_output=True, text=True,
                              timeout=1800, check=False)
        if proc.returncode != 0:
            raise AssertionError(f"scripts/swarm-images failed:\n{proc.stderr[-3000:]}")
        names = dict(line.split("=", 1) for line in proc.stdout.split())
        return cls(names["debian"], names["haproxy"], names["backend"], names["project"])


@dataclass(frozen=True)
class Task:
    container: str
    ip: str  # the task's address on the stack's network
    health: str  # the container's HEALTHCHECK status, "" without one


@dataclass
class Swarm:
    """A swarm (`start` makes a single-node one on 127.0.0.1 when the engine has none) and what the
    test put on it."""

    created: bool = False
    made_gwbridge: bool = False  # `swarm init` made docker_gwbridge; `close` removes it after leaving
    stacks: list[str] = field(default_factory=list)
    configs: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)

    def start(self) -> None:
        docker("version")  # fails with the reason when no daemon answers (run scripts/dockerd)
        state = docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip()
        if state == "inactive":
            self.made_gwbridge = not gwbridge_exists()
            docker("swarm", "init", "--advertise-addr", "127.0.0.1")
            self.created = True
        elif state != "active":
            raise AssertionError(f"this Docker engine's swarm is {state!r}; the test needs it inactive or active")

    def create_config(self, name: str, content: str) -> None:
        """As users type it: `echo "CONTENT" | docker config create NAME -`."""
        self.configs.append(name)
        subprocess.run(["sh", "-c", f'echo "{content}" | {DOCKER} config create {name} -'], check=True,
                       capture_output=True, timeout=60, cwd=REPO)

    def deploy(self, stack: str, *files: str) -> None:
        """`docker stack deploy -c FILE...`; `--resolve-image never`: there is no registry to ask."""
        self.stacks.append(stack)
        args = [a for f in files for a in ("-c", f)]
        docker("stack", "deploy", "--resolve-image", "never", *args, stack)

    def remove_stack(self, stack: str, timeout: float = 90.0) -> None:
        """`docker stack rm`, then wait until none of its services, containers or networks is left."""
        docker("stack", "rm", stack)
        wait_for(lambda: not self.leftovers_of(stack), f"stack {stack} gone: {self.leftovers_of(stack)}",
                 timeout=timeout, interval=0.5)
        if stack in self.stacks:
            self.stacks.remove(stack)

    @staticmethod
    def leftovers_of(stack: str) -> list[str]:
        label = f"label=com.docker.stack.namespace={stack}"
        found = docker("service", "ls", "-q", "--filter", label).split()
        found += docker("ps", "-aq", "--filter", label).split()
        found += docker("network", "ls", "-q", "--filter", label).split()
        return found

    def run_container(self, name: str, *args: str) -> None:
        self.containers.append(name)
        docker("run", "-d", "--name", name, *args)

    def remove_container(self, name: str) -> None:
        docker("rm", "-f", name, check=False)
        if name in self.containers:
            self.containers.remove(name)

    def close(self) -> list[str]:
        """Take down everything the test made, in order; return what is still there (nothing, normally)."""
        for name in list(self.containers):
            self.remove_container(name)
        for stack in list(self.stacks):
            with contextlib.suppress(AssertionError):  # what is left is reported below
                self.remove_stack(stack)
        for config in self.configs:
            docker("config", "rm", config, check=False)
        left = [f"stack {s}: {self.leftovers_of(s)}" for s in self.stacks if self.leftovers_of(s)]
        left += [f"container {c}" for c in self.containers
                 if docker("ps", "-aq", "--filter", f"name=^{c}$").strip()]
        if self.configs and self.created is False:
            left += [f"config {c}" for c in self.configs
                     if docker("config", "ls", "-q", "--filter", f"name={c}").strip()]
        if self.created:
            docker("swarm", "leave", "--force")
            state = docker("info", "--format", "{{.Swarm.LocalNodeState}}").strip()
            if state != "inactive":
                left.append(f"swarm still {state}")
        if self.made_gwbridge:
            docker("network", "rm", "docker_gwbridge", check=False)
            if gwbridge_exists():
                left.append("network docker_gwbridge")
        return left


def gwbridge_exists() -> bool:
    """docker_gwbridge: the bridge `swarm init` (or a join) makes and `swarm leave` keeps."""
    return bool(docker("network", "ls", "-q", "--filter", "name=^docker_gwbridge$").strip())


def tasks(service: str, network: str) -> list[Task]:
    """The running containers of `service` with their address on `network` and their health."""
    ids = docker("ps", "-q", "--filter", f"label=com.docker.swarm.service.name={service}").split()
    if not ids:
        return []
    found = []
    for c in json.loads(docker("inspect", *ids)):
        if not c["State"]["Running"]:
            continue
        net = c["NetworkSettings"]["Networks"].get(network)
        health = (c["State"].get("Health") or {}).get("Status", "")
        if net and net.get("IPAddress"):
            found.append(Task(c["Id"][:12], net["IPAddress"], health))
    return sorted(found, key=lambda t: t.ip)


def in_task(container: str, url: str, timeout: float = 20.0) -> str:
    """GET `url` from inside a task of the project image (its own loopback): stats, metrics."""
    code = f"import urllib.request;print(urllib.request.urlopen({url!r}, timeout=5).read().decode())"
    return docker("exec", container, "python3", "-c", code, timeout=timeout)


def app_servers(container: str, backend: str = "be_app") -> dict[str, str]:
    """`backend`'s agent-written servers and their status, from the stats CSV of the HAProxy in
    `container`: {"10.0.1.5_80": "UP", ...}."""
    return backend_servers(in_task(container, "http://127.0.0.1:8888/;csv"), backend)


def backend_servers(stats_csv: str, backend: str) -> dict[str, str]:
    """`backend`'s agent-written servers (not the `dns` fallbacks) and their status, from HAProxy's
    stats CSV (`/;csv` of the stats page)."""
    servers = {}
    for row in stats_csv.splitlines()[1:]:
        cols = row.split(",")
        if len(cols) > 17 and cols[0] == backend and cols[1] not in ("BACKEND", "FRONTEND") \
                and not cols[1].startswith("dns"):
            servers[cols[1]] = cols[17]
    return servers


def server_name(ip: str, port: int = 80) -> str:
    return f"{ip}_{port}"


@dataclass(frozen=True)
class Record:
    """One request of tests/swarm/swarmload.py (see its docstring)."""

    t: float
    user: str
    replica: str | None
    status: int
    served_by: str | None
    cookie_set: bool
    error: str
    retried_from: str | None
    latency: float

    @property
    def ok(self) -> bool:
        return self.status == 200 and bool(self.served_by)

    @property
    def task(self) -> str | None:
        """The serving task's address (X-Served-By without the port)."""
        return self.served_by.rsplit(":", 1)[0] if self.served_by else None


def read_records(path: Path) -> list[Record]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue  # a line still being written
        records.append(Record(d["t"], d["user"], d.get("replica"), d["status"], d.get("served_by"),
                              d.get("cookie_set", False), d.get("error", ""), d.get("retried_from"),
                              d.get("latency", 0.0)))
    return records


@dataclass
class Step:
    """What one change (a scale, a kill, a restart) did to the users, over [start, end)."""

    name: str
    requests: int = 0
    failed: int = 0
    retried: int = 0  # refused connections sent again to the other replica (nothing had been sent)
    users_kept: int = 0  # users whose task stayed and who stayed on it
    users_moved: list[str] = field(default_factory=list)  # users whose task stayed but who moved
    users_of_removed: int = 0  # users whose task went away (they may move)
    new_users: int = 0
    new_users_tasks: set[str] = field(default_factory=set)
    # users served by two tasks after settling: those whose task stayed, and new users
    disagreements: list[str] = field(default_factory=list)
    # users of removed tasks served by more than one task before they settled on their new one
    removed_bounced: int = 0
    # users of removed tasks whose last answers of the step name more than one task (must be none)
    removed_unsettled: list[str] = field(default_factory=list)
    failures: list[Record] = field(default_factory=list)
    slowest: float = 0.0

    def line(self) -> str:
        return (f"{self.name}: {self.requests} requests, {self.failed} failed, {self.retried} retried on the "
                f"other replica; users kept {self.users_kept}, moved {len(self.users_moved)}, on removed tasks "
                f"{self.users_of_removed} ({self.removed_bounced} served by two tasks before settling); "
                f"{self.new_users} new users on {len(self.new_users_tasks)} tasks; "
                f"slowest answer {self.slowest:.2f} s")


def step_problems(step: Step) -> list[str]:
    """What went wrong in a scale step, for every service alike: failed requests, users moved while
    their task stayed, replicas that disagree, users of a removed task not settled on one task."""
    problems = []
    if step.failed:
        problems.append(f"{step.name}: failed requests {step.failures[:5]}")
    if step.users_moved:
        problems.append(f"{step.name}: users whose task stayed but who moved: {step.users_moved}")
    if step.disagreements:
        problems.append(f"{step.name}: {step.disagreements[:5]}")
    if step.removed_unsettled:
        problems.append(f"{step.name}: users of removed tasks not settled {step.removed_unsettled[:5]}")
    return problems


def analyse(name: str, records: Iterable[Record], start: float, settled: float, end: float,
            members_after: set[str]) -> Step:
    """The users' view of one change: requests in [start, end); a user's home is the task of its
    last good answer before `start`; after `settled` (HAProxy shows the new members UP) every user
    must be served by one task only."""
    step = Step(name)
    home: dict[str, str] = {}
    first_seen: dict[str, float] = {}
    during: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        first_seen.setdefault(r.user, r.t)
        if r.t < start:
            if r.ok and r.task:
                home[r.user] = r.task
        elif r.t < end:
            during[r.user].append(r)
            step.requests += 1
            step.retried += r.retried_from is not None
            step.slowest = max(step.slowest, r.latency)
            if not r.ok:
                step.failed += 1
                step.failures.append(r)
    for user, rs in during.items():
        tasks_seen = {r.task for r in rs if r.ok}
        if user in home:
            if home[user] in members_after:
                if tasks_seen - {home[user]}:
                    step.users_moved.append(user)
                else:
                    step.users_kept += 1
            else:
                step.users_of_removed += 1
                step.removed_bounced += len(tasks_seen) > 1
                last = {r.task for r in rs[-4:] if r.ok}
                if len(last) > 1 or not last <= members_after:
                    step.removed_unsettled.append(f"{user}: {sorted(t for t in last if t)}")
                continue
        elif first_seen[user] >= settled:
            step.new_users += 1
            step.new_users_tasks |= {t for t in tasks_seen if t}
        after = {r.task for r in rs if r.ok and r.t >= settled}
        if len(after) > 1:
            step.disagreements.append(f"{user}: {sorted(t for t in after if t)}")
    return step
