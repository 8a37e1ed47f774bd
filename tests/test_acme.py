"""Certificates from ACME (issue 21): HAProxy's own ACME client against Pebble, Let's Encrypt's test CA.

Real parts on loopback: Pebble (tests/pebble.py) with its DNS pointed at the test's dnsmasq, two
replicas (`haproxy-swarm run`, the shipped haproxy.cfg) sharing one ACME_DIR, real backends.
Pebble validates HTTP-01 on replica B's plain-HTTP port while replica A holds the lease and orders:
the challenge is answered by the replica that did not order. HTTPS_REDIRECT is on throughout, so
every validation also proves the challenge path is not redirected. Proven:
- two names get certificates; HTTPS (HTTP/2 and HTTP/1.1) answers with the right one by SNI, on both
  replicas; Pebble issued one certificate per name, not one per replica; sticky routing over HTTPS;
- a renewal forced through the runtime API under traffic: 0 failed requests, the new certificate
  served by both replicas (B loads it from ACME_DIR), HAProxy's pid unchanged and its uptime unbroken;
- the CA down, then refusing (its validation fails): the certificate served stays, HAProxy retries
  the CA by itself, the failure is logged and counted, retries follow with back-off, and succeed
  once the CA validates again;
- a restart with ACME_DIR and the CA down: the certificates are reused, nothing is ordered;
- bad input stops `run` at start naming the setting (and on a HAProxy without an ACME client, the
  setting that asked for one), nothing left running;
- a TLS_CERT file replaced is served without a reload (both HAProxy versions).
The ACME tests need HAProxy's ACME client (3.4): on a HAProxy without it they are deselected
(tests/conftest.py, marker `acme`), and test_no_acme_client_names_the_setting runs instead on 2.6.
"""

from __future__ import annotations

import http.client
import io
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from pebble import Pebble
from polling import wait_for
from test_run import processes_with, run_env, run_until_exit
from test_tls import make_cert

from spoa.acme import has_acme_client
from spoa.haproxy.process import admin_command, haproxy_binary
from spoa.local.dnsmasq import Dnsmasq, Hosts
from spoa.local.ports import free_port
from spoa.local.services import Services
from spoa.local.stack import Stack
from spoa.status import main as status_main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

NAMES = ("a.acme.test", "b.acme.test")
CA_NAME = "ca.acme.test"
HAPROXY_26 = "/usr/sbin/haproxy"


class NamesDnsmasq(Dnsmasq):
    """The test's dnsmasq: the service's tasks (Stack.scale) and, always, the ACME names and the CA."""

    def __init__(self, fixed: Mapping[str, list[str]]) -> None:
        super().__init__(dict(fixed))
        self.fixed = dict(fixed)

    def set_hosts(self, hosts: Hosts, timeout: float = 5.0) -> None:
        super().set_hosts({**self.fixed, **dict(hosts)}, timeout)


@dataclass
class Served:
    subject: str
    serial: str
    issuer: str


def handshake(port: int, name: str, root: str | None) -> Served:
    """The certificate 127.0.0.1:`port` serves for SNI `name`; with `root`, the handshake verifies it
    (chain and name) against that root. Subject and issuer are their common names."""
    if root:
        context = ssl.create_default_context(cafile=root)
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    out = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-subject", "-serial", "-issuer",
                          "-nameopt", "multiline"], input=der, capture_output=True, check=True, timeout=10).stdout
    common: list[str] = []
    serial = ""
    for line in out.decode().splitlines():
        if line.strip().startswith("commonName"):
            common.append(line.split("=", 1)[1].strip())
        elif line.startswith("serial="):
            serial = line.removeprefix("serial=").strip()
    return Served(common[0] if common else "", serial, common[-1] if len(common) > 1 else "")


def https_get(port: int, name: str, root: str, cookie: str | None = None) -> tuple[int, str | None, str | None]:
    """GET / over HTTPS with SNI and Host `name`, verified: (status, X-Served-By, Set-Cookie)."""
    context = ssl.create_default_context(cafile=root)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=name) as tls:
        conn = http.client.HTTPConnection(name, port, timeout=5)
        conn.sock = tls
        conn.request("GET", "/", headers={"Cookie": cookie} if cookie else {})
        reply = conn.getresponse()
        reply.read()
        return reply.status, reply.getheader("X-Served-By"), reply.getheader("Set-Cookie")


