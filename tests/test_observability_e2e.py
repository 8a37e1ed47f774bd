"""End to end: scrape a running instance (real haproxy, real dnsmasq, real backends, `haproxy-swarm run`)
and check that what operators look at moves as the scenario says.

N first visits → N decisions, and N more when they return (HAProxy decides them from the table and
the cookie map without asking the agent; the agent counts them from HAProxy's counters); a scale
event → the members gauge and the added/removed counters; `haproxy-swarm status` (the real CLI, as a
subprocess) lists the members with their health and ring shares; /readyz answers 200 with members
up; no log line per request.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from polling import wait_for

from spoa.cli import local_metrics_url
from spoa.local.client import User, users
from spoa.local.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 15.0


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with Stack(n_slots=5) as s:
        yield s


@pytest.fixture
def three(stack: Stack) -> Stack:
    stack.scale([0, 1, 2])
    want = {task.address.replace(":", "_") for task in stack.tasks[:3]}
    wait_for(lambda: (stack.metric("haproxy_swarm_members", state="known") == 3
                      and stack.metric("haproxy_swarm_members", state="up") == 3
                      and {r["srv_name"] for r in stack.servers()} == want),
             "the agent and HAProxy have exactly tasks 0, 1, 2 (no member in its grace, no server draining)")
    return stack




def visit(stack: Stack, user: User) -> str:
    answer = user.get("127.0.0.1", stack.traffic_port)
    assert answer.status == 200, f"{user.name}: HTTP {answer.status}"
    assert answer.served_by is not None
    return answer.served_by


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def log_lines(stack: Stack) -> list[str]:
    return Path(stack.log_path).read_text(errors="replace").splitlines()


def status_cli(stack: Stack, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spoa", "status", "--metrics", f"http://127.0.0.1:{stack.metrics_port}",
         "--haproxy-socket", stack.socket, *extra],
        cwd=REPO, capture_output=True, text=True, timeout=DEADLINE, env=dict(os.environ), check=False)


# --------------------------------------------------------------------------- decisions


def test_every_request_is_one_decision_counted_by_its_key_source(three: Stack) -> None:
    """HAProxy decides from the table (DECIDE=table, the default) without asking the agent; the
    agent still counts those decisions, from HAProxy's counters read at each scrape."""
    n = 60
    crowd = users(n, "first", network="127.3")
    decisions = three.metric("haproxy_swarm_decisions_total")
    by_new = three.metric("haproxy_swarm_decisions_total", source="new")
    by_cookie = three.metric("haproxy_swarm_decisions_total", source="cookie")
    issued = three.metric("haproxy_swarm_sticky_cookies_issued_total")
    notifies = three.metric("haproxy_swarm_spop_frames_total", type="notify")
    lines = len(log_lines(three))

    first = {u.name: visit(three, u) for u in crowd}
    assert all("SWARMID" in u.cookies for u in crowd)
    assert three.metric("haproxy_swarm_decisions_total") - decisions == n
    # The default key chain is `cookie:SWARMID`: a first visit is placed by HAProxy, by load.
    assert three.metric("haproxy_swarm_decisions_total", source="new") - by_new == n
    assert three.metric("haproxy_swarm_sticky_cookies_issued_total") - issued == n
    assert three.metric("haproxy_swarm_spop_frames_total", type="notify") == notifies  # the table decided

    # Returning visitors: decided by their cookie, in HAProxy too; counted all the same.
    assert {u.name: visit(three, u) for u in crowd} == first
    assert three.metric("haproxy_swarm_decisions_total") - decisions == 2 * n
    assert three.metric("haproxy_swarm_decisions_total", source="cookie") - by_cookie == n
    assert three.metric("haproxy_swarm_sticky_cookies_issued_total") - issued == n
    assert three.metric("haproxy_swarm_spop_frames_total", type="notify") == notifies

    # No log line per request at the default level.
    assert len(log_lines(three)) - lines < 5, log_lines(three)[lines:]


