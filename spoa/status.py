"""`haproxy-swarm status`: what a running instance routes to, read from its two public faces.

Owns: reading the agent's /metrics and /readyz and HAProxy's admin socket (`show stat` of the
service's backend), joining them per member (HAProxy health, the agent's view, the share of new
sessions each member takes now, whether DNS still lists it, sessions), and printing that as a table
per service or as JSON. Must not: change anything (it only
reads), or depend on the agent's internals: whatever it shows, an operator's Prometheus sees too.

Exit status: 0 when both the metrics endpoint and the socket answered, 1 otherwise (what could be
read is still shown, and each failure is explained on stderr).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from prometheus_client.parser import text_string_to_metric_families

from spoa.config import DEFAULT_RUN_DIR
from spoa.haproxy.process import admin_command as haproxy_admin_command
from spoa.member import Member

PREFIX = "haproxy_swarm_"
DEFAULT_BACKEND = "be_app"
UNKNOWN = "?"  # the service's name when only HAProxy could be read
TIMEOUT = 3.0


class StatusError(Exception):
    """One of the two sources could not be read; the message says which and why."""


# --------------------------------------------------------------------------- model


@dataclass
class MemberStatus:
    member: str  # ip:port, as the agent names it ("" when only HAProxy knows the server)
    server: str  # the HAProxy server name
    agent: str  # "ring" (UP, on the ring), "known" (a member, not on the ring), "-" (not a member)
    ring_share: float | None  # 0..1 as the agent last saw it, None when the agent could not be read
    haproxy: str  # HAProxy's status text (UP, DOWN, MAINT, DRAIN, ...), "absent", or "?" when unread
    #: 0..1: the part of new sessions it takes now: its ring share over the members HAProxy has UP
    #: (a member that is not UP takes none; its keys go to the others, as the fallback ring sends them)
    share: float | None = None
    #: seconds since DNS last listed it, for a member kept only by the DNS grace (None: listed)
    dns_missing_seconds: float | None = None
    check: str = ""  # last health check result (L4OK, L7OK, L4CON, ...)
    sessions: int | None = None  # current sessions on the server
    total_sessions: int | None = None
    last_change_seconds: int | None = None  # seconds since HAProxy's last status change


@dataclass
class Change:
    member: str
    change: str  # "added" or "removed"
    time: float  # Unix time


@dataclass
class ServiceStatus:
    service: str
    backend: str = DEFAULT_BACKEND
    members: list[MemberStatus] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # known / up / missing, from the agent
    dns_last_success: float | None = None
    dns_queries: dict[str, int] = field(default_factory=dict)
    dns_failing_families: list[str] = field(default_factory=list)  # "A"/"AAAA" failing while the other answers
    decisions: dict[str, int] = field(default_factory=dict)
    cookies_issued: int = 0
    cookies_rerouted: int = 0
    members_added: int = 0
    members_removed: int = 0
    members_last_change: float | None = None
    recent_changes: list[Change] = field(default_factory=list)


@dataclass
class CertificateStatus:
    """A certificate HAProxy serves that the agent keeps current (TLS_CERT, ACME; spoa.acme)."""

    certificate: str  # its name in HAProxy (`@acme/<name>.pem`, or TLS_CERT's path)
    names: str
    source: str  # "acme" or "file"
    expires: float  # Unix time
    renewals: int | None = None  # ACME orders that gave a new certificate (None: not from ACME)
    failures: int | None = None
    updates: int = 0  # loaded from its file without a reload


@dataclass
class Status:
    metrics_url: str
    haproxy_socket: str
    agent_version: str | None = None
    ready: bool | None = None
    ready_reason: str = ""
    haproxy_version: str | None = None
    services: list[ServiceStatus] = field(default_factory=list)
    certificates: list[CertificateStatus] = field(default_factory=list)
    acme_leader: bool | None = None  # this replica orders the ACME certificates (None: no ACME)
    errors: list[str] = field(default_factory=list)
    time: float = 0.0


# --------------------------------------------------------------------------- reading


def base_url(metrics_url: str) -> str:
    """`host:port`, `http://host:port` or `http://host:port/metrics` → `http://host:port`."""
    url = metrics_url.strip()
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    for suffix in ("/metrics", "/readyz", "/healthz"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
    return url


def default_socket() -> str:
    return os.environ.get("HAPROXY_SOCKET") or os.path.join(os.environ.get("RUN_DIR") or DEFAULT_RUN_DIR,
                                                            "admin.sock")


def http_get(url: str, timeout: float = TIMEOUT) -> tuple[int, str]:
    """(status, body) of a GET; raises StatusError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:  # an answer all the same (503 from /readyz)
        return e.code, e.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise StatusError(f"cannot reach the agent's metrics endpoint {url}: {reason}") from e