def curl_version(port: int, name: str, root: str, http: str) -> str:
    """The HTTP version curl negotiated (`2`, `1.1`) for https://`name`/ resolved to 127.0.0.1."""
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code} %{http_version}", http,
                          "--cacert", root, "--resolve", f"{name}:{port}:127.0.0.1", f"https://{name}:{port}/"],
                         capture_output=True, text=True, timeout=15)
    assert out.returncode == 0, out.stderr
    status, version = out.stdout.split()
    assert status == "200", out.stdout
    return version


@dataclass
class Replicas:
    dns: NamesDnsmasq
    pebble: Pebble
    a: Stack  # started first: holds the lease, orders
    b: Stack  # the CA validates on its port
    https_a: int
    https_b: int
    acme_dir: str
    env: dict[str, str]

    def root(self) -> str:
        return self.pebble.root()


def acme_env(pebble: Pebble, acme_dir: str, https: int) -> dict[str, str]:
    return {
        "ACME_DOMAINS": ",".join(NAMES),
        "ACME_DIRECTORY": pebble.directory,
        "ACME_CA_FILE": pebble.ca,
        "ACME_EMAIL": "ops@example.com",
        "ACME_DIR": acme_dir,
        "ACME_RETRY": "2",
        "HTTPS_BIND": f"127.0.0.1:{https}",
        "HTTPS_REDIRECT": "1",
        "HTTPS_REDIRECT_PORT": str(https),
        "HSTS_MAX_AGE": "600",
    }


def leader(stack: Stack) -> float:
    return stack.metric("haproxy_swarm_acme_leader")


def issued_by_pebble(stack: Stack, port: int, name: str) -> bool:
    try:
        return "Pebble" in handshake(port, name, None).issuer
    except OSError:
        return False


@pytest.fixture(scope="module")
def replicas() -> Iterator[Replicas]:
    acme_dir = tempfile.mkdtemp(prefix="haproxy-swarm-acme-")
    fixed = {name: ["127.0.0.1"] for name in (*NAMES, CA_NAME)}
    dns = NamesDnsmasq(fixed)
    dns.start()
    stacks: list[Stack] = []
    pebble: Pebble | None = None
    try:
        ports_b = (free_port(), free_port(), free_port())
        pebble = Pebble(tempfile.mkdtemp(prefix="haproxy-swarm-pebble-"), dns.address, http_port=ports_b[0]).start()
        https_a, https_b = free_port(), free_port()
        a = Stack(n_slots=3, dns=dns, env=acme_env(pebble, acme_dir, https_a))
        stacks.append(a)
        a.start()
        wait_for(lambda: leader(a) == 1, "replica A holds the ACME lease", timeout=10)
        b = Stack(n_slots=3, dns=dns, tasks=a.tasks, ports=ports_b, env=acme_env(pebble, acme_dir, https_b))
        stacks.append(b)
        b.start(members=a.members)
        # A ordered as soon as it held the lease, while B (where the CA validates) was starting: those
        # orders failed and wait for their retry (ACME_RETRY, doubled each time). Ordered again now, as
        # an operator would (`acme renew`; the agent follows an order it did not start).
        for name in NAMES:
            admin_command(a.socket, f"acme renew @acme/{name}.pem")
        yield Replicas(dns, pebble, a, b, https_a, https_b, acme_dir, acme_env(pebble, acme_dir, https_a))
    finally:
        for stack in reversed(stacks):
            stack.stop()
        if pebble is not None:
            pebble.stop()
            shutil.rmtree(pebble.workdir, ignore_errors=True)
        dns.stop()
        shutil.rmtree(acme_dir, ignore_errors=True)


def logs(r: Replicas) -> str:
    """What to read when a wait fails: each replica's log and HAProxy's ACME lines, Pebble's log."""
    out = []
    for label, stack in (("A", r.a), ("B", r.b)):
        haproxy_log = Path(stack.run_dir, "haproxy.log")
        acme_lines = [ln for ln in (haproxy_log.read_text(errors="replace") if haproxy_log.exists() else "")
                      .splitlines() if "acme" in ln.lower() and "<ACME>" not in ln]
        out.append(f"--- replica {label} run.log:\n{stack.log_tail(3000)}\n--- its HAProxy's acme lines:\n"
                   + "\n".join(acme_lines[-30:]))
    out.append(f"--- pebble:\n{r.pebble.log()[-3000:]}")
    return "\n".join(out)