def test_decision_latency_is_recorded_in_microseconds(three: Stack) -> None:
    # A sticky cookie of the issued length that names no member: the table cannot decide it, the
    # agent does (over SPOE, timed).
    before = three.metric("haproxy_swarm_decision_seconds_count")
    for u in users(20, "lat", network="127.4"):
        u.cookies["SWARMID"] = "0" * 20
        visit(three, u)
    count = three.metric("haproxy_swarm_decision_seconds_count")
    assert count - before == 20
    total = three.metric("haproxy_swarm_decision_seconds_sum")
    assert count >= 20
    assert 0 < total / count < 0.005, f"mean decision time {total / count:.6f} s"
    assert three.metric("haproxy_swarm_decision_seconds_bucket", le="+Inf") == count


# --------------------------------------------------------------------------- members


def test_a_scale_event_moves_the_members_gauge_and_the_change_counters(three: Stack) -> None:
    added = three.metric("haproxy_swarm_members_added_total")
    removed = three.metric("haproxy_swarm_members_removed_total")
    changed = three.metric("haproxy_swarm_members_last_change_timestamp_seconds")
    new, gone = three.tasks[3].address, three.tasks[2].address

    three.scale([0, 1, 2, 3])
    wait_for(lambda: three.metric("haproxy_swarm_members", state="up") == 4, "4 members up")
    assert three.metric("haproxy_swarm_members", state="known") == 4
    assert three.metric("haproxy_swarm_members_added_total") - added == 1
    assert three.metric("haproxy_swarm_members_removed_total") == removed
    assert three.metric("haproxy_swarm_member_change_timestamp_seconds", member=new, change="added") > changed
    assert three.metric("haproxy_swarm_ring_rebuilds_total") >= 1

    three.scale([0, 1, 3])
    wait_for(lambda: three.metric("haproxy_swarm_members", state="known") == 3, "the removed member is gone")
    wait_for(lambda: three.metric("haproxy_swarm_members", state="up") == 3, "3 members up")
    assert three.metric("haproxy_swarm_members_removed_total") - removed == 1
    assert three.metric("haproxy_swarm_members_added_total") - added == 1
    assert three.metric("haproxy_swarm_member_change_timestamp_seconds", member=gone, change="removed") > changed
    assert three.metric("haproxy_swarm_members_last_change_timestamp_seconds") > changed
    shares = {m: three.metric("haproxy_swarm_member_ring_share", member=m) for m in three.addresses([0, 1, 2, 3])}
    assert shares[gone] == 0 and sum(shares.values()) == pytest.approx(1.0), shares
    assert all(0.15 < shares[m] < 0.55 for m in three.addresses([0, 1, 3])), shares
    # The membership change is logged, with what was added and removed.
    log = "\n".join(log_lines(three))
    assert f"added {new}" in log and f"removed {gone}" in log, log[-3000:]


# --------------------------------------------------------------------------- status, health, DNS


