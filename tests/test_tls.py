"""TLS at the front door (issue 12): HTTPS on its own bind when TLS_CERT names a PEM file.

Real HAProxy (the shipped config through `haproxy-swarm run`), real dnsmasq, real backends and a
certificate made here by the `openssl` command. Proven:
- HTTPS answers and routes stickily, HTTP/2 and HTTP/1.1 chosen by ALPN, h2 requests routed too;
- the sticky cookie is `Secure` over HTTPS and not over plain HTTP;
- HTTPS_REDIRECT: plain HTTP is redirected (301 GET/HEAD, 308 otherwise) to a Location that is
  reachable (HTTPS_REDIRECT_PORT; 443 left out), the agent's health endpoints and the stats page are not;
- a missing, unreadable or invalid certificate stops `run` at start, naming TLS_CERT, with nothing
  left running.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from polling import wait_for
from test_run import processes_with, run_env, run_until_exit

from spoa.config import ConfigError, load_settings, settings_env
from spoa.haproxy.process import HAProxyProcess
from spoa.local.ports import free_port
from spoa.local.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@dataclass(frozen=True)
class Cert:
    bundle: str  # certificate + key, what TLS_CERT names
    cert: str  # the certificate alone: what clients trust
    key: str  # the key alone


def make_cert(directory: Path, name: str = "localhost") -> Cert:
    """A self-signed certificate for `localhost` and 127.0.0.1 (EC P-256), by the openssl command."""
    key, cert, bundle = directory / f"{name}.key", directory / f"{name}.crt", directory / f"{name}.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=30)
    bundle.write_bytes(cert.read_bytes() + key.read_bytes())
    return Cert(str(bundle), str(cert), str(key))


@pytest.fixture(scope="module")
def cert() -> Iterator[Cert]:
    with tempfile.TemporaryDirectory(prefix="haproxy-swarm-tls-") as d:
        yield make_cert(Path(d))


def client_context(cert: Cert, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A client that trusts only the test's certificate and checks the name in it."""
    context = ssl.create_default_context(cafile=cert.cert)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


@dataclass
class Reply:
    status: int
    served_by: str | None
    set_cookie: str | None
    location: str | None


