"""`haproxy-swarm status` against its two real sources: a MetricsServer and a real HAProxy 2.6.

The agent side is a real `MetricsServer` over the agent's real parts (see test_metrics.AgentView) on a
loopback port; the HAProxy side is Debian's `haproxy` with a small config whose servers are named the
way the agent names them, health-checked against real listening sockets (UP) and a closed port
(DOWN), plus `dns*` fallback servers that status must skip. Both run only for the tests here.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from polling import wait_for
from test_metrics import AgentView, make_agent

from spoa import status
from spoa.config import HostPort
from spoa.discovery import Outcome
from spoa.haproxy.process import haproxy_binary, stop_process
from spoa.haproxy.writer import StepReport
from spoa.local.ports import free_port
from spoa.member import Member
from spoa.metrics import Metrics, MetricsServer

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 15.0



@dataclass
class HAProxy:
    socket: str
    stats_port: int
    up: list[Member]  # listening: health checks pass
    down: Member  # nothing listens: health checks fail
    stranger: Member  # a server in be_app the agent does not know (being drained)


def command(path: str, line: str) -> str:
    return status.admin_command(path, line)


def accept_and_close(listeners: list[socket.socket], stop: threading.Event) -> None:
    """Answer HAProxy's connect checks (so the backlog never fills up) until `stop`."""
    with selectors.DefaultSelector() as sel:
        for s in listeners:
            sel.register(s, selectors.EVENT_READ)
        while not stop.is_set():
            for key, _ in sel.select(timeout=0.1):
                with contextlib.suppress(OSError):
                    key.fileobj.accept()[0].close()  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def haproxy() -> Iterator[HAProxy]:
    tmp = tempfile.mkdtemp(prefix="haproxy-swarm-status-")
    listeners: list[socket.socket] = []
    stop = threading.Event()
    acceptor: threading.Thread | None = None
    proc = None
    try:
        for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.5"):
            s = socket.socket()
            s.bind((ip, 0))
            s.listen(64)
            listeners.append(s)
        acceptor = threading.Thread(target=accept_and_close, args=(listeners, stop), daemon=True)
        acceptor.start()
        up = [Member.parse(ip, port) for ip, port in (s.getsockname() for s in listeners[:2])]
        stranger = Member.parse(*listeners[2].getsockname())
        down = Member.parse("127.0.0.4", free_port("127.0.0.4"))
        sock = os.path.join(tmp, "admin.sock")
        stats_port = free_port()
        servers = "\n".join(f"    server {m.server_name} {m.address} check inter 100ms fall 1 rise 1"
                            for m in [*up, down, stranger])
        config = os.path.join(tmp, "haproxy.cfg")
        Path(config).write_text(f"""
global
    stats socket {sock} mode 600 level admin
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
    timeout check 500ms
backend be_app
    balance roundrobin
    server-template dns 1-2 localhost:1 init-addr none check backup
{servers}
frontend stats
    bind 127.0.0.1:{stats_port}
    http-request use-service prometheus-exporter if {{ path /metrics }}
""")
        proc = subprocess.Popen([haproxy_binary(), "-db", "-f", config], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        def settled() -> bool:  # the socket answers and every check has had its verdict
            assert proc is not None and proc.poll() is None, "haproxy exited"
            with contextlib.suppress(status.StatusError):
                rows = status.parse_show_stat(command(sock, "show stat be_app 4 -1"))
                state = {r["svname"]: r["status"] for r in rows}
                return (all(state.get(m.server_name) == "UP" for m in [*up, stranger])
                        and state.get(down.server_name) == "DOWN")
            return False

        wait_for(settled, "haproxy's checks settle", DEADLINE, 0.05)
        yield HAProxy(sock, stats_port, up, down, stranger)
    finally:
        stop.set()
        if acceptor is not None:
            acceptor.join(5)
        if proc is not None:
            stop_process(proc)
        for s in listeners:
            s.close()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
async def agent(haproxy: HAProxy) -> AsyncIterator[tuple[AgentView, MetricsServer]]:
    """The agent's view: the two UP members on the ring, the DOWN one known but off the ring."""
    view = make_agent()
    metrics = Metrics(view)
    members = [*haproxy.up, haproxy.down]
    view.set_members(members, up=haproxy.up)
    metrics.members_changed(view.discovery.members)
    metrics.dns_lookup(Outcome.OK, 0.002, truncated=False)
    metrics.haproxy_step(StepReport(reachable=True, up=frozenset(haproxy.up), down=frozenset({haproxy.down}),
                                    draining=frozenset({haproxy.stranger.server_name})))
    server = MetricsServer(HostPort("127.0.0.1", 0), metrics, ready=view.ready)
    await server.start()
    try:
        yield view, server
    finally:
        await server.close()


async def run_status(url: str, sock: str | None, as_json: bool) -> tuple[int, str, str]:
    """`status.main` in a thread (the metrics server answers on this loop meanwhile)."""
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(status.main, url, sock, as_json, out, err)
    return code, out.getvalue(), err.getvalue()


async def test_json_joins_the_agents_view_with_haproxys_health(haproxy: HAProxy,
                                                                agent: tuple[AgentView, MetricsServer]) -> None:
    _, server = agent
    code, out, err = await run_status(f"http://127.0.0.1:{server.port}", haproxy.socket, as_json=True)
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["errors"] == [] and doc["ready"] is True and doc["agent_version"]
    assert doc["haproxy_version"].startswith(("2.", "3."))
    [svc] = doc["services"]
    assert svc["service"] == "tasks.backend:80" and svc["backend"] == "be_app"
    rows = {m["server"]: m for m in svc["members"]}
    assert not any(name.startswith("dns") for name in rows), "the dns* fallback servers are skipped"
    for m in haproxy.up:
        row = rows[m.server_name]
        assert (row["member"], row["agent"], row["haproxy"], row["check"]) == (str(m), "ring", "UP", "L4OK")
        assert 0.2 < row["ring_share"] < 0.8
    down = rows[haproxy.down.server_name]
    assert (down["agent"], down["haproxy"], down["ring_share"]) == ("known", "DOWN", 0.0)
    assert down["check"] == "L4CON"
    stranger = rows[haproxy.stranger.server_name]
    assert (stranger["member"], stranger["agent"], stranger["haproxy"]) == (str(haproxy.stranger), "-", "UP")
    assert sum(m["ring_share"] or 0 for m in svc["members"]) == pytest.approx(1.0)
    assert svc["counts"] == {"known": 3, "up": 2, "missing": 0, "pending": 0, "down": 1, "draining": 1}
    assert svc["members_added"] == 3 and svc["members_removed"] == 0
    assert {(c["member"], c["change"]) for c in svc["recent_changes"]} == {
        (str(m), "added") for m in [*haproxy.up, haproxy.down]}
    assert svc["dns_queries"]["ok"] == 1
    assert abs(svc["dns_last_success"] - time.time()) < 60


async def test_table_lists_members_health_and_shares(haproxy: HAProxy,
                                                     agent: tuple[AgentView, MetricsServer]) -> None:
    _, server = agent
    code, out, err = await run_status(f"127.0.0.1:{server.port}/metrics", haproxy.socket, as_json=False)
    assert (code, err) == (0, "")
    assert "service tasks.backend:80 -> backend be_app" in out
    assert "ready (2 of 3 members up)" in out
    lines = out.splitlines()
    header = next(line for line in lines if "MEMBER" in line)
    assert header.split() == ["MEMBER", "SERVER", "AGENT", "HAPROXY", "CHECK", "SHARE", "DNS", "SESSIONS",
                              "TOTAL"]
    for m in haproxy.up:
        [row] = [line for line in lines if line.strip().startswith(str(m) + " ")]
        cells = row.split()
        assert cells[:5] == [str(m), m.server_name, "ring", "UP", "L4OK"]
        assert cells[5].endswith("%") and 20 < float(cells[5][:-1]) < 80
    [row] = [line for line in lines if line.strip().startswith(str(haproxy.down) + " ")]
    assert row.split()[2:7] == ["known", "DOWN", "L4CON", "0.0%", "listed"]
    assert not any(line.strip().startswith("dns") for line in lines)
    assert "members: 3 known, 2 on the ring, 0 pending a first check, 1 down, 1 draining, 0 missing from DNS" in out
    assert "DNS: last good answer" in out and "changes: 3 added, 0 removed" in out


async def test_after_a_scale_down_shares_are_what_members_serve_now_and_grace_is_marked(
        haproxy: HAProxy) -> None:
    """Issue 13, item 2: right after a scale-down the agent's ring still holds a member that DNS no
    longer lists and HAProxy already has DOWN. `status` shows it taking 0 % and kept only by the DNS
    grace, and the members that serve everything at 100 % together (not their old ring shares)."""
    view = make_agent()
    metrics = Metrics(view)
    now = time.monotonic()
    view.discovery.membership.answer([*haproxy.up, haproxy.down], now - 10)
    view.discovery.membership.answer(haproxy.up, now - 3)  # the scale-down: DNS no longer lists it
    view.router.update(view.discovery.members, [*haproxy.up, haproxy.down])  # the agent's health lags
    server = MetricsServer(HostPort("127.0.0.1", 0), metrics, ready=view.ready)
    await server.start()
    try:
        code, out, err = await run_status(f"http://127.0.0.1:{server.port}", haproxy.socket, as_json=False)
        _, doc, _ = await run_status(f"http://127.0.0.1:{server.port}", haproxy.socket, as_json=True)
    finally:
        await server.close()
    assert (code, err) == (0, "")
    lines = out.splitlines()
    [down] = [line.split() for line in lines if line.strip().startswith(str(haproxy.down) + " ")]
    assert down[2:6] == ["ring", "DOWN", "L4CON", "0.0%"]  # on the agent's ring, serving nothing
    assert down[6] == "grace" and 2 <= float(down[7].lstrip("(")) < 10
    shares = []
    for m in haproxy.up:
        [row] = [line.split() for line in lines if line.strip().startswith(str(m) + " ")]
        assert row[2:5] == ["ring", "UP", "L4OK"] and row[6] == "listed"
        shares.append(float(row[5].rstrip("%")))
    assert sum(shares) == pytest.approx(100.0, abs=0.2)
    assert "DNS grace: not listed by DNS any more" in out
    [svc] = json.loads(doc)["services"]
    rows = {m["server"]: m for m in svc["members"]}
    assert rows[haproxy.down.server_name]["ring_share"] > 0.2  # the old ring share is still in the JSON...
    assert rows[haproxy.down.server_name]["share"] == 0.0  # ...and what it serves now beside it
    assert 2 <= rows[haproxy.down.server_name]["dns_missing_seconds"] < 10
    assert sum(rows[m.server_name]["share"] for m in haproxy.up) == pytest.approx(1.0)


async def test_unreachable_metrics_endpoint_says_so_and_still_shows_haproxy(haproxy: HAProxy) -> None:
    port = free_port()
    code, out, err = await run_status(f"http://127.0.0.1:{port}", haproxy.socket, as_json=False)
    assert code == 1
    assert f"cannot reach the agent's metrics endpoint http://127.0.0.1:{port}/metrics" in err
    assert "Connection refused" in err
    assert "service (unknown: the agent did not answer) -> backend be_app" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("127.0.0.")]
    assert {row[1] for row in rows} == {m.server_name for m in [*haproxy.up, haproxy.down, haproxy.stranger]}
    assert {row[5] for row in rows} == {"?"}, "no share without the agent"  # HAProxy's side is still shown
    assert {row[1]: row[3] for row in rows}[haproxy.down.server_name] == "DOWN"