def test_status_cli_lists_members_with_health_and_shares(three: Stack) -> None:
    def settled() -> bool:
        """A server enabled a moment ago is `UP 1/2` until its next check (HAProxy's health counter
        is at `rise` and climbs to `rise + fall - 1`): what an operator sees then, but not the
        steady state this test checks."""
        doc = json.loads(status_cli(three, "--json").stdout)
        return all(m["haproxy"] == "UP" for svc in doc["services"] for m in svc["members"])

    wait_for(settled, "every member plainly UP in HAProxy's stats", timeout=10)
    done = status_cli(three, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["errors"] == [] and doc["ready"] is True
    [svc] = doc["services"]
    assert svc["backend"] == "be_app"
    members = {m["member"]: m for m in svc["members"]}
    assert set(members) == three.addresses([0, 1, 2])
    for m in members.values():
        assert (m["agent"], m["haproxy"]) == ("ring", "UP"), m
        assert 0.15 < m["ring_share"] < 0.55, m
    assert sum(m["ring_share"] for m in members.values()) == pytest.approx(1.0)
    assert not any(m["server"].startswith("dns") for m in svc["members"])
    assert time.time() - svc["dns_last_success"] < 10

    done = status_cli(three)
    assert done.returncode == 0, done.stderr
    for address in three.addresses([0, 1, 2]):
        [row] = [line for line in done.stdout.splitlines() if line.strip().startswith(address + " ")]
        assert row.split()[2:4] == ["ring", "UP"], row


def test_status_cli_explains_an_unreachable_socket(three: Stack, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "spoa", "status", "--metrics", f"127.0.0.1:{three.metrics_port}",
         "--haproxy-socket", str(tmp_path / "none.sock")],
        cwd=REPO, capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert done.returncode == 1
    assert "cannot reach HAProxy's admin socket" in done.stderr


def test_health_endpoints_and_dns_metrics(three: Stack) -> None:
    base = f"http://127.0.0.1:{three.metrics_port}"
    assert get(base + "/healthz") == (200, "ok\n")
    status, body = get(base + "/readyz")
    assert (status, body) == (200, "3 of 3 members up\n")
    assert three.metric("haproxy_swarm_ready") == 1
    assert three.metric("haproxy_swarm_runtime_api_up") == 1
    assert three.metric("haproxy_swarm_runtime_api_commands_total", verb="add server") >= 3
    ok = three.metric("haproxy_swarm_dns_queries_total", outcome="ok")
    wait_for(lambda: three.metric("haproxy_swarm_dns_queries_total", outcome="ok") > ok, "another DNS lookup")
    assert time.time() - three.metric("haproxy_swarm_dns_last_success_timestamp_seconds") < 5
    assert three.metric("haproxy_swarm_dns_queries_total", outcome="failure") == 0


def test_the_local_metrics_url_follows_metrics_listen() -> None:
    assert local_metrics_url({}) == "http://127.0.0.1:9101"
    assert local_metrics_url({"METRICS_LISTEN": "0.0.0.0:9200"}) == "http://127.0.0.1:9200"
    assert local_metrics_url({"METRICS_LISTEN": "[::]:9200"}) == "http://[::1]:9200"
    assert local_metrics_url({"METRICS_LISTEN": "10.0.0.5:9101"}) == "http://10.0.0.5:9101"
    assert local_metrics_url({"METRICS_LISTEN": "not an address"}) == "http://127.0.0.1:9101"


def test_the_images_healthcheck_command(three: Stack) -> None:
    """`haproxy-swarm health` (the Dockerfile's HEALTHCHECK): liveness of the agent, exit 0 or 1."""
    def health(*args: str, metrics_listen: str = "0.0.0.0:9") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "spoa", "health", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=DEADLINE, check=False,
                              env=os.environ | {"METRICS_LISTEN": metrics_listen})
    assert health("--url", f"http://127.0.0.1:{three.metrics_port}/healthz").returncode == 0
    # As the image runs it: no URL, the agent found where METRICS_LISTEN puts it.
    assert 'CMD ["haproxy-swarm", "health"]' in (REPO / "Dockerfile").read_text()
    assert health(metrics_listen=f"0.0.0.0:{three.metrics_port}").returncode == 0
    assert health(metrics_listen=f"127.0.0.1:{three.metrics_port}").returncode == 0
    down = health("--url", f"http://127.0.0.1:{three.metrics_port}/nothing-here")
    assert down.returncode == 1
    gone = health("--url", "http://127.0.0.1:9/healthz")
    assert gone.returncode == 1 and "haproxy-swarm health: http://127.0.0.1:9/healthz" in gone.stderr


def test_haproxys_own_exporter_on_the_stats_port(three: Stack) -> None:
    status, body = get(f"http://127.0.0.1:{three.stats_port}/metrics")
    assert status == 200
    servers = [line for line in body.splitlines()
               if line.startswith("haproxy_server_status{") and 'proxy="be_app"' in line]
    for task in (three.tasks[i] for i in (0, 1, 2)):
        name = task.address.replace(":", "_")
        assert any(f'server="{name}"' in line and 'state="UP"' in line and line.endswith(" 1")
                   for line in servers), (name, servers)


def test_json_logs_one_object_per_line() -> None:
    with Stack(n_slots=3, env={"LOG_FORMAT": "json"}) as stack:
        stack.scale([0, 1])
        wait_for(lambda: stack.metric("haproxy_swarm_members", state="known") == 2, "the scale-down")
        docs = [json.loads(line) for line in log_lines(stack)]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(doc) for doc in docs), docs
    gone = stack.tasks[2].address
    assert any(doc["level"] == "info" and f"removed {gone}" in doc["message"] for doc in docs), docs
