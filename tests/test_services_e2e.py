"""Several services behind one `haproxy-swarm run` (issue 12), end to end: the shipped haproxy.cfg
with each service's backend instantiated from its be_app, real dnsmasq serving `tasks.<name>` for
each, real backends on a loopback network per service (an answer's X-Served-By names its service).

Proves: routing by Host and path prefix with the most specific route first and a default service;
404 when nothing matches and there is no default; each service's own sticky cookie; no answer ever
comes from another service's task, through scale events, an agent kill and a reload; a changed
file adds and removes services with no failed request.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
from collections import Counter
from collections.abc import Iterator

import pytest
from polling import wait_for

from spoa.local.client import User
from spoa.local.services import Services

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SERVICES = [
    ("shop", "shop.example.com", ""),
    ("api", "example.com/api", "key=header:X-User,src"),
    ("www", None, ""),
]


@pytest.fixture(scope="module")
def three() -> Iterator[Services]:
    with Services(SERVICES, n_slots=3, env={"HAPROXY_LOG_LEVEL": "info"}) as s:  # a failure's log line
        yield s


def failed_requests(stack: Services) -> list[str]:
    """HAProxy's log lines of the requests that did not get a 2xx (its termination state says why)."""
    try:
        with open(os.path.join(stack.run_dir, "haproxy.log"), errors="replace") as f:
            return [line.strip() for line in f if " fe_main " in line and not re.search(r" 2\d\d \d", line)][-10:]
    except OSError:
        return []


def user(name: str, host: str, source: str = "127.1.0.1", **headers: str) -> User:
    return User(name, source, headers={"Host": host, **headers})


def origin(stack: Services, who: User, path: str = "/") -> str | None:
    answer = who.get("127.0.0.1", stack.traffic_port, path)
    assert answer.status == 200, f"{who.name} {path}: HTTP {answer.status}"
    return stack.service_of(answer.served_by)


@pytest.mark.parametrize(("host", "path", "service"), [
    ("shop.example.com", "/", "shop"),
    ("SHOP.example.com:8099", "/cart", "shop"),  # Host in any case, with a port
    ("example.com", "/api", "api"),
    ("example.com", "/api/v1/x", "api"),
    ("example.com", "/apix", "www"),  # a path prefix matches whole segments
    ("example.com", "/", "www"),
    ("shop.example.com.evil.net", "/", "www"),  # a Host is matched whole
    ("unknown", "/api", "www"),
])
def test_routes_by_host_and_path(three: Services, host: str, path: str, service: str) -> None:
    assert origin(three, user("u", host), path) == service


def raw_get(stack: Services, request: bytes) -> tuple[int, str | None]:
    """(status, the service that answered) of a request written byte for byte (no Host added)."""
    with socket.create_connection(("127.0.0.1", stack.traffic_port), timeout=5) as conn:
        conn.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode(errors="replace").split("\r\n")
    served = next((line.split(":", 1)[1].strip() for line in head[1:] if line.lower().startswith("x-served-by:")), None)
    return int(head[0].split()[1]), stack.service_of(served)


def test_a_host_with_a_slash_is_refused_and_no_host_is_the_default_services(three: Services) -> None:
    # `Host: example.com/api` + `/anything` would read as the api route's `example.com/api/anything`
    request = b"GET /anything HTTP/1.1\r\nHost: example.com/api\r\nConnection: close\r\n\r\n"
    assert raw_get(three, request) == (400, None)
    # HTTP/1.0 without a Host: the path alone; routes tied to a Host do not take it, the default does
    assert raw_get(three, b"GET /api/x HTTP/1.0\r\n\r\n") == (200, "www")


def test_each_service_has_its_own_sticky_cookie(three: Services) -> None:
    shopper = user("shopper", "shop.example.com", "127.1.0.7")
    served = {three.services["shop"].tasks[i].address for i in three.services["shop"].members}
    answer = shopper.get("127.0.0.1", three.traffic_port)
    assert answer.served_by in served
    assert answer.set_cookie is not None and answer.set_cookie.startswith("SWARMID_shop=")
    assert "Path=/;" in answer.set_cookie
    for _ in range(5):  # the cookie holds
        assert shopper.get("127.0.0.1", three.traffic_port).served_by == answer.served_by
    # the same browser on the default service: the shop's cookie is not www's
    shopper.headers["Host"] = "www.example.org"
    answer = shopper.get("127.0.0.1", three.traffic_port)
    assert three.service_of(answer.served_by) == "www"
    assert answer.set_cookie is not None and answer.set_cookie.startswith("SWARMID_www=")
    # a service keyed by a header issues no cookie; its users stick by the header
    api = user("api-user", "example.com", "127.1.0.8", **{"X-User": "alice"})
    first = api.get("127.0.0.1", three.traffic_port, "/api/orders")
    assert first.set_cookie is None and three.service_of(first.served_by) == "api"
    for n in range(5):
        api.source_ip = f"127.1.0.{20 + n}"  # another address: the header decides
        assert api.get("127.0.0.1", three.traffic_port, "/api/orders").served_by == first.served_by


def test_forged_cookie_of_another_service_is_not_followed(three: Services) -> None:
    """A shop cookie sent to www names a shop task: www's own maps do not know it."""
    shopper = user("forger", "shop.example.com", "127.1.0.9")
    shopper.get("127.0.0.1", three.traffic_port)
    shop_cookie = shopper.cookies["SWARMID_shop"]
    forger = user("forger2", "www.example.org", "127.1.0.10")
    forger.cookies["SWARMID_www"] = shop_cookie
    for _ in range(5):
        assert origin(three, forger) == "www"