def admin_command(path: str, command: str, timeout: float = TIMEOUT) -> str:
    """One command on HAProxy's admin socket; raises StatusError when it does not answer."""
    try:
        return haproxy_admin_command(path, command, timeout)
    except OSError as e:
        raise StatusError(f"cannot reach HAProxy's admin socket {path}: {e.strerror or e} "
                          "(give it with --haproxy-socket or HAPROXY_SOCKET)") from e


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The agent's samples by name (`haproxy_swarm_decisions_total`, ...) with their labels."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return samples


def services_from_metrics(samples: dict[str, list[tuple[dict[str, str], float]]]) -> list[ServiceStatus]:
    """One ServiceStatus per service the agent reports, with the agent's view of its members."""

    def of(name: str, service: str) -> Iterable[tuple[dict[str, str], float]]:
        return ((labels, value) for labels, value in samples.get(PREFIX + name, ())
                if labels.get("service") == service)

    names = {labels["service"] for key in ("service_info", "members")
             for labels, _ in samples.get(PREFIX + key, ()) if "service" in labels}
    services = []
    for name in sorted(names):
        svc = ServiceStatus(name)
        for labels, _ in of("service_info", name):
            svc.backend = labels.get("backend", DEFAULT_BACKEND)
        svc.counts = {labels["state"]: int(v) for labels, v in of("members", name) if "state" in labels}
        missing = {labels.get("member", ""): v for labels, v in of("member_missing_seconds", name)}
        for labels, share in of("member_ring_share", name):
            member = labels.get("member", "")
            svc.members.append(MemberStatus(member, server_name(member), "ring" if share > 0 else "known",
                                            share, "?", dns_missing_seconds=missing.get(member)))
        svc.dns_last_success = next((v or None for _, v in of("dns_last_success_timestamp_seconds", name)), None)
        svc.dns_queries = {labels["outcome"]: int(v) for labels, v in of("dns_queries_total", name)}
        svc.dns_failing_families = sorted(labels.get("family", "") for labels, v in of("dns_family_failing", name)
                                          if v)
        svc.decisions = {labels["source"]: int(v) for labels, v in of("decisions_total", name)}
        svc.cookies_issued = int(sum(v for _, v in of("sticky_cookies_issued_total", name)))
        svc.cookies_rerouted = int(sum(v for _, v in of("cookies_rerouted_total", name)))
        svc.members_added = int(sum(v for _, v in of("members_added_total", name)))
        svc.members_removed = int(sum(v for _, v in of("members_removed_total", name)))
        svc.members_last_change = next((v or None for _, v in of("members_last_change_timestamp_seconds", name)),
                                       None)
        svc.recent_changes = sorted((Change(labels.get("member", ""), labels.get("change", ""), v)
                                     for labels, v in of("member_change_timestamp_seconds", name)),
                                    key=lambda c: (c.time, c.change != "removed", c.member))
        services.append(svc)
    return services