@pytest.mark.acme
def test_two_names_get_certificates_served_by_sni_on_both_replicas(replicas: Replicas) -> None:
    r = replicas
    try:
        took = wait_for(lambda: all(issued_by_pebble(s, p, n) for s, p in ((r.a, r.https_a), (r.b, r.https_b))
                                    for n in NAMES), "both names served with Pebble's certificates by both replicas",
                        timeout=40, interval=0.2)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{logs(r)}") from None
    print(f"certificates for {len(NAMES)} names on 2 replicas after {took:.1f}s")
    root = r.root()
    for port in (r.https_a, r.https_b):
        for name in NAMES:
            served = handshake(port, name, root)  # verified: the chain and the name
            assert served.subject == name, served
            assert curl_version(port, name, root, "--http2") == "2"
            assert curl_version(port, name, root, "--http1.1") == "1.1"
    # One replica ordered, once per name; the other answered the CA's challenges and loaded the files.
    assert (leader(r.a), leader(r.b)) == (1, 0)
    assert r.pebble.issued() == len(NAMES), r.pebble.log()[-3000:]
    assert f"Attempting to validate w/ HTTP: http://a.acme.test:{r.b.traffic_port}/" in r.pebble.log()
    for name in NAMES:
        assert (Path(r.acme_dir) / "certs" / f"{name}.pem").is_file()
        assert handshake(r.https_a, name, root).serial == handshake(r.https_b, name, root).serial
    assert r.b.metric("haproxy_swarm_certificate_updates_total") >= len(NAMES)
    assert r.a.metric("haproxy_swarm_acme_renewals_total") == len(NAMES)
    expiry = r.a.metric("haproxy_swarm_certificate_expiry_timestamp_seconds", names=NAMES[0])
    assert expiry > time.time() + 86400
    # HTTP-01 is answered on plain HTTP though HTTPS_REDIRECT redirects everything else.
    conn = http.client.HTTPConnection("127.0.0.1", r.b.traffic_port, timeout=5)
    conn.request("GET", "/.well-known/acme-challenge/tok-en_1", headers={"Host": NAMES[0]})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.read().decode().startswith("tok-en_1."), reply.status
    conn.request("GET", "/x", headers={"Host": NAMES[0]})
    reply = conn.getresponse()
    reply.read()
    assert reply.status == 301 and reply.getheader("Location") == f"https://{NAMES[0]}:{r.https_b}/x"
    conn.close()


@pytest.mark.acme
def test_sticky_over_https_with_hsts(replicas: Replicas) -> None:
    r = replicas
    wait_for(lambda: issued_by_pebble(r.a, r.https_a, NAMES[0]), "a certificate from Pebble", timeout=40)
    root = r.root()
    members = r.a.addresses(r.a.members)
    for _ in range(10):
        status, served, set_cookie = https_get(r.https_a, NAMES[0], root)
        assert status == 200 and served in members and set_cookie and "Secure" in set_cookie, (status, set_cookie)
        cookie = set_cookie.split(";", 1)[0]
        for port in (r.https_a, r.https_b):  # the same task on both replicas
            assert https_get(port, NAMES[1], root, cookie=cookie)[1] == served
    context = ssl.create_default_context(cafile=root)
    with socket.create_connection(("127.0.0.1", r.https_a), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=NAMES[0]) as tls:
        conn = http.client.HTTPConnection(NAMES[0], r.https_a)
        conn.sock = tls
        conn.request("GET", "/")
        assert conn.getresponse().getheader("Strict-Transport-Security") == "max-age=600"


class Load(threading.Thread):
    """New HTTPS connections (a handshake each) to both names on both replicas until stopped."""

    def __init__(self, targets: list[tuple[int, str]], root: str) -> None:
        super().__init__(daemon=True)
        self.targets, self.root = targets, root
        self.ok = 0
        self.failed: list[str] = []
        self.serials: set[str] = set()
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            port, name = self.targets[i % len(self.targets)]
            i += 1
            try:
                status, _, _ = https_get(port, name, self.root)
                if status == 200:
                    self.ok += 1
                else:
                    self.failed.append(f"{name}:{port} HTTP {status}")
            except (OSError, http.client.HTTPException) as e:
                self.failed.append(f"{name}:{port} {e!r}")


