"""A real Prometheus watching a running instance: the dashboard and the alerting rules proven on it.

Real parts only: Debian's `prometheus` (its own temporary data dir, loopback, a 1 s scrape and rule
evaluation), `haproxy-swarm run` with two services and a pattern (spoa.local.services: the shipped
haproxy.cfg, real dnsmasq, real backends), traffic of returning users, first visits and unknown
cookies (which the agent decides over SPOE) to both services, and a scale-up then a scale-down of
both (tasks stopped: their users are re-routed).

Proves, per HAProxy version (HAPROXY_BIN):
- `promtool check metrics` is clean on the agent's /metrics; on HAProxy's exporter it finds only the
  naming lints of HAProxy's own metric names (listed below: not ours to change), no error.
- Every query of every panel of monitoring/grafana-dashboard.json, with Grafana's variables
  substituted as Grafana would ($__rate_interval = 4 scrape intervals, $service = All and then each
  service alone), returns data: a time-series panel at least one non-NaN point over the traffic, a
  stat panel a non-NaN value at its end. The `service` variable lists both services.
- Every alerting rule evaluates without error on real series, and every metric a rule reads exists.
- End to end: the agent killed (and `run` held so it cannot restart it at once): HaproxySwarmAgentDown
  goes pending, then fires within its `for: 30s` (plus a scrape and an evaluation), and resolves once
  `run` has restarted the agent.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from polling import wait_for
from test_alerts import CERTIFICATE_FAMILIES

from spoa.local.client import User
from spoa.local.ports import free_port
from spoa.local.services import Services

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "monitoring"
SCRAPE = 1  # seconds: scrape and rule evaluation interval
RATE_INTERVAL = f"{4 * SCRAPE}s"  # Grafana's $__rate_interval for that scrape interval
SERVICES = [("shop", "shop.example.com", ""), ("www", None, "")]
HOSTS = {"shop": "shop.example.com", "www": "www.example.com"}
# `promtool check metrics` on HAProxy's exporter: lints of HAProxy's own names (a counter without
# `_total`, a gauge with it), seen on 2.6.12 and 3.4. Anything else it reports fails the test.
HAPROXY_NAME_LINTS = frozenset({
    "haproxy_process_failed_resolutions",  # 2.6 and 3.4
    "haproxy_process_total_warnings", "haproxy_backend_downtime_seconds_total",  # 3.4
    "haproxy_process_patterns_added_total", "haproxy_process_patterns_freed_total",  # 3.4
})
AGENT_DOWN_FOR = 30.0  # the `for:` of HaproxySwarmAgentDown in monitoring/alerts.yml


def get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
    return body


class Prometheus:
    """`prometheus` on loopback with its own data dir; stopped (killed if need be) by `stop`."""

    def __init__(self, workdir: Path, agent: str, haproxy: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        shutil.copy(MONITORING / "alerts.yml", workdir / "alerts.yml")
        config = {
            "global": {"scrape_interval": f"{SCRAPE}s", "scrape_timeout": f"{SCRAPE}s",
                       "evaluation_interval": f"{SCRAPE}s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                # The job names monitoring/prometheus.yml gives (the rules read them).
                {"job_name": "haproxy-swarm-agent", "static_configs": [{"targets": [agent]}]},
                {"job_name": "haproxy-swarm-haproxy", "metrics_path": "/metrics",
                 "params": {"no-maint": ["empty"]}, "static_configs": [{"targets": [haproxy]}]},
            ],
        }
        (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
        self.log = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--storage.tsdb.retention.time=1h", "--log.level=warn"],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, cwd=workdir)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()

    def api(self, path: str, **params: str | float) -> Any:
        query = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        doc = json.loads(get(f"{self.url}/api/v1/{path}?{query}"))
        assert doc["status"] == "success", doc
        return doc["data"]

    def ready(self) -> bool:
        try:
            return get(f"{self.url}/-/ready", timeout=2).startswith(b"Prometheus")
        except OSError:
            return False

    def targets_up(self) -> bool:
        targets = self.api("targets")["activeTargets"]
        return len(targets) == 2 and all(t["health"] == "up" for t in targets)

    def scraped_after(self, when: float) -> bool:
        """Both targets' latest scrapes started after `when` (Unix time)."""
        result = self.query("min(timestamp(up))", time.time())
        return bool(result) and float(result[0]["value"][1]) > when

    def query(self, expr: str, at: float) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr, time=at)["result"]
        return result

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query_range", query=expr, start=start, end=end,
                                                step=SCRAPE)["result"]
        return result

    def alert_state(self, name: str) -> str | None:
        """`pending`, `firing`, or None when the alert is not active."""
        states = [a["state"] for a in self.api("alerts")["alerts"] if a["labels"]["alertname"] == name]
        return states[0] if states else None

    def log_tail(self) -> str:
        return (self.workdir / "prometheus.log").read_text(errors="replace")[-3000:]


