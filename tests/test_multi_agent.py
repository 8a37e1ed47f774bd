"""Several services in one agent process (SWARM_CONFIG_FILE with a line per service, issue 12).

Real parts only: a real dnsmasq answering for three Swarm services, real backend tasks, a real
HAProxy (2.6 or HAPROXY_BIN) and a real `haproxy-swarm agent` process in multi-service mode. The
HAProxy config here is the test's own small one: fe_main picks the backend by the Host's first
label, decides from each service's own slot map (the maps the agent publishes) and tracks
`<service name>/<source>` in its stick table, as the shipped config does with several services;
so HAProxy's `show table` answer, its servers and its maps are real. The last part runs the
whole product instead: `haproxy-swarm run` with the shipped config's per-service backends.

What is checked: every service gets its own servers, table and SPOP port (real HELLO/NOTIFY on
each port, answered with that service's servers only); /metrics merges every service's families
into one exposition prometheus-client's parser reads, each family once; /readyz waits for every
service and names each one's reason; HAProxy's own decisions are counted per service; `status`
shows each service's members under its backend; a control loop that fails does not stop another
service's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from polling import poll, wait_for
from prometheus_client.parser import text_string_to_metric_families
from test_agent_server import SpopClient

from spoa.app import Agents
from spoa.config import HostPort, load_settings, service_settings
from spoa.haproxy.counters import parse_counts, split_counts
from spoa.haproxy.process import HAProxyProcess, stop_process
from spoa.local.backends import Backend
from spoa.local.dnsmasq import Dnsmasq
from spoa.local.ports import free_port, free_ports
from spoa.local.services import Services
from spoa.protocol import FrameType, SetVar, decode_actions, encode_message, encode_notify

pytestmark = [pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 20.0
NAMES = ("shop", "api", "blog")
# Each service's tasks on loopback addresses of their own (one port for all).
TASK_IPS = {"shop": ("127.0.41.1", "127.0.41.2"), "api": ("127.0.42.1",), "blog": ("127.0.43.1",)}
Samples = list[tuple[str, dict[str, str], float]]


def hosts(*names: str) -> dict[str, list[str]]:
    """dnsmasq's records: the tasks of these services (the others do not resolve)."""
    return {f"tasks.{name}": list(TASK_IPS[name]) for name in names}


HAPROXY_CFG = """\
global
    stats socket {run}/admin.sock level admin expose-fd listeners
    stats timeout 1m

defaults
    mode http
    log stderr format short local0 info
    option httplog
    timeout connect 1s
    timeout client 10s
    timeout server 10s
    # As the shipped config: a reused server connection the task closed is retried.
    retries 3
    option redispatch 1

frontend fe_main
    bind 127.0.0.1:{port}
    stick-table type string len 40 size 64 store http_req_cnt,gpc0
    http-request set-var(txn.service) req.hdr(host),field(1,:),field(1,.)
    http-request return status 404 if !{{ var(txn.service) -m reg ^(shop|api|blog)$ }}
{decide}
    http-request set-var-fmt(txn.sticky.source) "%[var(txn.service)]/src" if {{ var(txn.sticky.server) -m found }}
    http-request track-sc2 var(txn.sticky.source) if {{ var(txn.sticky.server) -m found }}
    use_backend be_%[var(txn.service)]
{backends}
"""

DECIDE = """\
    http-request set-var(txn.sticky.server) src,crc32,div(65536),map({run}/{name}.slots.map) \
if {{ var(txn.service) -m str {name} }}
    http-request set-var(txn.unused) str(x),map({run}/{name}.cookies.map) if FALSE
    http-request set-var(txn.unused) str(x),map({run}/{name}.server-cookies.map) if FALSE"""

BACKEND = """
backend be_{name}
    balance hash src
    hash-type consistent
    use-server %[var(txn.sticky.server)] if {{ var(txn.sticky.server) -m found }}
"""