@pytest.mark.acme
def test_forced_renewal_under_traffic_no_failure_no_reload(replicas: Replicas) -> None:
    r = replicas
    wait_for(lambda: all(issued_by_pebble(s, p, n) for s, p in ((r.a, r.https_a), (r.b, r.https_b))
                         for n in NAMES), "certificates from Pebble", timeout=40, interval=0.2)
    root = r.root()
    before = {(p, n): handshake(p, n, root).serial for p in (r.https_a, r.https_b) for n in NAMES}
    info_a, info_b = r.a.haproxy_info(), r.b.haproxy_info()
    renewals = r.a.metric("haproxy_swarm_acme_renewals_total")
    load = Load([(p, n) for p in (r.https_a, r.https_b) for n in NAMES], root)
    load.start()
    started = time.monotonic()
    try:
        assert admin_command(r.a.socket, f"acme renew @acme/{NAMES[0]}.pem").strip() == ""
        wait_for(lambda: all(handshake(p, NAMES[0], root).serial != before[(p, NAMES[0])]
                             for p in (r.https_a, r.https_b)),
                 "the renewed certificate served by both replicas", timeout=40, interval=0.1)
        took = time.monotonic() - started
        wait_for(lambda: load.ok > 50, "some traffic after the renewal", timeout=20)
    finally:
        load.halt.set()
        load.join(timeout=10)
    print(f"renewal under traffic: new certificate on both replicas after {took:.1f}s; "
          f"{load.ok} requests, {len(load.failed)} failed")
    assert load.failed == [], load.failed[:5]
    for p in (r.https_a, r.https_b):
        assert handshake(p, NAMES[1], root).serial == before[(p, NAMES[1])]  # the other name untouched
    for stack, info in ((r.a, info_a), (r.b, info_b)):
        after = stack.haproxy_info()
        assert after["Pid"] == info["Pid"], "HAProxy's worker changed: it was reloaded"
        assert int(after["Uptime_sec"]) >= int(info["Uptime_sec"]) + int(took) - 1
    wait_for(lambda: r.a.metric("haproxy_swarm_acme_renewals_total") == renewals + 1, "the renewal counted")
    saved = Path(r.acme_dir, "certs", f"{NAMES[0]}.pem").read_text()
    assert "PRIVATE KEY" in saved and "BEGIN CERTIFICATE" in saved


@pytest.mark.acme
def test_ca_down_or_refusing_keeps_certificate_counts_and_retries(replicas: Replicas) -> None:
    r = replicas
    wait_for(lambda: issued_by_pebble(r.a, r.https_a, NAMES[1]), "a certificate from Pebble", timeout=40)
    served = handshake(r.https_a, NAMES[1], None).serial
    failures = r.a.metric("haproxy_swarm_acme_renewal_failures_total")
    renewals = r.a.metric("haproxy_swarm_acme_renewals_total")
    haproxy_log = Path(r.a.run_dir, "haproxy.log")

    def ca_retries() -> int:  # HAProxy's own: its ACME task could not read the directory
        return sum(f"@acme/{NAMES[1]}.pem: invalid HTTP status code" in line and "when getting directory URL, "
                   "retrying in" in line for line in haproxy_log.read_text(errors="replace").splitlines())

    # The CA down: HAProxy's ACME task retries by itself (3 s, 9 s, ...), the certificate stays.
    retries = ca_retries()
    r.pebble.stop()
    admin_command(r.a.socket, f"acme renew @acme/{NAMES[1]}.pem")
    wait_for(lambda: ca_retries() > retries, "HAProxy retrying the CA that is down", timeout=10)
    assert handshake(r.https_a, NAMES[1], None).serial == served
    # Back, but refusing: it validates on a port nothing listens on, every challenge fails.
    r.pebble.start(http_port=free_port())
    wait_for(lambda: r.a.metric("haproxy_swarm_acme_renewal_failures_total") >= failures + 2,
             "a failure, then a failed retry, counted", timeout=40, interval=0.2)
    log = r.a.log_tail(20000)
    assert f"certificate @acme/{NAMES[1]}.pem: the order from {r.pebble.directory} failed" in log
    assert "retrying in 2s" in log and "retrying in 4s" in log, log[-3000:]
    assert "challenge error" in haproxy_log.read_text(errors="replace")
    for port in (r.https_a, r.https_b):
        assert handshake(port, NAMES[1], None).serial == served  # the current certificate stays
    # The CA validates again: the next retry succeeds.
    r.pebble.stop()
    r.pebble.start()
    wait_for(lambda: r.a.metric("haproxy_swarm_acme_renewals_total") == renewals + 1,
             "a retry that succeeds", timeout=40, interval=0.2)
    wait_for(lambda: all(handshake(p, NAMES[1], None).serial != served for p in (r.https_a, r.https_b)),
             "the new certificate on both replicas", timeout=15, interval=0.1)
    root = r.root()  # the restarted CA's
    for port in (r.https_a, r.https_b):
        assert handshake(port, NAMES[1], root).subject == NAMES[1]