class Traffic(threading.Thread):
    """Users of both services until stopped: returning ones (their cookie), first visits, and
    unknown cookies of the issued length (the table cannot decide those: the agent does, over SPOE)."""

    def __init__(self, stack: Services) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.stopping = threading.Event()
        self.answers: dict[int, int] = {}
        self.users = {name: [User(f"{name}-{i}", f"127.6.{k}.{i + 1}", headers={"Host": host})
                             for i in range(40)] for k, (name, host) in enumerate(HOSTS.items())}

    def run(self) -> None:
        n = 0
        while not self.stopping.is_set():
            for k, (name, crowd) in enumerate(self.users.items()):
                user = crowd[n % len(crowd)]
                if n % 7 == 0:  # an unknown sticky cookie of the issued length: the agent decides
                    user.cookies = {f"SWARMID_{name}": f"{n:020d}"[-20:]}
                elif n % 11 == 0:  # a first visit from a new address
                    user = User(f"{name}-new-{n}", f"127.7.{k}.{n % 250 + 1}", headers={"Host": HOSTS[name]})
                try:
                    status = user.get("127.0.0.1", self.stack.traffic_port, timeout=3).status
                except OSError:
                    status = 0
                self.answers[status] = self.answers.get(status, 0) + 1
            n += 1
            self.stopping.wait(0.01)  # pacing (about 150 requests/s), not synchronisation

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    return doc


def panel_queries(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, panel type, expr) of every target of every panel, rows' nested panels included."""
    out: list[tuple[str, str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                out.append((panel["title"], panel["type"], target["expr"]))
            walk(panel.get("panels", []))

    walk(doc["panels"])
    return out


def substitute(expr: str, service: str, span: float) -> str:
    """Grafana's variables as Grafana fills them: `$service` is a regex (All: `.*`)."""
    for name, value in (("__rate_interval", RATE_INTERVAL), ("__interval", f"{SCRAPE}s"),
                        ("__range", f"{max(1, int(span))}s"), ("service", service), ("instance", ".*")):
        expr = expr.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in expr.replace('"$1"', ""), f"a variable left in {expr}"
    return expr


def has_number(result: list[dict[str, Any]]) -> bool:
    """At least one sample that is a number (a histogram_quantile of no events is NaN: no data)."""
    for series in result:
        values = series.get("values") or [series["value"]]
        if any(not math.isnan(float(v)) for _, v in values):
            return True
    return False


def promtool_check_metrics(text: bytes) -> tuple[int, list[str]]:
    done = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30,
                          check=False)
    findings = (done.stdout + done.stderr).decode().splitlines()
    return done.returncode, [line for line in findings if line.strip()]


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Services, Prometheus]]:
    assert shutil.which("prometheus"), "prometheus is missing: run ./scripts/setup (Debian package prometheus)"
    stack = Services(SERVICES, n_slots=3, patterns=[("*.apps.example.com", "max=2")])
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{stack.metrics_port}", f"127.0.0.1:{stack.stats_port}")
    try:
        wait_for(prometheus.ready, "Prometheus answers", 20)
        stack.start()
        wait_for(prometheus.targets_up, "Prometheus scrapes the agent and HAProxy", 15)
        yield stack, prometheus
    finally:
        if stack.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stack.proc.pid, signal.SIGCONT)  # a test that held `run` must not leave it stopped
        stack.stop()
        prometheus.stop()


def test_prometheus_scrapes_the_dashboard_answers_and_the_agent_down_alert_fires_and_resolves(
        watched: tuple[Services, Prometheus]) -> None:
    stack, prometheus = watched
    start = time.time()
    traffic = Traffic(stack)
    traffic.start()
    try:
        wait_for(lambda: sum(traffic.answers.values()) > 200, "traffic flows", 20)
        for name in HOSTS:  # a scale-up of both services...
            stack.scale_service(name, [0, 1, 2], wait=False)
        for name in HOSTS:
            stack.wait_service(name, [0, 1, 2])
        wait_for(lambda: sum(traffic.answers.values()) > 600, "traffic to the new tasks", 20)
        for name in HOSTS:  # ...and a scale-down that stops the tasks at once: their users are re-routed
            stack.scale_service(name, [0, 1], wait=False)
        for name in HOSTS:
            stack.wait_service(name, [0, 1])
        # A Host the pattern matches, whose service DNS does not know: an on-demand look-up (404).
        assert User("apps", headers={"Host": "nothing.apps.example.com"}).get(
            "127.0.0.1", stack.traffic_port).status == 404
        wait_for(lambda: sum(traffic.answers.values()) > 1000, "traffic after the scale-down", 20)
    finally:
        traffic.stop()
    stopped = time.time()
    # The stored series must hold the final counts: both targets scraped once more after the traffic.
    wait_for(lambda: prometheus.scraped_after(stopped), "a scrape of both targets after the traffic", 10)
    end = time.time()
    assert traffic.answers.get(200, 0) > 1000, traffic.answers
    agent_text = get(f"http://127.0.0.1:{stack.metrics_port}/metrics")
    haproxy_text = get(f"http://127.0.0.1:{stack.stats_port}/metrics?no-maint")

    # ---- the agent killed, `run` held so that it cannot restart it: the alert's clock starts
    run_pid = stack.proc.pid if stack.proc is not None else None
    victim = stack.agent_pid()
    assert run_pid is not None and victim is not None
    os.kill(run_pid, signal.SIGSTOP)
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    try:
        # While the alert's `for:` runs: everything evaluated at past times, from the stored series.
        check_exporters(agent_text, haproxy_text)
        check_dashboard(prometheus, start, end)
        check_rules(prometheus, end)

        wait_for(lambda: prometheus.alert_state("HaproxySwarmAgentDown") == "pending",
                 "HaproxySwarmAgentDown pending after the kill", 10)
        pending = time.monotonic() - killed
        wait_for(lambda: prometheus.alert_state("HaproxySwarmAgentDown") == "firing",
                 "HaproxySwarmAgentDown firing", AGENT_DOWN_FOR + 15)
        fired = time.monotonic() - killed
    finally:
        os.kill(run_pid, signal.SIGCONT)  # `run` notices the dead agent and restarts it
    print(f"\nHaproxySwarmAgentDown: pending {pending:.1f}s, firing {fired:.1f}s after the kill "
          f"(for: {AGENT_DOWN_FOR:g}s, scrape and evaluation every {SCRAPE}s)")
    assert AGENT_DOWN_FOR <= fired <= AGENT_DOWN_FOR + 3 * SCRAPE + 3, fired
    wait_for(lambda: stack.agent_pid() not in (None, victim), "run restarts the agent", 10)
    restarted = time.monotonic()
    wait_for(lambda: prometheus.alert_state("HaproxySwarmAgentDown") is None,
             "HaproxySwarmAgentDown resolved after the restart", 20)
    print(f"resolved {time.monotonic() - restarted:.1f}s after the agent's restart")
    assert prometheus.query('up{job="haproxy-swarm-agent"}', time.time())[0]["value"][1] == "1"