def certificates_from_metrics(samples: dict[str, list[tuple[dict[str, str], float]]]
                              ) -> tuple[list[CertificateStatus], bool | None]:
    def by_cert(name: str) -> dict[str, float]:
        return {labels.get("certificate", ""): value for labels, value in samples.get(PREFIX + name, ())}

    renewals, failures = by_cert("acme_renewals_total"), by_cert("acme_renewal_failures_total")
    updates = by_cert("certificate_updates_total")
    certs = []
    for labels, value in samples.get(PREFIX + "certificate_expiry_timestamp_seconds", ()):
        ref = labels.get("certificate", "")
        acme = labels.get("source") == "acme"
        certs.append(CertificateStatus(ref, labels.get("names", ""), labels.get("source", ""), value,
                                       int(renewals.get(ref, 0)) if acme else None,
                                       int(failures.get(ref, 0)) if acme else None, int(updates.get(ref, 0))))
    leader = [value for _, value in samples.get(PREFIX + "acme_leader", ())]
    return certs, (leader[0] == 1) if leader else None


def server_name(member: str) -> str:
    """The HAProxy server name the agent gives a member (`10.0.1.5:80` → `10.0.1.5_80`)."""
    host, sep, port = member.rpartition(":")
    try:
        return Member.parse(host.strip("[]"), int(port)).server_name if sep else member
    except ValueError:
        return member


def parse_show_stat(text: str) -> list[dict[str, str]]:
    """`show stat` CSV → one dict per row, keyed by the header's column names."""
    text = text.strip()
    if not text.startswith("# "):
        raise StatusError(f"unexpected answer from HAProxy: {text.splitlines()[0] if text else '(empty)'}")
    return list(csv.DictReader(io.StringIO(text[2:])))


def apply_haproxy(svc: ServiceStatus, rows: list[dict[str, str]]) -> None:
    """Join HAProxy's servers of the service's backend into its members (skipping the `dns*`
    fallback servers, which HAProxy fills from DNS on its own)."""
    by_server = {m.server: m for m in svc.members}
    seen = set()
    for row in rows:
        name = row.get("svname", "")
        if row.get("pxname") != svc.backend or name in ("BACKEND", "FRONTEND") or name.startswith("dns"):
            continue
        seen.add(name)
        member = by_server.get(name)
        if member is None:  # HAProxy has it, the agent does not (being drained and removed)
            member = MemberStatus(row.get("addr", ""), name, "-", None if svc.service == UNKNOWN else 0.0, "?")
            svc.members.append(member)
            by_server[name] = member
        member.haproxy = row.get("status", "") or "?"
        member.check = row.get("check_status", "").lstrip("* ")
        member.sessions = _int(row.get("scur"))
        member.total_sessions = _int(row.get("stot"))
        member.last_change_seconds = _int(row.get("lastchg"))
    for member in svc.members:
        if member.server not in seen:
            member.haproxy = "absent"
    effective_shares(svc)


def serving(member: MemberStatus) -> bool:
    """HAProxy sends it traffic now: UP (also `UP 1/2`, going down but not yet) not DRAIN or MAINT."""
    return member.haproxy.startswith("UP")


def effective_shares(svc: ServiceStatus) -> None:
    """Each member's share of new sessions now, from the agent's ring and HAProxy's health.

    Right after a scale-down the agent's ring may still hold a member HAProxy already has DOWN: the
    ring shares of the members HAProxy has UP are scaled to 100 % (a DOWN member's keys go to the
    others). When none of them is on the ring yet, HAProxy balances over its UP servers itself."""
    if any(m.ring_share is None for m in svc.members):  # the agent could not be read
        return
    up = [m for m in svc.members if serving(m)]
    on_ring = sum(m.ring_share or 0.0 for m in up)
    for m in svc.members:
        if not serving(m):
            m.share = 0.0 if m.haproxy != "?" else None
        elif on_ring > 0:
            m.share = (m.ring_share or 0.0) / on_ring
        else:
            m.share = 1.0 / len(up)


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "") else None
    except ValueError:
        return None