@pytest.mark.acme
def test_tls_acme_on_a_service_line(replicas: Replicas, tmp_path: Path) -> None:
    """Several services (SWARM_CONFIG_FILE): the route's Host of a line marked `tls=acme` gets its
    certificate; the other service is served over HTTPS too (by SNI: the certificate of its name)."""
    r = replicas
    services = Services([("shop", NAMES[0], "tls=acme"), ("web", None, "")], n_slots=2)
    services.dns = NamesDnsmasq({name: ["127.0.0.1"] for name in (*NAMES, CA_NAME)})  # it starts and stops it
    https = free_port()
    services.extra_env = {"ACME_DIRECTORY": r.pebble.directory, "ACME_CA_FILE": r.pebble.ca,
                          "ACME_DIR": str(tmp_path / "acme"), "ACME_RETRY": "2", "HTTPS_BIND": f"127.0.0.1:{https}"}
    r.pebble.stop()
    r.pebble.start(http_port=services.traffic_port)  # the CA validates on this instance
    try:
        with services:
            wait_for(lambda: issued_by_pebble(services, https, NAMES[0]), "shop's certificate from Pebble",
                     timeout=40, interval=0.2)
            root = r.root()
            assert handshake(https, NAMES[0], root).subject == NAMES[0]
            status, served, _ = https_get(https, NAMES[0], root)
            assert status == 200 and services.service_of(served) == "shop", served
            wait_for(lambda: services.metric("haproxy_swarm_acme_renewals_total") == 1, "the order counted")
    finally:
        r.pebble.stop()
        r.pebble.start()


@pytest.mark.acme
def test_restart_reuses_certificates_without_ordering(replicas: Replicas) -> None:
    r = replicas
    wait_for(lambda: all(issued_by_pebble(r.a, r.https_a, n) for n in NAMES), "certificates", timeout=40)
    served = {n: handshake(r.https_a, n, None).serial for n in NAMES}
    r.b.stop()
    r.a.stop()
    r.pebble.stop()  # and the CA is down: a restart must not need it
    https = free_port()
    with Stack(n_slots=3, dns=r.dns, env=acme_env(r.pebble, r.acme_dir, https)) as again:
        wait_for(lambda: again.metric("haproxy_swarm_certificate_expiry_timestamp_seconds") > 0,
                 "the agent has read the certificates", timeout=15)
        for name in NAMES:
            assert handshake(https, name, None).serial == served[name]
        status = admin_command(again.socket, "acme status")
        assert status.count("\tStopped\t") == len(NAMES), status
        assert again.metric("haproxy_swarm_acme_renewals_total") == 0
        out = io.StringIO()
        assert status_main(f"http://127.0.0.1:{again.metrics_port}", again.socket, out=out, err=io.StringIO()) == 0
        text = out.getvalue()
        assert "certificates (this replica orders the ACME certificates)" in text, text
        for name in NAMES:  # CERTIFICATE NAMES SOURCE EXPIRES(date time) IN RENEWED FAILED LOADED
            row = next(line for line in text.splitlines() if f"@acme/{name}.pem" in line).split()
            assert row[1:3] == [name, "acme"] and row[6:8] == ["0", "0"], row
        # An operator's reload (SIGHUP to run): the new worker loads the certificates from ACME_DIR too.
        assert again.proc is not None
        worker = again.haproxy_info()["Pid"]
        os.kill(again.proc.pid, signal.SIGHUP)
        wait_for(lambda: again.haproxy_info().get("Pid") != worker, "a new HAProxy worker", timeout=15)
        for name in NAMES:
            assert handshake(https, name, None).serial == served[name]
        log = again.log_tail(20000)
        assert "ordering from" not in log
        assert "ACME_DIRECTORY (--acme-directory)" in log and "starting with the certificates in" in log


# --------------------------------------------------------------------------- at start, both versions