def test_no_answer_from_another_service_through_scaling_an_agent_kill_and_a_reload(three: Services) -> None:
    stop = threading.Event()
    seen: Counter[tuple[str, str | None]] = Counter()
    failures: list[str] = []
    clients = [
        ("shop", [user(f"s{i}", "shop.example.com", f"127.1.1.{i + 1}") for i in range(8)], "/"),
        ("api", [user(f"a{i}", "example.com", f"127.1.2.{i + 1}", **{"X-User": f"u{i}"}) for i in range(8)], "/api/x"),
        ("www", [user(f"w{i}", "www.example.org", f"127.1.3.{i + 1}") for i in range(8)], "/"),
    ]

    def drive(service: str, people: list[User], path: str) -> None:
        n = 0
        while not stop.is_set():
            who = people[n % len(people)]
            n += 1
            try:
                answer = who.get("127.0.0.1", three.traffic_port, path)
            except OSError as e:
                failures.append(f"{service} {who.name}: {e}")
                continue
            got = three.service_of(answer.served_by)
            seen[(service, got)] += 1
            if answer.status != 200 or got != service:
                failures.append(f"{service} {who.name}: HTTP {answer.status} from {answer.served_by} ({got})")

    threads = [threading.Thread(target=drive, args=c, daemon=True) for c in clients]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(seen[(s, s)] > 20 for s in ("shop", "api", "www")), "traffic on every service")
        three.scale_service("shop", [0, 1, 2])
        three.scale_service("api", [1])
        agent = three.agent_pid()
        assert agent is not None
        os.kill(agent, signal.SIGKILL)
        wait_for(lambda: three.agent_pid() not in (None, agent), "the agent restarted", timeout=20)
        three.scale_service("www", [0, 2])
        before = sum(seen.values())
        haproxy = three.haproxy_pid()
        assert haproxy is not None
        os.kill(haproxy, signal.SIGUSR2)  # an operator's reload: every dynamic server vanishes
        wait_for(lambda: sum(seen.values()) > before + 200, "traffic after the reload", timeout=30)
        three.wait_service("shop", [0, 1, 2])
        three.wait_service("api", [1])
        three.wait_service("www", [0, 2])
        three.scale_service("shop", [0, 1])
        three.scale_service("api", [0, 1])
        three.scale_service("www", [0, 1])
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    total = sum(seen.values())
    print(f"\n{total} requests over three services, {len(failures)} failed: {dict(seen)}")
    assert not failures, (failures[:10], failed_requests(three))
    assert {got for (_, got) in seen} == {"shop", "api", "www"}


def test_no_route_and_no_default_is_a_404() -> None:
    with Services([("shop", "shop.example.com", ""), ("api", "/api", "")], n_slots=1).start([0]) as s:
        answer = user("lost", "example.net").get("127.0.0.1", s.traffic_port, "/")
        assert answer.status == 404 and answer.served_by is None
        assert raw_get(s, b"GET / HTTP/1.0\r\n\r\n") == (404, None)  # no Host, no default: 404 too
        assert origin(s, user("u", "example.net"), "/api/x") == "api"  # any Host, that path
        assert origin(s, user("u", "shop.example.com"), "/api/x") == "shop"  # the Host's route is more specific


def test_a_changed_file_adds_and_removes_services_without_a_failed_request() -> None:
    s = Services([("shop", "shop.example.com", ""), ("blog", "blog.example.com", ""),
                  ("news", "news.example.com", "")], n_slots=2)
    s.write_config(["shop", "blog"])  # news is not in the file at start
    with s.start([0, 1]):
        stop = threading.Event()
        results: Counter[str] = Counter()
        failures: list[str] = []
        shopper = [user(f"s{i}", "shop.example.com", f"127.1.4.{i + 1}") for i in range(6)]

        def drive() -> None:
            n = 0
            while not stop.is_set():
                who = shopper[n % len(shopper)]
                n += 1
                try:
                    answer = who.get("127.0.0.1", s.traffic_port)
                except OSError as e:
                    failures.append(str(e))
                    continue
                got = s.service_of(answer.served_by)
                results[got or f"HTTP {answer.status}"] += 1
                if answer.status != 200 or got != "shop":
                    failures.append(f"HTTP {answer.status} from {answer.served_by}")

        thread = threading.Thread(target=drive, daemon=True)
        thread.start()
        try:
            wait_for(lambda: results["shop"] > 20, "traffic on the shop")
            s.write_config(["shop", "news"])  # blog goes, news stays; watched, no signal needed
            wait_for(lambda: user("b", "blog.example.com").get("127.0.0.1", s.traffic_port).status == 404,
                     "blog.example.com is no longer routed", timeout=30)
            s.wait_service("news", [0, 1])
            s.write_config(["shop", "news", "blog"])
            assert s.proc is not None
            s.proc.send_signal(signal.SIGHUP)  # or a signal, at once
            wait_for(lambda: user("b", "blog.example.com").get("127.0.0.1", s.traffic_port).status == 200,
                     "blog.example.com is routed again", timeout=30)
            s.wait_service("blog", [0, 1])
            assert origin(s, user("n", "news.example.com")) == "news"
            assert origin(s, user("b", "blog.example.com")) == "blog"
            # SIGHUP with the services unchanged still reloads HAProxy (a renewed TLS_CERT is read)
            worker = s.haproxy_info()["Pid"]
            s.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: s.haproxy_info().get("Pid") != worker, "HAProxy reloaded on SIGHUP", timeout=15)
            assert "services unchanged; reloading HAProxy" in s.log_tail(20000)
        finally:
            stop.set()
            thread.join(timeout=10)
        print(f"\nshop during two changes of the file: {dict(results)}")
        assert not failures, failures[:10]