@dataclass
class World:
    run_dir: Path
    dns: Dnsmasq
    haproxy: HAProxyProcess
    traffic_port: int
    task_port: int
    config_file: Path
    env: dict[str, str]
    spop_base: int = 0
    metrics_port: int = 0
    agent: subprocess.Popen[bytes] | None = None
    agent_log: Path | None = None

    def service(self, name: str) -> str:
        """The `service` label of a service: its target, as with one service."""
        return f"tasks.{name}:{self.task_port}"

    def servers(self, name: str) -> set[str]:
        return {f"{ip}_{self.task_port}" for ip in TASK_IPS[name]}

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    run = tmp_path_factory.mktemp("multi")
    task_port, traffic_port = free_port(), free_port()
    for name in NAMES:
        for kind in ("slots", "cookies", "server-cookies"):
            (run / f"{name}.{kind}.map").touch()
    backends = "".join(BACKEND.format(name=name) for name in NAMES)
    decide = "\n".join(DECIDE.format(run=run, name=name) for name in NAMES)
    (run / "haproxy.cfg").write_text(HAPROXY_CFG.format(run=run, port=traffic_port, decide=decide,
                                                        backends=backends))
    config_file = run / "services"
    config_file.write_text(
        "# three services, one line each\n"
        f"shop.test tasks.shop:{task_port} key=cookie:SWARMID,src\n"
        f"api.test tasks.api:{task_port}\n"
        f"blog.test/posts tasks.blog:{task_port} name=blog\n")
    tasks = [Backend(ip, task_port, name=f"{name}-{i}") for name in NAMES for i, ip in enumerate(TASK_IPS[name])]
    with contextlib.ExitStack() as stack:
        for task in tasks:
            stack.enter_context(task)
        dns = stack.enter_context(Dnsmasq(hosts("shop", "api")))  # no blog yet
        haproxy = HAProxyProcess({"RUN_DIR": str(run)}, config=str(run / "haproxy.cfg"),
                                 log_path=str(run / "haproxy.log"))
        stack.enter_context(haproxy)
        env = {"SWARM_CONFIG_FILE": str(config_file), "DNS_NAMESERVER": str(dns.address), "RUN_DIR": str(run),
               "STICKY_KEY": "src", "DNS_REFRESH": "0.2", "MEMBER_GRACE": "0.5", "DECIDE": "table",
               "LOG_LEVEL": "info"}
        world = World(run, dns, haproxy, traffic_port, task_port, config_file, env)
        start_agent(world)
        try:
            yield world
        finally:
            stop_agent(world)