def test_bad_input_fails_at_start_naming_the_setting(tmp_path: Path) -> None:
    run_dir = str(tmp_path / "run")
    acme_dir = str(tmp_path / "acme")
    binary = haproxy_binary()
    capable, version = has_acme_client(binary)
    cases = [
        ({"ACME_DOMAINS": "a.example.com", "ACME_EMAIL": "not-an-address"}, "ACME_EMAIL (--acme-email)"),
        ({"ACME_DOMAINS": "a.example.com,not_a_name"}, "ACME_DOMAINS (--acme-domains)"),
        ({"ACME_DOMAINS": "*.example.com"}, "wildcard"),
        ({"ACME_DOMAINS": "127.0.0.1"}, "is not a DNS name"),
        ({"ACME_DOMAINS": "a.example.com", "ACME_DIRECTORY": "http://x.example.com/dir"},
         "ACME_DIRECTORY (--acme-directory)"),
        ({"HSTS_MAX_AGE": "600"}, "HSTS_MAX_AGE (--hsts-max-age)"),
    ]
    if capable:
        # Nothing listens there: the directory check (an HTTPS GET, as HAProxy will make it) fails.
        cases.append(({"ACME_DOMAINS": "a.example.com", "ACME_DIRECTORY": f"https://127.0.0.1:{free_port()}/dir"},
                      "ACME_DIRECTORY (--acme-directory): https://127.0.0.1:"))
    else:
        cases.append(({"ACME_DOMAINS": "a.example.com"}, "has no ACME client"))
    for env, expected in cases:
        code, out, _ = run_until_exit(run_env(run_dir, ACME_DIR=acme_dir, HAPROXY_BIN=binary, **env))
        assert code in (1, 2) and expected in out, (env, out[-2000:])  # 2: a setting, 1: a check at start
        assert processes_with(run_dir) == []
    print(f"HAProxy {version}: {len(cases)} bad inputs refused at start")


def test_no_acme_client_names_the_setting(tmp_path: Path) -> None:
    """Debian 12's HAProxy 2.6 (always installed) has no ACME client: a clear error naming the setting."""
    run_dir = str(tmp_path / "run")
    assert has_acme_client(HAPROXY_26)[0] is False
    code, out, _ = run_until_exit(run_env(run_dir, ACME_DIR=str(tmp_path / "acme"), HAPROXY_BIN=HAPROXY_26,
                                          ACME_DOMAINS="a.example.com"))
    assert code == 1, out
    assert "ACME_DOMAINS (--acme-domains) asks for certificates from ACME, but HAProxy 2.6" in out
    assert processes_with(run_dir) == []


def test_tls_cert_file_replaced_without_reload(tmp_path: Path) -> None:
    """TLS_CERT's file changes (a renewed secret swapped in by a rename): the new certificate is
    served to new handshakes, loaded through the runtime API, HAProxy not reloaded."""
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    first, second = make_cert(tmp_path / "1"), make_cert(tmp_path / "2")
    live = tmp_path / "live.pem"
    shutil.copy(first.bundle, live)
    https = free_port()
    with Stack(n_slots=3, env={"TLS_CERT": str(live), "HTTPS_BIND": f"127.0.0.1:{https}"}) as stack:
        old = handshake(https, "localhost", first.cert).serial
        pid = stack.haproxy_info()["Pid"]
        wait_for(lambda: stack.metric("haproxy_swarm_certificate_expiry_timestamp_seconds") > 0,
                 "the agent has read the certificate")
        tmp = tmp_path / "live.pem.new"
        shutil.copy(second.bundle, tmp)
        os.replace(tmp, live)
        took = wait_for(lambda: handshake(https, "localhost", None).serial != old, "the new certificate served",
                        timeout=15, interval=0.05)
        assert handshake(https, "localhost", second.cert).subject == "localhost"  # verified by the new one
        assert stack.haproxy_info()["Pid"] == pid
        assert stack.metric("haproxy_swarm_certificate_updates_total") == 1
        out = io.StringIO()
        assert status_main(f"http://127.0.0.1:{stack.metrics_port}", stack.socket, out=out, err=io.StringIO()) == 0
        row = next(line for line in out.getvalue().splitlines() if str(live) in line)
        assert row.split()[1:3] == ["localhost", "file"] and row.split()[-1] == "1", row
        print(f"TLS_CERT replaced: served after {took:.2f}s, no reload")
