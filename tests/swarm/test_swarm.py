"""The image on a real Docker Swarm (single node, 127.0.0.1), end to end: issue 10, part 2.

Needs a Docker engine (`scripts/dockerd`) and builds its images with `scripts/swarm-images`
(cached by content). Runs only when selected: `pytest -m swarm tests/swarm -s` (-s prints the
figures). Test traffic goes to 127.0.0.1 (the old stack file's host-mode ports) and to the task
addresses of the stacks the test deployed, from a client container the test started on the
stack's network; nothing else. Everything the test starts, it removes, also on failure, and the
last check is that nothing is left (`Swarm.close`).
"""

from __future__ import annotations

import http.client
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from swarmkit import (
    REPO,
    Images,
    Record,
    Step,
    Swarm,
    analyse,
    app_servers,
    backend_servers,
    docker,
    in_task,
    read_records,
    server_name,
    step_problems,
    tasks,
    wait_for,
)

pytestmark = pytest.mark.swarm

STACK = "demo"  # the name docker-stack.yml's first line deploys it under
HAPROXY = f"{STACK}_haproxy-swarm"
BACKEND = f"{STACK}_backend"
NETWORK = f"{STACK}_backend"
CLIENT = "haproxy-swarm-test-client"
NEW_USERS_PER_STEP = 12
FIRST_VISITS = 60  # new users from one address over the old tool's backend scaled to 3 tasks


@pytest.fixture(scope="module")
def images() -> Images:
    return Images.build()


@pytest.fixture(scope="module")
def swarm(images: Images) -> Iterator[Swarm]:
    s = Swarm()
    try:
        s.start()
        yield s
    finally:
        left = s.close()
    assert not left, f"left behind: {left}"


def stats_csv(port: int = 8888) -> str:
    try:
        return get_local(port, "/;csv").body.decode()  # type: ignore[attr-defined,no-any-return]
    except OSError:
        return ""