def collect(metrics_url: str, haproxy_socket: str | None) -> Status:
    """Read both sources; failures go into `errors`, never raise."""
    base = base_url(metrics_url)
    status = Status(base, haproxy_socket or default_socket(), time=time.time())
    try:
        code, body = http_get(base + "/metrics")
        if code != 200:
            raise StatusError(f"the agent's metrics endpoint {base}/metrics answered HTTP {code}")
        samples = parse_metrics(body)
        if not any(name.startswith(PREFIX) for name in samples):
            raise StatusError(f"{base}/metrics holds no haproxy_swarm_* metrics: is that the agent's metrics port?")
        status.services = services_from_metrics(samples)
        status.certificates, status.acme_leader = certificates_from_metrics(samples)
        status.agent_version = next((labels.get("version") for labels, _ in samples.get(PREFIX + "build_info", ())),
                                    None)
        code, body = http_get(base + "/readyz")
        status.ready, status.ready_reason = code == 200, body.strip()
    except StatusError as e:
        status.errors.append(str(e))
    except ValueError as e:  # the text format parser
        status.errors.append(f"{base}/metrics is not in Prometheus text format: {e}")
    try:
        info = admin_command(status.haproxy_socket, "show info")
        status.haproxy_version = next((line.partition(":")[2].strip() for line in info.splitlines()
                                       if line.startswith("Version:")), None)
        backends = [s.backend for s in status.services] or [DEFAULT_BACKEND]
        for backend in dict.fromkeys(backends):
            rows = parse_show_stat(admin_command(status.haproxy_socket, f"show stat {backend} 4 -1"))
            services = [s for s in status.services if s.backend == backend]
            if not services:  # the agent could not be read: show HAProxy's side alone
                services = [ServiceStatus(UNKNOWN, backend)]
                status.services.extend(services)
            for svc in services:
                apply_haproxy(svc, rows)
    except StatusError as e:
        status.errors.append(str(e))
    return status


# --------------------------------------------------------------------------- output


def _ago(now: float, then: float | None) -> str:
    if not then:
        return "never"
    seconds = max(0.0, now - then)
    if seconds < 90:
        return f"{seconds:.1f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _table(rows: list[list[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]


def _member_sort_key(m: MemberStatus) -> tuple[int, str, str]:
    try:
        host, _, port = m.member.rpartition(":")
        parsed = Member.parse(host.strip("[]"), int(port))
        return 0, parsed.ip.zfill(39), f"{parsed.port:05d}"
    except ValueError:
        return 1, m.member, m.server


def _dns_cell(m: MemberStatus, service: str) -> str:
    if service == UNKNOWN:
        return "?"
    if m.agent == "-":
        return "-"
    if m.dns_missing_seconds is not None:
        return f"grace ({m.dns_missing_seconds:.0f} s gone)"
    return "listed"