def check_exporters(agent_text: bytes, haproxy_text: bytes) -> None:
    code, findings = promtool_check_metrics(agent_text)
    assert (code, findings) == (0, []), findings
    assert b"haproxy_swarm_ondemand_lookups_total" in agent_text
    code, findings = promtool_check_metrics(haproxy_text)
    assert code in (0, 3), (code, findings)  # 3: lint findings only; 1 would be a parse error
    for line in findings:
        name, _, message = line.partition(" ")
        assert name in HAPROXY_NAME_LINTS and "_total" in message, f"promtool on HAProxy's exporter: {line}"
    # no-maint: the DNS fallback's unfilled slots (MAINT) are left out of the scrape (3 tasks at most
    # here: dns32 is never filled).
    assert b'server="dns32"' not in haproxy_text and b'server="dns1"' in haproxy_text


def check_dashboard(prometheus: Prometheus, start: float, end: float) -> None:
    doc = dashboard()
    services = sorted(r for r in prometheus.api("label/service/values",
                                                 **{"match[]": "haproxy_swarm_service_info"}))
    variable = next(v for v in doc["templating"]["list"] if v["name"] == "service")
    assert variable["definition"] == "label_values(haproxy_swarm_service_info, service)"
    assert variable["multi"] and variable["includeAll"] and variable["allValue"] == ".*"
    assert len(services) == 2 and {s.split(".")[1].split(":")[0] for s in services} == set(HOSTS), services
    # The scrape's `no-maint` (monitoring/prometheus.yml) leaves the never-filled fallback slots out.
    assert prometheus.query('haproxy_server_status{server="dns1"}', end)
    assert not prometheus.query('haproxy_server_status{server="dns32"}', end)
    queries = panel_queries(doc)
    assert len(queries) >= 30, "the dashboard lost its queries"
    empty: list[str] = []
    for selection in (".*", *services):  # All, then each service alone
        for title, kind, expr in queries:
            if selection != ".*" and "$service" not in expr:
                continue
            query = substitute(expr, selection, end - start)
            # A stat panel shows an instant value (at the end of the traffic), a graph its range.
            result = prometheus.query(query, end) if kind == "stat" else prometheus.query_range(query, start, end)
            if not has_number(result):
                empty.append(f"{title} [{selection}]: {query}")
    for annotation in doc["annotations"]["list"]:
        if "expr" in annotation:
            query = substitute(annotation["expr"], ".*", end - start)
            if not has_number(prometheus.query_range(query, start, end)):
                empty.append(f"annotation {annotation['name']}: {query}")
    assert not empty, "panels with no data:\n" + "\n".join(empty)


def check_rules(prometheus: Prometheus, end: float) -> None:
    groups = prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    names = {rule["name"] for rule in rules}
    assert "HaproxySwarmAgentDown" in names and len(rules) >= 10, sorted(names)
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
    # Every metric a rule reads is there (0 is a value: the series exists), but the certificates'
    # (exported with HTTPS only: tests/test_acme.py reads them from a real agent).
    read = {m for rule in rules for m in re.findall(r"\b(haproxy_[a-z0-9_]+|up)\b\s*[{\[]?", rule["query"])}
    for metric in sorted(read - CERTIFICATE_FAMILIES):
        assert prometheus.query(f"count({metric})", end), f"no series of {metric}, which a rule reads"