def get_local(port: int, path: str = "/", cookie: str | None = None,
              headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", path, headers=(headers or {}) | ({"Cookie": cookie} if cookie else {}))
    resp = conn.getresponse()
    resp.body = resp.read()  # type: ignore[attr-defined]
    conn.close()
    return resp


def answers(port: int) -> bool:
    try:
        return get_local(port).status == 200
    except OSError:
        return False


@pytest.mark.timeout(300)
def test_the_old_tools_stack_file_runs_unchanged_but_the_publish_mode(swarm: Swarm) -> None:
    """The seed's set-up as its users type it: the Swarm config, then the old tool's stack file; its
    new users, all from one address, are spread over the backend's tasks (issue 17, part 4)."""
    for port in (8099, 8888):
        assert not answers(port), f"127.0.0.1:{port} is taken before the test; the stack publishes it"
    swarm.create_config("my-config", "tasks.backend:80")
    swarm.deploy("oldtool", "tests/swarm/stacks/old-tool.yml", "tests/swarm/stacks/old-tool.host-ports.yml")
    wait_for(lambda: len(tasks("oldtool_backend", "oldtool_default")) == 1, "the backend task runs", 60, 0.5)
    backend = tasks("oldtool_backend", "oldtool_default")[0]

    def task_up() -> bool:
        try:
            stats = get_local(8888, "/;csv").body.decode()  # type: ignore[attr-defined]
        except OSError:
            return False
        return any(row.startswith(f"be_app,{server_name(backend.ip)},") and ",UP," in row
                   for row in stats.splitlines())

    # The stats page on 127.0.0.1:8888 lists the task, UP (the agent wrote it into HAProxy).
    wait_for(task_up, "the stats page lists the backend task UP", 90, 0.5)

    first = get_local(8099)
    assert first.getheader("X-Served-By") == f"{backend.ip}:80", "served by the backend task"
    cookie = first.getheader("Set-Cookie")
    assert cookie and cookie.startswith("SWARMID="), "a first visit gets the sticky cookie"
    again = get_local(8099, cookie=cookie.split(";", 1)[0])
    assert again.getheader("X-Served-By") == f"{backend.ip}:80"
    assert again.getheader("Set-Cookie") is None, "a returning visitor is not given a new cookie"

    haproxy = tasks("oldtool_haproxy", "oldtool_default")
    assert len(haproxy) == 1
    wait_for(lambda: tasks("oldtool_haproxy", "oldtool_default")[0].health == "healthy",
             "the image's HEALTHCHECK reports healthy", 60, 1.0)

    # New users all from one address (the host-mode port's proxy: as behind the routing mesh or a
    # NAT) spread over the tasks, and each comes back to its own.
    scale("oldtool_backend", 3)
    members = {t.ip for t in tasks("oldtool_backend", "oldtool_default")}
    assert len(members) == 3
    wait_for(lambda: {name for name, status in backend_servers(stats_csv(), "be_app").items() if status == "UP"}
             == {server_name(ip) for ip in members}, "the stats page lists the 3 backend tasks UP", 90, 0.5)
    first_visits: list[tuple[str, str]] = []  # each new user's cookie and task
    for _ in range(FIRST_VISITS):
        resp = get_local(8099)
        served, set_cookie = resp.getheader("X-Served-By"), resp.getheader("Set-Cookie")
        assert resp.status == 200 and served and set_cookie, f"a first visit: HTTP {resp.status}, {served}"
        first_visits.append((set_cookie.split(";", 1)[0], served.rsplit(":", 1)[0]))
    share = {ip: sum(task == ip for _, task in first_visits) for ip in members}
    came_back = sum(get_local(8099, cookie=cookie).getheader("X-Served-By") == f"{task}:80"
                    for cookie, task in first_visits)
    print(f"old tool's stack file: {FIRST_VISITS} new users from one address over 3 tasks: "
          f"{sorted(share.values())}; {came_back} of {FIRST_VISITS} came back to their task")
    # Binomial(60, 1/3): 20 +- 3.7; fewer than 8 on a task is 1 in 2000 for a fair placement.
    assert min(share.values()) >= 8, f"new users from one address are not spread over the tasks: {share}"
    assert came_back == FIRST_VISITS, "every new user comes back to the task of its first visit"
    swarm.remove_stack("oldtool")


def scale(service: str, replicas: int) -> None:
    docker("service", "scale", f"{service}={replicas}", timeout=180)


def members_up_everywhere(haproxy: list[str], members: set[str]) -> bool:
    """Every HAProxy replica holds exactly `members` as agent-written servers, all UP: a removed
    member's server is gone (drained and deleted), not only out of the UP set, since HAProxy still
    sends its sticky users to a server in DRAIN."""
    want = {server_name(ip): "UP" for ip in members}
    return all(app_servers(container) == want for container in haproxy)


class Users:
    """The client container's users (tests/swarm/swarmload.py) and their records."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.wanted = 0

    def add(self, n: int) -> None:
        self.wanted += n
        (self.out / "users.tmp").write_text(str(self.wanted))
        (self.out / "users.tmp").rename(self.out / "users")

    def records(self) -> list[Record]:
        return read_records(self.out / "records.jsonl")

    def each_answered_since(self, t: float, n: int = 2) -> bool:
        """Every user has had `n` good answers since `t`."""
        seen: dict[str, int] = {}
        for r in self.records():
            seen.setdefault(r.user, 0)
            if r.t >= t and r.ok:
                seen[r.user] += 1
        return len(seen) >= self.wanted and all(c >= n for c in seen.values())


@pytest.mark.timeout(900)
def test_shipped_stack_scales_survives_a_kill_and_a_rolling_restart(swarm: Swarm,
                                                                    request: pytest.FixtureRequest) -> None:
    """docker-stack.yml as shipped (plus tests/swarm/stacks/docker-stack.sandbox.yml), two HAProxy
    replicas, sticky users all the time: scale 1 -> 3 -> 6 -> 2, kill a task, restart the replicas."""
    swarm.deploy(STACK, "docker-stack.yml", "tests/swarm/stacks/docker-stack.sandbox.yml")
    scale(BACKEND, 1)
    wait_for(lambda: len(tasks(HAPROXY, NETWORK)) == 2 and len(tasks(BACKEND, NETWORK)) == 1,
             "two HAProxy replicas and one backend task run", 120, 0.5)
    haproxy = [t.container for t in tasks(HAPROXY, NETWORK)]
    members = {t.ip for t in tasks(BACKEND, NETWORK)}
    wait_for(lambda: members_up_everywhere(haproxy, members), "both replicas have the backend task UP", 60, 0.5)

    out = Path(tempfile.mkdtemp(prefix="haproxy-swarm-test-"))
    request.addfinalizer(lambda: shutil.rmtree(out, ignore_errors=True))
    os.chmod(out, 0o777)  # the client container writes here
    users = Users(out)
    users.add(20)
    swarm.run_container(
        CLIENT, "--network", NETWORK, "--user", "0", "--entrypoint", "python3",
        "-v", f"{REPO / 'tests' / 'swarm'}:/load:ro", "-v", f"{out}:/out", "haproxy-swarm:latest",
        "/load/swarmload.py", "--replicas-dns", "tasks.haproxy-swarm", "--users-file", "/out/users",
        "--think", "0.5", "--out", "/out/records.jsonl", "--stop-file", "/out/stop", "--duration", "840")
    wait_for(lambda: users.each_answered_since(0, 3), "every first user has three answers", 60, 0.5)

    steps: list[Step] = []
    problems: list[str] = []

    def check(ok: bool, problem: str) -> None:
        if not ok:
            problems.append(problem)
    for replicas in (3, 6, 2):
        before = members
        start = time.time()
        scale(BACKEND, replicas)
        members = {t.ip for t in tasks(BACKEND, NETWORK)}
        assert len(members) == replicas
        wait_for(lambda m=members: members_up_everywhere(haproxy, m),  # type: ignore[misc]
                 f"both replicas have the {replicas} tasks UP and only them", 90, 0.3)
        settled = time.time()
        users.add(NEW_USERS_PER_STEP)
        wait_for(lambda s=settled: users.each_answered_since(s, 4), "every user answered 4 times after the change",
                 60, 0.5)
        step = analyse(f"scale {len(before)} -> {replicas}", users.records(), start, settled, time.time(), members)
        steps.append(step)
        print(step.line())
        problems.extend(step_problems(step))
        check(step.new_users >= NEW_USERS_PER_STEP, f"{step.name}: only {step.new_users} new users")
        if replicas > len(before):
            # First visits are placed by load (HAProxy's `balance`), not dealt round robin: 12 new users
            # over 6 tasks may leave one task without any (measured: 5 of 6 in two of three runs),
            # so the new tasks must take part, not each get a share (tests/test_first_visits.py does).
            new_reached = len(step.new_users_tasks & (members - before))
            print(f"{step.name}: new users reached {new_reached} of the {len(members - before)} new tasks")
            check(new_reached > 0, f"{step.name}: no new user reached a new task ({step.new_users_tasks})")

    # docker kill one backend task: Swarm replaces it; no request fails once HAProxy marks it down.
    victim = tasks(BACKEND, NETWORK)[0]
    start = time.time()
    docker("kill", victim.container)
    wait_for(lambda: all(app_servers(c).get(server_name(victim.ip)) != "UP" for c in haproxy),
             "both replicas mark the killed task down", 30, 0.1)
    marked_down = time.time()
    wait_for(lambda: len({t.ip for t in tasks(BACKEND, NETWORK)} - {victim.ip}) == 2,
             "Swarm replaces the killed task", 60, 0.5)
    members = {t.ip for t in tasks(BACKEND, NETWORK)} - {victim.ip}
    wait_for(lambda: members_up_everywhere(haproxy, members), "the replacement is UP on both replicas", 90, 0.3)
    settled = time.time()
    wait_for(lambda: users.each_answered_since(settled, 4), "every user answered 4 times after the kill", 60, 0.5)
    records = users.records()
    kill = analyse("kill one task", records, start, settled, time.time(), members)
    after_down = analyse("kill, after marked down", records, marked_down, settled, time.time(), members)
    print(f"{kill.line()}; marked down on both replicas {marked_down - start:.1f} s after the kill; "
          f"failed before that: {kill.failed - after_down.failed}")
    steps.append(kill)
    check(after_down.failed == 0, f"kill: failed after marked down {after_down.failures[:5]}")
    check(not kill.users_moved, f"kill: users moved {kill.users_moved}")
    check(not kill.disagreements, f"kill: {kill.disagreements[:5]}")
    check(not kill.removed_unsettled, f"kill: users of the killed task not settled {kill.removed_unsettled[:5]}")

    # A rolling restart of the two HAProxy replicas (update_config: start-first).
    start = time.time()
    docker("service", "update", "--force", HAPROXY, timeout=300)
    new_haproxy = [t.container for t in tasks(HAPROXY, NETWORK)]
    assert len(new_haproxy) == 2 and not set(new_haproxy) & set(haproxy), "both replicas were replaced"
    haproxy = new_haproxy
    wait_for(lambda: members_up_everywhere(haproxy, members), "the new replicas have every task UP", 60, 0.3)
    settled = time.time()
    wait_for(lambda: users.each_answered_since(settled, 4), "every user answered four times after the restart",
             60, 0.5)
    restart = analyse("rolling restart of haproxy", users.records(), start, start, time.time(), members)
    print(f"{restart.line()}; the update took {settled - start:.1f} s")
    steps.append(restart)
    check(restart.failed == 0, f"rolling restart: failed requests {restart.failures[:5]}")
    check(not restart.users_moved, f"rolling restart: users moved {restart.users_moved}")
    check(not restart.disagreements, f"rolling restart: replicas disagree {restart.disagreements[:5]}")

    (out / "stop").touch()
    wait_for(lambda: docker("inspect", "-f", "{{.State.Running}}", CLIENT).strip() == "false",
             "the client container stops", 30, 0.5)
    swarm.remove_container(CLIENT)
    total = users.records()
    print(f"total: {len(total)} requests from {len({r.user for r in total})} users, "
          f"{sum(not r.ok for r in total)} failed, slowest answer {max(r.latency for r in total):.2f} s")

    # The image's HEALTHCHECK, the stats page of each replica, the agent's /metrics.
    wait_for(lambda: all(t.health == "healthy" for t in tasks(HAPROXY, NETWORK)),
             "both replicas' HEALTHCHECK reports healthy", 60, 1.0)
    for container in haproxy:
        assert app_servers(container) == {server_name(ip): "UP" for ip in members}
        stats_html = in_task(container, "http://127.0.0.1:8888/")
        for ip in members:
            assert server_name(ip) in stats_html
        metrics = in_task(container, "http://127.0.0.1:9101/metrics")
        assert "haproxy_swarm_build_info" in metrics

    swarm.remove_stack(STACK)
    # Every step ran (each one's figures are printed); the requirements they missed fail the test here.
    assert not problems, "\n".join(problems)


# Two services behind one haproxy-swarm (issue 12): two lines routed by Host, no default service.
TWO_STACK = "twosvc"
TWO_NETWORK = f"{TWO_STACK}_apps"
TWO_SERVICES = ("shop.localhost tasks.shop:80 key=cookie:SWARMID\n"
                "api.localhost tasks.api:80 key=header:X-User")
HOSTS = {"shop": "shop.localhost", "api": "api.localhost"}


class Crowd:
    """Users of the two services on 127.0.0.1:8099 (the HAProxy replica's host-mode port), each
    its own thread and cookie jar, one request at a time on a fresh connection, `think` seconds
    apart; a shop user sends `Host: shop.localhost`, an api user `Host: api.localhost` and its
    `X-User` (the api's sticky key). Anything but a 200 with an X-Served-By is a failure."""

    def __init__(self, think: float = 0.2) -> None:
        self.think = think
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.records: dict[str, list[Record]] = {name: [] for name in HOSTS}
        self.cookie_names: dict[str, set[str]] = {name: set() for name in HOSTS}
        self.threads: list[threading.Thread] = []

    def add(self, service: str, n: int) -> None:
        for _ in range(n):
            name = f"{service}-{sum(t.name.startswith(service + '-') for t in self.threads):02d}"
            t = threading.Thread(target=self.user, args=(service, name), name=name, daemon=True)
            self.threads.append(t)
            t.start()

    def user(self, service: str, name: str) -> None:
        cookies: dict[str, str] = {}
        headers = {"Host": HOSTS[service], "Connection": "close"} | ({"X-User": name} if service == "api" else {})
        while not self.stop.is_set():
            t = time.time()
            status, served_by, cookie_set, error = 0, None, False, ""
            try:
                jar = "; ".join(f"{k}={v}" for k, v in cookies.items()) or None
                resp = get_local(8099, cookie=jar, headers=headers)
                status, served_by = resp.status, resp.getheader("X-Served-By")
                set_cookie = resp.getheader("Set-Cookie")
                if set_cookie:
                    cookie_set = True
                    key, _, rest = set_cookie.partition("=")
                    cookies[key.strip()] = rest.split(";", 1)[0].strip()
                    with self.lock:
                        self.cookie_names[service].add(key.strip())
            except (OSError, http.client.HTTPException) as e:
                error = repr(e)
            record = Record(t, name, None, status, served_by, cookie_set, error, None, round(time.time() - t, 4))
            with self.lock:
                self.records[service].append(record)
            self.stop.wait(self.think)

    def of(self, service: str) -> list[Record]:
        with self.lock:
            return list(self.records[service])

    def users(self, service: str) -> int:
        return sum(t.name.startswith(service + "-") for t in self.threads)

    def each_answered_since(self, t: float, n: int) -> bool:
        """Every user of both services has had `n` good answers since `t`."""
        for service in HOSTS:
            seen: dict[str, int] = {}
            for r in self.of(service):
                seen[r.user] = seen.get(r.user, 0) + (r.t >= t and r.ok)
            if len(seen) < self.users(service) or any(c < n for c in seen.values()):
                return False
        return True

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)


@pytest.mark.timeout(300)
def test_two_services_behind_one_haproxy_swarm_stay_apart(swarm: Swarm, request: pytest.FixtureRequest) -> None:
    """One haproxy-swarm, one Swarm config with two lines routed by Host (tests/swarm/stacks/
    two-services.yml): every answer comes from a task of the service the Host names, each user
    stays on its task, scaling one service disturbs no user of the other, an unknown Host is a 404."""
    for port in (8099, 8888):
        assert not answers(port), f"127.0.0.1:{port} is taken before the test; the stack publishes it"
    swarm.create_config("two-services", TWO_SERVICES)
    swarm.deploy(TWO_STACK, "tests/swarm/stacks/two-services.yml")

    def service(name: str) -> str:
        return f"{TWO_STACK}_{name}"

    def running(name: str) -> set[str]:
        return {t.ip for t in tasks(service(name), TWO_NETWORK)}

    wait_for(lambda: len(running("shop")) == 2 and len(running("api")) == 2 and len(running("haproxy-swarm")) == 1,
             "two shop tasks, two api tasks and one HAProxy replica run", 120, 0.5)
    members = {name: running(name) for name in HOSTS}
    ever = {name: set(ips) for name, ips in members.items()}  # every address a service's tasks had

    def each_backend_has_its_tasks() -> bool:
        """be_shop holds exactly the shop tasks, all UP, and be_api the api tasks (stats on 127.0.0.1:8888)."""
        csv = stats_csv()
        return all(backend_servers(csv, f"be_{name}") == {server_name(ip): "UP" for ip in ips}
                   for name, ips in members.items())

    try:
        wait_for(each_backend_has_its_tasks, "be_shop and be_api each list their own tasks UP", 90, 0.3)
    except AssertionError as e:
        logs = docker("service", "logs", "--tail", "20", service("haproxy-swarm"), check=False, timeout=30)
        raise AssertionError(f"{e}\nstats:\n{stats_csv()}\nhaproxy-swarm's log:\n{logs}") from None

    # A Host no line routes: HAProxy's 404, no task asked.
    for host in ("unknown.localhost", "shop.localhost.example.net", "localhost"):
        nobody = get_local(8099, headers={"Host": host})
        assert nobody.status == 404, f"Host {host}: HTTP {nobody.status}"
        assert nobody.getheader("X-Served-By") is None, f"Host {host} reached a task"

    crowd = Crowd()
    request.addfinalizer(crowd.close)
    crowd.add("shop", 8)
    crowd.add("api", 8)
    wait_for(lambda: crowd.each_answered_since(0, 3), "every user has three answers", 60, 0.5)

    problems: list[str] = []

    def check(ok: bool, problem: str) -> None:
        if not ok:
            problems.append(problem)
    for scaled, replicas in (("shop", 4), ("api", 1)):
        before = set(members[scaled])
        start = time.time()
        scale(service(scaled), replicas)
        members[scaled] = running(scaled)
        assert len(members[scaled]) == replicas
        ever[scaled] |= members[scaled]
        wait_for(each_backend_has_its_tasks, f"be_{scaled} has its {replicas} tasks UP and only them, "
                 "the other backend unchanged", 90, 0.3)
        settled = time.time()
        crowd.add(scaled, 12)
        wait_for(lambda s=settled: crowd.each_answered_since(s, 4),  # type: ignore[misc]
                 "every user answered 4 times after the change", 60, 0.5)
        for name in HOSTS:
            step = analyse(f"scale {scaled} {len(before)} -> {replicas}, {name}'s users", crowd.of(name),
                           start, settled, time.time(), members[name])
            print(step.line())
            problems.extend(step_problems(step))
            if name != scaled:
                check(step.users_of_removed == 0 and step.users_kept == crowd.users(name),
                      f"{step.name}: {step.users_kept} of {crowd.users(name)} users kept their task")
            elif replicas > len(before):
                check(bool(step.new_users_tasks & (members[scaled] - before)),
                      f"{step.name}: no new user reached a new task ({step.new_users_tasks})")

    crowd.close()
    for name, other in (("shop", "api"), ("api", "shop")):
        records = crowd.of(name)
        served = {r.task for r in records if r.ok}
        print(f"{name}: {len(records)} requests from {crowd.users(name)} users, {sum(not r.ok for r in records)} "
              f"failed, answered by {len(served)} tasks, slowest answer {max(r.latency for r in records):.2f} s")
        check(served <= ever[name], f"{name}'s users were answered by {served - ever[name]}, not {name}'s tasks")
        check(not served & ever[other], f"{name}'s users were answered by {other}'s tasks {served & ever[other]}")
    check(crowd.cookie_names["shop"] == {"SWARMID_shop"}, f"shop's cookies: {crowd.cookie_names['shop']}")
    check(crowd.cookie_names["api"] == set(), f"api (keyed by a header) set cookies: {crowd.cookie_names['api']}")

    swarm.remove_stack(TWO_STACK)
    assert not problems, "\n".join(problems)