def render(status: Status) -> str:
    now = status.time
    lines = []
    if status.agent_version is not None or status.ready is not None:
        ready = "ready" if status.ready else "NOT READY"
        reasons = status.ready_reason.splitlines()
        lines.append(f"agent {status.metrics_url} (haproxy-swarm {status.agent_version or '?'}): {ready}"
                     + (f" ({reasons[0]})" if len(reasons) == 1 else ""))
        lines.extend(f"  {reason}" for reason in reasons if len(reasons) > 1)  # several services, a line each
    if status.haproxy_version is not None:
        lines.append(f"HAProxy {status.haproxy_version} on {status.haproxy_socket}")
    if status.certificates:
        lines.append("")
        role = {True: " (this replica orders the ACME certificates)",
                False: " (another replica orders the ACME certificates; this one loads them)"}
        lines.append("certificates" + role.get(status.acme_leader, "") if status.acme_leader is not None
                     else "certificates")
        rows = [["CERTIFICATE", "NAMES", "SOURCE", "EXPIRES (UTC)", "IN", "RENEWED", "FAILED", "LOADED"]]
        for cert in sorted(status.certificates, key=lambda one: one.certificate):
            rows.append([cert.certificate, cert.names or "-", cert.source,
                         time.strftime("%Y-%m-%d %H:%M", time.gmtime(cert.expires)),
                         f"{(cert.expires - now) / 86400:.1f}d" if cert.expires > now else "EXPIRED",
                         "-" if cert.renewals is None else str(cert.renewals),
                         "-" if cert.failures is None else str(cert.failures), str(cert.updates)])
        lines.extend(_table(rows))
        if any(cert.expires - now < 14 * 86400 for cert in status.certificates):
            lines.append("  a certificate expires in less than 14 days: see the agent's log (docs/operator-guide.md)")
    for svc in status.services:
        lines.append("")
        name = "(unknown: the agent did not answer)" if svc.service == UNKNOWN else svc.service
        lines.append(f"service {name} -> backend {svc.backend}")
        header = ["MEMBER", "SERVER", "AGENT", "HAPROXY", "CHECK", "SHARE", "DNS", "SESSIONS", "TOTAL"]
        rows = [header]
        for m in sorted(svc.members, key=_member_sort_key):
            share = m.share if m.share is not None else m.ring_share
            rows.append([m.member or "-", m.server, m.agent, m.haproxy, m.check or "-",
                         "?" if share is None else f"{100 * share:.1f}%",
                         _dns_cell(m, svc.service),
                         "-" if m.sessions is None else str(m.sessions),
                         "-" if m.total_sessions is None else str(m.total_sessions)])
        if len(rows) > 1:
            lines.extend(_table(rows))
            lines.append("  SHARE: the part of new sessions each member takes now (HAProxy's health; a member "
                         "that is not UP takes none, the others take its keys)")
            if any(m.dns_missing_seconds is not None for m in svc.members):
                lines.append("  DNS grace: not listed by DNS any more, kept for MEMBER_GRACE in case DNS "
                             "answered short; removed when the grace ends")
            if svc.members and not any(serving(m) for m in svc.members) and svc.service != UNKNOWN:
                lines.append("  no member UP: HAProxy's own DNS fallback servers take every request")
        else:
            lines.append("  (no members)")
        if svc.counts:
            c = svc.counts
            lines.append(f"  members: {c.get('known', 0)} known, {c.get('up', 0)} on the ring, "
                         f"{c.get('pending', 0)} pending a first check, {c.get('down', 0)} down, "
                         f"{c.get('draining', 0)} draining, {c.get('missing', 0)} missing from DNS "
                         "(kept within the grace)")
        if svc.dns_queries or svc.dns_last_success:
            outcomes = ", ".join(f"{k} {v}" for k, v in svc.dns_queries.items())
            lines.append(f"  DNS: last good answer {_ago(now, svc.dns_last_success)}; lookups: {outcomes}")
        for family in svc.dns_failing_families:
            kind = {"A": "IPv4", "AAAA": "IPv6"}.get(family, family)
            lines.append(f"  DNS: {family} lookups fail while the other family answers: the {kind} members "
                         "are kept as they were (see the agent's log)")
        if svc.decisions:
            decided = ", ".join(f"{k} {v}" for k, v in svc.decisions.items() if v)
            lines.append(f"  decisions: {decided or 'none yet'}; sticky cookies issued {svc.cookies_issued}, "
                         f"re-routed {svc.cookies_rerouted}")
        if svc.service != UNKNOWN:
            lines.append(f"  changes: {svc.members_added} added, {svc.members_removed} removed since the agent "
                         f"started; last {_ago(now, svc.members_last_change)}")
        for change in svc.recent_changes[-8:]:
            when = time.strftime("%H:%M:%S", time.localtime(change.time))
            sign = "+" if change.change == "added" else "-"
            lines.append(f"    {when}  {sign}{change.member}  ({_ago(now, change.time)})")
    return "\n".join(lines)


def to_json(status: Status) -> str:
    doc: dict[str, Any] = asdict(status)
    return json.dumps(doc, indent=2, sort_keys=False)


def main(metrics_url: str, haproxy_socket: str | None, as_json: bool = False,
         out: TextIO | None = None, err: TextIO | None = None) -> int:
    """`haproxy-swarm status`: 0 when both sources answered, 1 otherwise."""
    out = out or sys.stdout
    err = err or sys.stderr
    status = collect(metrics_url, haproxy_socket)
    text = to_json(status) if as_json else render(status)
    if text:
        print(text, file=out)
    for message in status.errors:
        print(f"haproxy-swarm status: {message}", file=err)
    return 1 if status.errors else 0


__all__ = ["Status", "StatusError", "collect", "main", "render", "to_json"]