def start_agent(world: World) -> None:
    world.spop_base = free_ports(len(NAMES) + 1)  # AGENT_LISTEN (look-ups), then one per service
    world.metrics_port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("SWARM_SERVICE", "COOKIE_SECRET")}
    env |= world.env | {"AGENT_LISTEN": f"127.0.0.1:{world.spop_base}",
                        "METRICS_LISTEN": f"127.0.0.1:{world.metrics_port}", "PYTHONUNBUFFERED": "1"}
    world.agent_log = world.run_dir / "agent.log"
    with open(world.agent_log, "wb") as log:
        agent = world.agent = subprocess.Popen([sys.executable, "-m", "spoa", "agent"], cwd=REPO, env=env,
                                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for(lambda: get(world.metrics_url + "/healthz")[0] == 200 or agent.poll() is not None,
             "the agent's metrics endpoint answers", timeout=DEADLINE)
    assert agent.poll() is None, agent_log(world)


def stop_agent(world: World) -> None:
    if world.agent is not None:
        stop_process(world.agent)


def agent_log(world: World) -> str:
    return world.agent_log.read_text(errors="replace") if world.agent_log else ""


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError:
        return 0, ""


def scrape(world: World) -> Samples:
    status, text = get(world.metrics_url + "/metrics")
    assert status == 200, text
    return [(s.name, dict(s.labels), float(s.value)) for f in text_string_to_metric_families(text) for s in f.samples]


def metric(samples: Samples, name: str, **labels: str) -> float:
    found = [v for n, got, v in samples if n == name and all(got.get(k) == want for k, want in labels.items())]
    assert found, f"no sample {name}{labels}"
    return sum(found)


@pytest.fixture
def ready(world: World) -> World:
    """Every service has its tasks in DNS, its servers UP in HAProxy and its table published."""
    world.dns.set_hosts(hosts(*NAMES))
    wait_for(lambda: get(world.metrics_url + "/readyz")[0] == 200, "every service is ready", timeout=DEADLINE)
    return world


# --------------------------------------------------------------------------- start and readiness


def test_the_agent_logs_each_service_its_backend_and_its_spop_port_once(world: World) -> None:
    log = agent_log(world)
    for i, name in enumerate(NAMES):
        lines = [line for line in log.splitlines() if f"service {name}: tasks.{name}" in line]
        assert len(lines) == 1, log
        assert f"backend be_{name}" in lines[0] and f"SPOP on 127.0.0.1:{world.spop_base + 1 + i}" in lines[0], lines
    # Only shop's chain names the sticky cookie, and COOKIE_SECRET is unset: one warning, not one per service.
    assert log.count("COOKIE_SECRET is not set") == 1, log


def test_readyz_waits_for_every_service_and_names_each_ones_reason(world: World) -> None:
    world.dns.set_hosts(hosts("shop", "api"))  # blog's tasks are not in DNS

    def blog_missing() -> bool:
        status, body = get(world.metrics_url + "/readyz")
        return status == 503 and "blog (" in body and "no members" in body

    wait_for(blog_missing, "/readyz: 503 while blog has no members", timeout=DEADLINE)
    wait_for(lambda: all(f"{name} (tasks.{name}:{world.task_port}): ready" in get(world.metrics_url + "/readyz")[1]
                         for name in ("shop", "api")), "shop and api ready, each on its own line", timeout=DEADLINE)
    status, body = get(world.metrics_url + "/readyz")
    lines = body.strip().splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == list(NAMES), body
    assert status == 503 and "blog (" in lines[2] and "NOT READY" in lines[2], body
    assert metric(scrape(world), "haproxy_swarm_ready", service=world.service("blog")) == 0
    assert metric(scrape(world), "haproxy_swarm_ready", service=world.service("shop")) == 1

    world.dns.set_hosts(hosts(*NAMES))
    wait_for(lambda: get(world.metrics_url + "/readyz")[0] == 200, "/readyz: 200 once blog is ready too",
             timeout=DEADLINE)
    body = get(world.metrics_url + "/readyz")[1]
    assert body.count(": ready: ") == 3 and "NOT READY" not in body, body


# --------------------------------------------------------------------------- one /metrics for all


def test_metrics_merge_every_services_families_once(ready: World) -> None:
    status, text = get(ready.metrics_url + "/metrics")
    assert status == 200
    families = list(text_string_to_metric_families(text))
    names = Counter(f.name for f in families)
    assert not [n for n, c in names.items() if c > 1], names  # each family once
    samples = [(s.name, tuple(sorted(s.labels.items()))) for f in families for s in f.samples]
    assert len(samples) == len(set(samples)), [s for s, c in Counter(samples).items() if c > 1]
    by_name = {f.name: f for f in families}
    # Per process, once: build info and the process metrics.
    assert len(by_name["haproxy_swarm_build_info"].samples) == 1
    assert len(by_name["haproxy_swarm_process_cpu_seconds"].samples) == 1
    # Per service: the same families, told apart by `service`; the service's name and backend in its info.
    info = {s.labels["name"]: s.labels for s in by_name["haproxy_swarm_service_info"].samples}
    assert info == {name: {"service": ready.service(name), "backend": f"be_{name}", "name": name} for name in NAMES}
    parsed = scrape(ready)
    for name in NAMES:
        svc = ready.service(name)
        assert metric(parsed, "haproxy_swarm_members", service=svc, state="known") == len(TASK_IPS[name])
        assert metric(parsed, "haproxy_swarm_members", service=svc, state="up") == len(TASK_IPS[name])
        shares = {labels["member"] for n, labels, _ in parsed
                  if n == "haproxy_swarm_member_ring_share" and labels["service"] == svc}
        assert shares == {f"{ip}:{ready.task_port}" for ip in TASK_IPS[name]}
        assert metric(parsed, "haproxy_swarm_table_publications_total", service=svc) >= 1
        # One SPOP server per service: its families carry the service too.
        assert metric(parsed, "haproxy_swarm_spop_connections", service=svc) >= 0
        assert metric(parsed, "haproxy_swarm_runtime_api_up", service=svc) == 1
    # Each service's table went to its own map, naming its own servers only.
    for name in NAMES:
        published = {line.split()[1] for line in (ready.run_dir / f"{name}.slots.map").read_text().splitlines()
                     if line.strip()}
        assert published == ready.servers(name), name


# --------------------------------------------------------------------------- SPOP, a port per service


def route(src: str) -> bytes:
    return encode_message("route", {"sticky": None, "cookie": None, "header": None, "param": None,
                                    "src": ipaddress.IPv4Address(src), "ssl": False})


async def ask(port: int, clients: int) -> list[str]:
    """HELLO, then one NOTIFY per client address on the SPOP port: the servers the agent named."""
    client = await SpopClient.connect(HostPort("127.0.0.1", port))
    try:
        hello = await client.hello()
        assert hello.get("version") == b"2.0", hello
        for i in range(clients):
            client.send(encode_notify(1, i + 1, route(f"10.9.{i // 250}.{i % 250 + 1}")))
        frames = await client.frames(clients)
    finally:
        client.close()
    servers = []
    for frame in frames:
        assert frame.type == FrameType.ACK
        (server,) = [a.value for a in decode_actions(frame.payload) if isinstance(a, SetVar) and a.name == "server"]
        assert isinstance(server, bytes)
        servers.append(server.decode())
    return servers


async def test_each_service_answers_on_its_own_spop_port_with_its_own_servers(ready: World) -> None:
    before = scrape(ready)
    counts = {"shop": 40, "api": 15, "blog": 7}
    for i, name in enumerate(NAMES):
        servers = await ask(ready.spop_base + 1 + i, counts[name])
        assert set(servers) <= ready.servers(name), (name, set(servers))
        if name == "shop":
            assert set(servers) == ready.servers("shop")  # 40 keys over 2 members: both take some
    after = scrape(ready)
    for name in NAMES:
        svc = ready.service(name)
        notified = (metric(after, "haproxy_swarm_spop_frames_total", service=svc, type="notify")
                    - metric(before, "haproxy_swarm_spop_frames_total", service=svc, type="notify"))
        assert notified == counts[name], name
        decided = (metric(after, "haproxy_swarm_decisions_total", service=svc)
                   - metric(before, "haproxy_swarm_decisions_total", service=svc))
        assert decided == counts[name], name


# --------------------------------------------------------------------------- HAProxy's own decisions


def http_get(port: int, host: str, path: str = "/") -> tuple[int, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        return resp.status, resp.getheader("X-Served-By")
    finally:
        conn.close()


def test_haproxy_decisions_are_counted_for_their_own_service(ready: World) -> None:
    before = scrape(ready)
    sent = {"shop": 9, "api": 4, "blog": 0}
    for name, n in sent.items():
        for _ in range(n):
            status, served_by = http_get(ready.traffic_port, f"{name}.test")
            assert status == 200, name
            assert served_by in {f"{ip}:{ready.task_port}" for ip in TASK_IPS[name]}, (name, served_by)
    # HAProxy decided them from the tables (no NOTIFY); fe_main counted them under `<name>/src`.
    table = split_counts(parse_counts(ready.haproxy.command("show table fe_main")))
    assert set(table) >= {"shop", "api"} and "blog" not in table, table
    after = scrape(ready)
    for name, n in sent.items():
        svc = ready.service(name)
        got = (metric(after, "haproxy_swarm_decisions_total", service=svc, source="src")
               - metric(before, "haproxy_swarm_decisions_total", service=svc, source="src"))
        assert got == n, (name, got)


def test_split_counts_reads_each_services_keys_and_leaves_the_rest() -> None:
    answer = ("# table: fe_main, type: string, size:64, used:4\n"
              "0x55d0c5d0e2a0: key=shop/src use=0 exp=0 shard=0 gpc0=2 http_req_cnt=5\n"
              "0x55d0c5d0e3b0: key=shop/cookie use=0 exp=0 shard=0 gpc0=0 http_req_cnt=7\n"
              "0x55d0c5d0e4c0: key=api/header use=0 exp=0 shard=0 gpc0=0 http_req_cnt=1\n"
              "0x55d0c5d0e5d0: key=src use=0 exp=0 shard=0 gpc0=0 http_req_cnt=9\n")
    assert split_counts(parse_counts(answer)) == {"shop": {"src": (5, 2), "cookie": (7, 0)},
                                                   "api": {"header": (1, 0)}}


# --------------------------------------------------------------------------- status


def test_status_shows_each_services_members_under_its_backend(ready: World) -> None:
    res = subprocess.run([sys.executable, "-m", "spoa", "status", "--metrics", ready.metrics_url,
                          "--haproxy-socket", ready.haproxy.socket_path], cwd=REPO, capture_output=True,
                         text=True, timeout=DEADLINE, check=False)
    assert res.returncode == 0, res.stderr
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in res.stdout.splitlines():
        if line.startswith("service "):
            current = sections.setdefault(line, [])
        else:
            current.append(line)
    assert set(sections) == {f"service {ready.service(name)} -> backend be_{name}" for name in NAMES}, res.stdout
    for name in NAMES:
        body = "\n".join(sections[f"service {ready.service(name)} -> backend be_{name}"])
        for ip in TASK_IPS[name]:
            assert f"{ip}:{ready.task_port}" in body, body
        others = [ip for other in NAMES if other != name for ip in TASK_IPS[other]]
        assert not any(ip in body for ip in others), body
        rows = [line.split() for line in body.splitlines() if line.strip().startswith("127.0.4")]
        assert rows and all(row[2] == "ring" and row[3] == "UP" for row in rows), body
    assert "ready" in res.stdout.splitlines()[0] and "NOT READY" not in res.stdout, res.stdout


# --------------------------------------------------------------------------- one service fails


async def test_a_failing_control_loop_does_not_stop_the_other_services(world: World, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """In this process, on ports and a run directory of its own (no HAProxy socket there): shop's
    control loop fails (a bug outside a step), api's goes on; shop's loop is restarted; SIGTERM
    stops them all."""
    base, metrics_port = free_ports(3), free_port()
    config = tmp_path / "services"
    config.write_text(f"shop.test tasks.shop:{world.task_port}\napi.test tasks.api:{world.task_port}\n")
    settings = load_settings({}, world.env | {"RUN_DIR": str(tmp_path), "SWARM_CONFIG_FILE": str(config),
                                              "AGENT_LISTEN": f"127.0.0.1:{base}",
                                              "METRICS_LISTEN": f"127.0.0.1:{metrics_port}"})
    assert len(service_settings(settings)) == 2
    agents = Agents(settings)
    shop, api = agents.agents
    original = shop.control_loop
    failures = 0

    async def failing() -> None:
        nonlocal failures
        if failures < 2:
            failures += 1
            raise RuntimeError("a bug in shop's loop")
        await original()

    shop.control_loop = failing  # type: ignore[method-assign]
    caplog.set_level(logging.INFO, "spoa.app")
    run = asyncio.create_task(agents.run())
    try:
        await poll(lambda: len(api.discovery.members) == 1 and api.metrics.haproxy_steps >= 3,
                   "api's loop found its member and keeps stepping", timeout=DEADLINE)
        await poll(lambda: failures == 2 and len(shop.discovery.members) == 2,
                   "shop's loop restarted after its failures, and found its members", timeout=DEADLINE)
        assert sum("shop: control loop failed; restarting it" in r.getMessage() for r in caplog.records) == 2
        for port in (base + 1, base + 2):  # both SPOP servers answer (no HAProxy here: no server is UP)
            client = await SpopClient.connect(HostPort("127.0.0.1", port))
            assert (await client.hello()).get("version") == b"2.0"
            client.close()
        os.kill(os.getpid(), signal.SIGTERM)  # the process's handler stops every service
        await asyncio.wait_for(run, DEADLINE)
    finally:
        agents.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(run, DEADLINE)
    assert any("agent stopped (2 services)" in r.getMessage() for r in caplog.records)


def test_sigterm_stops_every_service_and_the_process_exits_cleanly(world: World) -> None:
    assert world.agent is not None
    ports = [world.spop_base + 1 + i for i in range(len(NAMES))]
    world.agent.send_signal(signal.SIGTERM)
    assert world.agent.wait(DEADLINE) == 0, agent_log(world)
    assert "agent stopped (3 services)" in agent_log(world)
    for port in ports:
        with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            pass
    start_agent(world)  # the module's other tests may run after this one


# --------------------------------------------------------------------------- the whole product


E2E_SERVICES = (("shop", "shop.test", ""), ("api", "example.test/api", "key=header:X-User,src"), ("www", None, ""))


@pytest.fixture(scope="module")
def product() -> Iterator[Services]:
    with Services(E2E_SERVICES, n_slots=3) as services:
        yield services


def visit(services: Services, host: str, path: str = "/", headers: dict[str, str] | None = None) -> str | None:
    """One request through fe_main; the service whose task answered."""
    conn = http.client.HTTPConnection("127.0.0.1", services.traffic_port, timeout=5)
    try:
        conn.request("GET", path, headers={"Host": host} | (headers or {}))
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, (host, path, resp.status)
        return services.service_of(resp.getheader("X-Served-By"))
    finally:
        conn.close()


@pytest.mark.e2e
def test_run_counts_each_services_decisions_under_its_own_label(product: Services) -> None:
    """`haproxy-swarm run` with three services: HAProxy decides from each service's table, fe_main
    counts `<name>/<source>`, the one agent process reports each service's own counts."""
    label = {name: f"tasks.{name}:{product.backend_port}" for name, _, _ in E2E_SERVICES}
    before = {name: product.metric("haproxy_swarm_decisions_total", service=label[name]) for name in label}
    by_header = product.metric("haproxy_swarm_decisions_total", service=label["api"], source="header")
    sent = {"shop": 12, "api": 7, "www": 5}
    for _ in range(sent["shop"]):
        assert visit(product, "shop.test") == "shop"
    for i in range(sent["api"]):
        assert visit(product, "example.test", "/api/orders", {"X-User": f"user-{i}"}) == "api"
    for _ in range(sent["www"]):
        assert visit(product, "other.test", "/api") == "www"
    for name, n in sent.items():
        assert product.metric("haproxy_swarm_decisions_total", service=label[name]) - before[name] == n, name
    assert product.metric("haproxy_swarm_decisions_total", service=label["api"], source="header") - by_header == 7
    status, body = product.readyz()
    assert status == 200 and [line.split(" ", 1)[0] for line in body.splitlines()] == ["shop", "api", "www"], body


@pytest.mark.e2e
def test_status_lists_each_services_tasks_under_its_backend_with_run(product: Services) -> None:
    res = subprocess.run([sys.executable, "-m", "spoa", "status", "--metrics",
                          f"http://127.0.0.1:{product.metrics_port}", "--haproxy-socket", product.socket],
                         cwd=REPO, capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert res.returncode == 0, res.stderr
    blocks = {block.split("\n", 1)[0].split(" -> backend ")[1]: block
              for block in res.stdout.split("\nservice ")[1:]}
    assert sorted(blocks) == ["be_api", "be_shop", "be_www"], res.stdout
    for backend, block in blocks.items():
        name = backend.removeprefix("be_")
        assert block.startswith(f"tasks.{name}:{product.backend_port} -> "), block
        members = [line.split() for line in block.splitlines() if line.strip().startswith("127.0.")]
        assert {row[0] for row in members} == {product.services[name].tasks[i].address for i in (0, 1)}, block
        assert all(row[2] == "ring" and row[3] == "UP" for row in members), block
