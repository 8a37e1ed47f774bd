"""The stats page on STATS_BIND and the fallback behind it (issue 13, item 5).

An operator opens the stats GUI looking for "my tasks and their health": be_app, the backend the
traffic goes to, holds the agent's servers only; HAProxy's own DNS-fed fallback servers live in
be_app_dns, listed after it, and take traffic only while be_app has no usable server. Real HAProxy
(both versions through HAPROXY_BIN), real dnsmasq, real backends, the stats page read over HTTP.
"""

from __future__ import annotations

import csv
import io
import shutil
import tempfile
import urllib.request
from collections.abc import Iterator

import pytest
from polling import wait_for

from spoa.haproxy.process import HAProxyProcess
from spoa.local.backends import Backend
from spoa.local.client import User
from spoa.local.dnsmasq import Dnsmasq
from spoa.local.ports import free_port
from spoa.local.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]


def stats_csv(port: int) -> list[dict[str, str]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/;csv;norefresh", timeout=5) as resp:
        text = resp.read().decode()
    return list(csv.DictReader(io.StringIO(text.lstrip("# "))))


def stats_html(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/;norefresh", timeout=5) as resp:
        return str(resp.read().decode())


def servers_of(rows: list[dict[str, str]], backend: str) -> dict[str, str]:
    return {r["svname"]: r["status"] for r in rows
            if r["pxname"] == backend and r["svname"] not in ("FRONTEND", "BACKEND")}


def test_after_a_scale_down_be_app_lists_the_tasks_alone() -> None:
    with Stack(n_slots=3) as stack:
        stack.wait_up([0, 1, 2])
        stack.scale([0, 1])  # the scale-down: task-3 leaves DNS and stops
        wanted = {f"127.0.0.{i + 2}_{stack.backend_port}" for i in (0, 1)}
        wait_for(lambda: set(servers_of(stats_csv(stack.stats_port), "be_app")) == wanted,
                 "be_app holds the two remaining tasks only", 20)
        rows = stats_csv(stack.stats_port)
        assert set(servers_of(rows, "be_app").values()) == {"UP"}
        fallback = servers_of(rows, "be_app_dns")
        assert set(fallback) == {f"dns{i}" for i in range(1, 33)}, "the fallback is a backend of its own"
        html = stats_html(stack.stats_port)
        assert html.index('name="be_app"') < html.index('name="be_app_dns"'), "the tasks come first"
        assert User("u").get("127.0.0.1", stack.traffic_port).status == 200
        be_app_dns = next(r for r in stats_csv(stack.stats_port) if r["pxname"] == "be_app_dns"
                          and r["svname"] == "BACKEND")
        assert be_app_dns["stot"] == "0", "the fallback takes nothing while be_app has a server UP"


@pytest.fixture
def haproxy_alone() -> Iterator[tuple[HAProxyProcess, list[Backend], int]]:
    """HAProxy with the shipped config, DNS and two tasks, but no agent: be_app stays empty."""
    port = free_port("127.0.0.2")
    tasks = [Backend(f"127.0.0.{i}", port, name=f"task-{i - 1}") for i in (2, 3)]
    run_dir = tempfile.mkdtemp(prefix="haproxy-swarm-stats-")
    stats_port = free_port()
    with Dnsmasq({"tasks.backend": ["127.0.0.2", "127.0.0.3"]}) as dns:
        for task in tasks:
            task.start()
        env = {"RUN_DIR": run_dir, "FRONTEND_BIND": f"127.0.0.1:{free_port()}",
               "STATS_BIND": f"127.0.0.1:{stats_port}",
               "AGENT_ADDR": f"127.0.0.1:{free_port()}",  # nobody listens: no agent
               "DNS_NAMESERVER": str(dns.address), "SWARM_DNS_TARGET": f"tasks.backend:{port}"}
        try:
            with HAProxyProcess(env) as haproxy:
                yield haproxy, tasks, stats_port
        finally:
            for task in tasks:
                task.stop()
            shutil.rmtree(run_dir, ignore_errors=True)


def test_the_fallback_serves_only_while_be_app_has_no_usable_server(
        haproxy_alone: tuple[HAProxyProcess, list[Backend], int]) -> None:
    haproxy, tasks, stats_port = haproxy_alone
    traffic = int(haproxy.env["FRONTEND_BIND"].rsplit(":", 1)[1])
    assert servers_of(stats_csv(stats_port), "be_app") == {}
    addresses = {t.address for t in tasks}
    wait_for(lambda: User("a", "127.1.0.1").get("127.0.0.1", traffic).served_by in addresses,
             "the fallback serves from HAProxy's own DNS", 20)
    served = {User(f"u{i}", f"127.1.0.{i + 1}").get("127.0.0.1", traffic).served_by for i in range(20)}
    assert served <= addresses
    # A server of the agent's in be_app, UP: from then on be_app takes everything.
    task = tasks[0]
    name = f"{task.ip}_{task.port}"
    assert haproxy.command(f"add server be_app/{name} {task.address}").startswith("New server")
    assert haproxy.command(f"enable server be_app/{name}").strip() == ""
    wait_for(lambda: servers_of(stats_csv(stats_port), "be_app").get(name) == "no check", "be_app has it", 5)
    before = int(next(r for r in stats_csv(stats_port) if r["pxname"] == "be_app_dns"
                      and r["svname"] == "BACKEND")["stot"])
    for i in range(20):
        assert User(f"v{i}", f"127.1.1.{i + 1}").get("127.0.0.1", traffic).served_by == task.address
    after = int(next(r for r in stats_csv(stats_port) if r["pxname"] == "be_app_dns"
                     and r["svname"] == "BACKEND")["stot"])
    assert after == before
