"""The alerting rules that ship (monitoring/alerts.yml), checked by Prometheus' own promtool.

`promtool check rules` parses them; `promtool test rules monitoring/alerts_test.yml` runs their unit
tests (each rule fires on the situation it names after its `for:`, and stays quiet on the normal case
beside it); every rule has such a test; and every metric a rule reads is one the agent exports (the
`haproxy_*` ones come from HAProxy's exporter: tests/test_prometheus.py evaluates them against a real
Prometheus scraping a real HAProxy). promtool comes with Debian's `prometheus` (scripts/setup).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_metrics import busy_metrics, promql_names, scrape

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
MONITORING = REPO / "monitoring"
RULES = MONITORING / "alerts.yml"
RULE_TESTS = MONITORING / "alerts_test.yml"
# What the issue asks the rules to cover, by the alert that does it.
REQUIRED = {
    "agent down": "HaproxySwarmAgentDown",
    "decision table not published": "HaproxySwarmTableNotPublished",
    "decision table stale": "HaproxySwarmTableStale",
    "members down": "HaproxySwarmMembersDown",
    "members missing from DNS": "HaproxySwarmMembersMissingFromDNS",
    "DNS failing": "HaproxySwarmDNSFailing",
    "5xx ratio": "HaproxySwarm5xxRatio",
    "cookies re-routed in a burst": "HaproxySwarmCookiesReroutedBurst",
    "on-demand look-ups refused": "HaproxySwarmOnDemandRefused",
    "a certificate expires in < 14 days": "HaproxySwarmCertificateExpiresSoon",
}
# The families of spoa/ondemand.py's collector (a process with patterns only; not in busy_metrics).
ONDEMAND_FAMILIES = {"haproxy_swarm_ondemand_lookups_total", "haproxy_swarm_ondemand_services",
                     "haproxy_swarm_ondemand_misses"}
# The families of spoa/acme.py's collector (a process with certificates only; checked in tests/test_acme.py).
CERTIFICATE_FAMILIES = {"haproxy_swarm_certificate_expiry_timestamp_seconds", "haproxy_swarm_acme_renewals_total",
                        "haproxy_swarm_acme_renewal_failures_total", "haproxy_swarm_certificate_updates_total",
                        "haproxy_swarm_acme_leader"}


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: run ./scripts/setup (Debian package prometheus)"
    return path


def rules() -> dict[str, str]:
    """alert name -> its expression, read from alerts.yml (a plain or a `|` block expression)."""
    text = RULES.read_text()
    out: dict[str, str] = {}
    for block in re.split(r"\n\s*- alert: ", text)[1:]:
        name, _, rest = block.partition("\n")
        found = re.search(r"expr: \|\n((?:\s{10,}.*\n)+)|expr: (.*)\n", rest)
        assert found, f"no expr in {name}"
        out[name.strip()] = (found.group(1) or found.group(2)).strip()
    return out


def test_the_rules_parse() -> None:
    done = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules())} rules found" in done.stdout, done.stdout


def test_the_rules_unit_tests_pass() -> None:
    done = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=MONITORING, capture_output=True,
                          text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_required_situation_has_a_rule_and_every_rule_a_firing_test() -> None:
    names = set(rules())
    assert set(REQUIRED.values()) <= names, sorted(set(REQUIRED.values()) - names)
    tests = RULE_TESTS.read_text()
    for name in names:
        # A test that expects it to fire: its alertname followed by a non-empty exp_alerts.
        assert re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", tests), \
            f"{name} has no test that expects it to fire"
        assert re.search(rf"alertname: {name}\n\s+exp_alerts: \[\]", tests), \
            f"{name} has no test that expects it quiet"


def test_every_rule_reads_metrics_that_are_exported() -> None:
    _, metrics = busy_metrics()
    agent = set(scrape(metrics)) | ONDEMAND_FAMILIES | CERTIFICATE_FAMILIES
    for name, expr in rules().items():
        metric_names, _, _ = promql_names(expr)
        assert metric_names, name
        for metric in metric_names:
            if metric.startswith("haproxy_swarm_"):
                assert metric in agent, f"{name} reads {metric}, which the agent does not export"
            else:  # Prometheus' own `up`, or HAProxy's exporter (checked against a real one elsewhere)
                assert metric == "up" or metric.startswith("haproxy_"), (name, metric)