def request(port: int, cert: Cert | None, method: str = "GET", path: str = "/", cookie: str | None = None,
            host: str | None = None, source: str = "127.0.0.1") -> Reply:
    """One HTTP/1.1 request to 127.0.0.1:`port`, over TLS when `cert` is given."""
    conn: http.client.HTTPConnection
    if cert is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, source_address=(source, 0),
                                           context=client_context(cert))
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        headers = {"Cookie": cookie} if cookie else {}
        if host is not None:
            headers["Host"] = host
        conn.request(method, path, body=b"x" if method == "POST" else None, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return Reply(resp.status, resp.getheader("X-Served-By"), resp.getheader("Set-Cookie"),
                     resp.getheader("Location"))
    finally:
        conn.close()


def cookie_of(set_cookie: str | None) -> str:
    """`NAME=value` from a Set-Cookie header."""
    assert set_cookie, "no Set-Cookie"
    return set_cookie.split(";", 1)[0].strip()


def attributes(set_cookie: str | None) -> set[str]:
    assert set_cookie, "no Set-Cookie"
    return {a.strip().split("=", 1)[0].lower() for a in set_cookie.split(";")[1:]}


# --------------------------------------------------------------------------- HTTPS beside HTTP


@dataclass
class Front:
    """A running Stack and the port of its HTTPS bind."""

    stack: Stack
    https: int


@pytest.fixture(scope="module")
def front(cert: Cert) -> Iterator[Front]:
    https = free_port()
    with Stack(n_slots=3, env={"TLS_CERT": cert.bundle, "HTTPS_BIND": f"127.0.0.1:{https}"}) as s:
        yield Front(s, https)


def test_https_answers_and_routes_stickily(front: Front, cert: Cert) -> None:
    members = front.stack.addresses([0, 1, 2])
    first: dict[str, tuple[str, str]] = {}
    for i in range(30):
        reply = request(front.https, cert, source=f"127.3.0.{i + 1}")
        assert reply.status == 200 and reply.served_by in members, reply
        assert reply.served_by is not None
        first[f"user-{i}"] = (reply.served_by, cookie_of(reply.set_cookie))
    assert len(set(served for served, _ in first.values())) >= 2, Counter(s for s, _ in first.values())
    for i in range(30):  # the same users again, with their cookies: each on its task, no new cookie
        served, cookie = first[f"user-{i}"]
        reply = request(front.https, cert, cookie=cookie, source=f"127.3.0.{i + 1}")
        assert (reply.status, reply.served_by, reply.set_cookie) == (200, served, None), (i, reply)
    assert "HTTPS on 127.0.0.1:" in front.stack.log_tail(100_000)


def test_the_cookie_is_secure_over_https_and_not_over_http(front: Front, cert: Cert) -> None:
    over_tls = request(front.https, cert, source="127.3.1.1")
    plain = request(front.stack.traffic_port, None, source="127.3.1.2")
    assert over_tls.status == plain.status == 200
    assert "secure" in attributes(over_tls.set_cookie), over_tls.set_cookie
    assert "secure" not in attributes(plain.set_cookie), plain.set_cookie
    # Otherwise the same cookie: the same attributes but Secure, and its value names the task either way.
    expected = {"path", "httponly", "samesite"}
    assert attributes(over_tls.set_cookie) - {"secure"} == attributes(plain.set_cookie) == expected
    again = request(front.stack.traffic_port, None, cookie=cookie_of(over_tls.set_cookie), source="127.3.1.3")
    assert (again.served_by, again.set_cookie) == (over_tls.served_by, None)


def negotiated(port: int, cert: Cert, offer: list[str]) -> str | None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            client_context(cert, offer).wrap_socket(raw, server_hostname="localhost") as tls:
        return tls.selected_alpn_protocol()


def test_alpn_chooses_http2_or_http11(front: Front, cert: Cert) -> None:
    assert negotiated(front.https, cert, ["h2", "http/1.1"]) == "h2"
    assert negotiated(front.https, cert, ["http/1.1"]) == "http/1.1"
    with socket.create_connection(("127.0.0.1", front.https), timeout=5) as raw, \
            client_context(cert).wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3"), tls.version()


def curl_h2(url: str, cert: Cert, cookie: str | None = None) -> tuple[str, dict[str, str]]:
    """(HTTP version, response headers) of one request made by curl over HTTP/2."""
    args = ["curl", "--silent", "--show-error", "--http2", "--cacert", cert.cert, "--max-time", "5",
            "--output", "/dev/null", "--dump-header", "-", "--write-out", "version=%{http_version}\\n"]
    if cookie:
        args += ["--cookie", cookie]
    out = subprocess.run([*args, url], capture_output=True, text=True, timeout=15, check=True).stdout
    headers: dict[str, str] = {}
    version = ""
    for line in out.splitlines():
        name, sep, value = line.partition(":")
        if line.startswith("version="):
            version = line.removeprefix("version=")
        elif sep:
            headers[name.strip().lower()] = value.strip()
    return version, headers


def test_an_http2_request_is_routed_and_sticks(front: Front, cert: Cert) -> None:
    curl = shutil.which("curl")  # scripts/setup installs Debian's, built with HTTP/2
    assert curl is not None and "HTTP2" in subprocess.run([curl, "-V"], capture_output=True, text=True,
                                                           timeout=10).stdout, "no curl with HTTP/2"
    url = f"https://localhost:{front.https}/h2"
    version, first = curl_h2(url, cert)
    assert version == "2", version
    assert first.get("x-served-by") in front.stack.addresses([0, 1, 2]), first
    assert "secure" in attributes(first.get("set-cookie")), first
    for _ in range(3):
        version, again = curl_h2(url, cert, cookie=cookie_of(first.get("set-cookie")))
        assert version == "2" and again.get("x-served-by") == first["x-served-by"], again
        assert "set-cookie" not in again, again


# --------------------------------------------------------------------------- redirect to HTTPS


@pytest.fixture(scope="module")
def redirecting(front: Front, cert: Cert) -> Iterator[Front]:
    """A second `run` on the same service (its DNS, its tasks) with HTTPS_REDIRECT on, its
    HTTPS_REDIRECT_PORT the port its HTTPS bind listens on (as when Swarm publishes 8443:8443)."""
    port = free_port()
    env = {"TLS_CERT": cert.bundle, "HTTPS_BIND": f"127.0.0.1:{port}", "HTTPS_REDIRECT": "1",
           "HTTPS_REDIRECT_PORT": str(port)}
    with Stack(dns=front.stack.dns, tasks=front.stack.tasks, env=env) as s:
        yield Front(s, port)


def test_http_is_redirected_to_a_reachable_https_location(redirecting: Front, cert: Cert) -> None:
    port, plain = redirecting.https, redirecting.stack.traffic_port
    get = request(plain, None, path="/a/b?x=1&y=2", host=f"localhost:{plain}")
    assert (get.status, get.location, get.served_by, get.set_cookie) == (
        301, f"https://localhost:{port}/a/b?x=1&y=2", None, None), get
    head = request(plain, None, method="HEAD", path="/h", host="localhost")
    assert (head.status, head.location) == (301, f"https://localhost:{port}/h"), head
    post = request(plain, None, method="POST", path="/form", host="localhost:80")
    assert (post.status, post.location) == (308, f"https://localhost:{port}/form"), post  # keeps POST
    v6 = request(plain, None, path="/", host="[::1]:8099")
    assert v6.location == f"https://[::1]:{port}/", v6
    # Following the Location: answered over HTTPS by a member, with a Secure cookie.
    followed = request(port, cert, path="/a/b?x=1&y=2")
    assert followed.status == 200 and followed.served_by in redirecting.stack.addresses([0, 1, 2]), followed
    assert "secure" in attributes(followed.set_cookie)


def test_a_request_without_host_is_served_not_redirected(redirecting: Front) -> None:
    """HTTP/1.0 without a Host header: no Location can be built, so it is served as it is."""
    with socket.create_connection(("127.0.0.1", redirecting.stack.traffic_port), timeout=5) as conn:
        conn.sendall(b"GET /old HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].decode().lower()
    assert head.startswith("http/1.0 200") or head.startswith("http/1.1 200"), head
    assert "location:" not in head and "x-served-by:" in head, head


def test_the_redirect_leaves_the_agent_and_the_stats_page_alone(redirecting: Front) -> None:
    for path in ("/healthz", "/readyz"):
        with urllib.request.urlopen(f"http://127.0.0.1:{redirecting.stack.metrics_port}{path}", timeout=5) as resp:
            assert resp.status == 200, path
    stats = request(redirecting.stack.stats_port, None, path="/;csv")
    assert (stats.status, stats.location) == (200, None), stats


@pytest.mark.parametrize(("published", "authority"), [("443", "shop.example"), ("8443", "shop.example:8443")])
def test_the_location_names_the_published_port(cert: Cert, published: str, authority: str) -> None:
    """HTTPS_REDIRECT_PORT is the port clients reach (Swarm's published port), not HTTPS_BIND's;
    443 is left out. HAProxy alone, from the shipped config: the redirect comes before any routing."""
    with tempfile.TemporaryDirectory(prefix="haproxy-swarm-tls-") as run_dir:
        traffic = free_port()
        env = {"RUN_DIR": run_dir, "HAPROXY_SOCKET": os.path.join(run_dir, "admin.sock"),
               "FRONTEND_BIND": f"127.0.0.1:{traffic}", "STATS_BIND": f"127.0.0.1:{free_port()}",
               "AGENT_ADDR": f"127.0.0.1:{free_port()}", "DNS_NAMESERVER": f"127.0.0.1:{free_port()}",
               "TLS_CERT": cert.bundle, "HTTPS_BIND": f"127.0.0.1:{free_port()}",
               "HTTPS_REDIRECT": "1", "HTTPS_REDIRECT_PORT": published}
        with HAProxyProcess(env) as haproxy:
            assert haproxy.proc is not None
            reply = request(traffic, None, path="/cart?id=7", host="shop.example:8099")
    assert (reply.status, reply.location) == (301, f"https://{authority}/cart?id=7"), reply


# --------------------------------------------------------------------------- settings


def test_the_tls_settings_reach_haproxy_and_survive_the_environment(cert: Cert) -> None:
    s = load_settings({"https_redirect": "yes"}, {"SWARM_SERVICE": "tasks.x:80", "TLS_CERT": cert.bundle,
                                                  "HTTPS_BIND": "[::]:9443", "HTTPS_REDIRECT_PORT": "8443"})
    assert (s.tls_cert, str(s.https_bind), s.https_redirect, s.https_redirect_port) == (
        cert.bundle, "[::]:9443", True, 8443)
    env = s.haproxy_env()
    assert (env["TLS_CERT"], env["HTTPS_BIND"], env["HTTPS_REDIRECT"], env["HTTPS_REDIRECT_PORT"]) == (
        cert.bundle, "[::]:9443", "1", "8443")
    assert load_settings({}, settings_env(s)) == s  # what `run` hands the agent
    default = load_settings({}, {"SWARM_SERVICE": "tasks.x:80"})
    assert (default.tls_cert, str(default.https_bind), default.haproxy_env()["HTTPS_REDIRECT"]) == (
        "", "0.0.0.0:8443", "0")
    with pytest.raises(ConfigError, match=r"HTTPS_REDIRECT \(--https-redirect\): invalid value 'maybe'"):
        load_settings({}, {"SWARM_SERVICE": "tasks.x:80", "HTTPS_REDIRECT": "maybe"})
    with pytest.raises(ConfigError, match=r"TLS_CERT \(--tls-cert\): invalid value 'cert.pem'.*absolute"):
        load_settings({}, {"SWARM_SERVICE": "tasks.x:80", "TLS_CERT": "cert.pem"})


# --------------------------------------------------------------------------- a bad certificate


REASONS = {"missing": "No such file", "a directory": "Is a directory", "not PEM": "no PEM certificate",
           "no key": "no private key", "a key for another certificate": "not a usable certificate and key",
           "an encrypted key": "the private key is encrypted"}


def bad_certs(directory: Path, good: Cert) -> dict[str, str]:
    other = make_cert(directory, "other")
    cases = {
        "missing": str(directory / "nope.pem"),
        "a directory": str(directory),
        "not PEM": str(directory / "garbage.pem"),
        "no key": good.cert,
        "a key for another certificate": str(directory / "mismatch.pem"),
        "an encrypted key": str(directory / "encrypted.pem"),
    }
    Path(cases["not PEM"]).write_text("hello\n")
    Path(cases["a key for another certificate"]).write_bytes(
        Path(good.cert).read_bytes() + Path(other.key).read_bytes())
    subprocess.run(["openssl", "pkey", "-in", good.key, "-aes256", "-passout", "pass:secret",
                    "-out", str(directory / "encrypted.key")], check=True, capture_output=True, timeout=30)
    Path(cases["an encrypted key"]).write_bytes(
        Path(good.cert).read_bytes() + (directory / "encrypted.key").read_bytes())
    return cases


def test_a_bad_certificate_stops_run_at_start_naming_the_setting(cert: Cert) -> None:
    with tempfile.TemporaryDirectory(prefix="haproxy-swarm-tls-") as d:
        for case, path in bad_certs(Path(d), cert).items():
            with tempfile.TemporaryDirectory(prefix="haproxy-swarm-run-") as run_dir:
                https = f"127.0.0.1:{free_port()}"
                code, out, took = run_until_exit(run_env(run_dir, TLS_CERT=path, HTTPS_BIND=https), timeout=15)
                assert processes_with(run_dir) == [], case
            assert code == 2, (case, out)
            assert "TLS_CERT (--tls-cert)" in out and path in out and REASONS[case] in out, (case, out)
            assert took < 10, (case, took)
            host, _, port = https.rpartition(":")
            with pytest.raises(OSError):
                socket.create_connection((host, int(port)), timeout=0.5).close()


def test_an_unreadable_certificate_stops_run_naming_the_setting(cert: Cert) -> None:
    # Root reads a file whatever its mode: as root (CI), `run` goes without the capabilities that
    # bypass file permissions, so the mode counts as it does for the image's non-root user.
    wrapper = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    with tempfile.TemporaryDirectory(prefix="haproxy-swarm-tls-") as d:
        locked = Path(d) / "locked.pem"
        shutil.copy(cert.bundle, locked)
        locked.chmod(0)
        with tempfile.TemporaryDirectory(prefix="haproxy-swarm-run-") as run_dir:
            code, out, _ = run_until_exit(run_env(run_dir, TLS_CERT=str(locked)), timeout=15, wrapper=wrapper)
    assert code == 2 and "TLS_CERT (--tls-cert)" in out and "Permission denied" in out, out


def test_the_flag_names_the_setting_too() -> None:
    with tempfile.TemporaryDirectory(prefix="haproxy-swarm-run-") as run_dir:
        code, out, _ = run_until_exit(run_env(run_dir), "--tls-cert", "/run/secrets/absent.pem", timeout=15)
    assert code == 2 and "TLS_CERT (--tls-cert)" in out and "/run/secrets/absent.pem" in out, out
    assert "No such file" in out, out


def test_a_redirect_without_a_certificate_is_refused() -> None:
    with tempfile.TemporaryDirectory(prefix="haproxy-swarm-run-") as run_dir:
        code, out, _ = run_until_exit(run_env(run_dir, HTTPS_REDIRECT="1"), timeout=15)
        assert processes_with(run_dir) == []
    assert code == 2 and "HTTPS_REDIRECT" in out and "TLS_CERT" in out, out


def test_without_a_certificate_there_is_no_https_bind(cert: Cert) -> None:
    """The default: TLS_CERT empty, HTTPS_BIND's port stays closed even though HTTPS_BIND is set."""
    https = free_port()
    with tempfile.TemporaryDirectory(prefix="haproxy-swarm-tls-") as run_dir:
        env = {"RUN_DIR": run_dir, "HAPROXY_SOCKET": os.path.join(run_dir, "admin.sock"),
               "FRONTEND_BIND": f"127.0.0.1:{free_port()}", "STATS_BIND": f"127.0.0.1:{free_port()}",
               "AGENT_ADDR": f"127.0.0.1:{free_port()}", "DNS_NAMESERVER": f"127.0.0.1:{free_port()}",
               "HTTPS_BIND": f"127.0.0.1:{https}", "HTTPS_REDIRECT": "1"}
        with HAProxyProcess(env) as haproxy:
            wait_for(lambda: os.path.exists(haproxy.socket_path), "HAProxy's admin socket")
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", https), timeout=0.5).close()