async def test_unreachable_socket_says_so(agent: tuple[AgentView, MetricsServer], tmp_path: Path) -> None:
    _, server = agent
    missing = str(tmp_path / "nope.sock")
    code, out, err = await run_status(f"http://127.0.0.1:{server.port}", missing, as_json=True)
    assert code == 1
    assert f"cannot reach HAProxy's admin socket {missing}" in err and "--haproxy-socket" in err
    doc = json.loads(out)
    assert doc["errors"] and doc["services"][0]["members"], "the agent's side is still shown"
    assert {m["haproxy"] for m in doc["services"][0]["members"]} == {"?"}


async def test_a_url_that_is_not_the_agent(haproxy: HAProxy) -> None:
    # HAProxy's own exporter answers /metrics in the same format, with no haproxy_swarm_* metric.
    code, _, err = await run_status(f"http://127.0.0.1:{haproxy.stats_port}", haproxy.socket, as_json=False)
    assert code == 1 and "holds no haproxy_swarm_* metrics" in err


async def test_the_cli_runs_status(haproxy: HAProxy, agent: tuple[AgentView, MetricsServer]) -> None:
    _, server = agent
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "spoa", "status", "--metrics", f"http://127.0.0.1:{server.port}",
        "--haproxy-socket", haproxy.socket, "--json", cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode == 0, err.decode()
    names = {m["server"] for m in json.loads(out)["services"][0]["members"]}
    assert names == {m.server_name for m in [*haproxy.up, haproxy.down, haproxy.stranger]}


def test_base_url_and_server_names() -> None:
    for given in ("127.0.0.1:9101", "http://127.0.0.1:9101", "http://127.0.0.1:9101/", "127.0.0.1:9101/metrics",
                  "http://127.0.0.1:9101/readyz"):
        assert status.base_url(given) == "http://127.0.0.1:9101", given
    assert status.server_name("10.0.1.5:80") == "10.0.1.5_80"
    assert status.server_name("[fd00::5]:8080") == "fd00--5_8080"
    assert status.server_name("not-an-address") == "not-an-address"


def test_default_socket_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HAPROXY_SOCKET", "/x/admin.sock")
    assert status.default_socket() == "/x/admin.sock"
    monkeypatch.delenv("HAPROXY_SOCKET")
    monkeypatch.setenv("RUN_DIR", "/run/hs")
    assert status.default_socket() == "/run/hs/admin.sock"

