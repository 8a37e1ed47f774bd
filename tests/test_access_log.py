"""Explaining one request: HAProxy's access log line says how the request was routed.

fe_main's `log-format` (haproxy.cfg) is `option httplog`'s fields followed by
`client=<client address> service=<backend> key=<key source> decided=<server> cookie=<issued cookie>
agent_ms=<SPOE time>`.
Real HAProxy (HAPROXY_BIN: 2.6 and 3.4), `haproxy-swarm run` with two services (one keyed by a
header), real dnsmasq and backends; the lines are read from HAProxy's log (HAPROXY_LOG_LEVEL=info).

Proves: the httplog fields are still there, field for field (the stats frontend, which keeps plain
`option httplog`, logs the same shape); a first visit shows its placement and the cookie it was
issued (the value the client got); a returning visitor shows `key=cookie`, no cookie issued, the
server its cookie names; a header key shows `key=header`; a sticky cookie the table does not know
is decided by the agent (`agent_ms` a number) and re-issued; unset variables print `-`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from polling import wait_for

from spoa.local.client import User
from spoa.local.services import Services

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

SERVICES = [("shop", "shop.example.com", ""), ("api", "api.example.com", "key=header:X-User,src")]
# option httplog's fields: client, [accept date], frontend, backend/server, timers, status, bytes,
# cookies, termination state, connection counts, queues, "request"; then ours.
HTTPLOG = (r'<\d+>(?P<client>\S+):\d+ \[[^\]]+\] (?P<frontend>\S+) (?P<backend>\S+)/(?P<server>\S+) '
           r'-?\d+/-?\d+/-?\d+/-?\d+/\+?-?\d+ (?P<status>\d{3}) \d+ \S+ \S+ \S{4} '
           r'\d+/\d+/\d+/\d+/\+?\d+ \d+/\d+ "(?P<request>[^"]*)"')
ROUTING = re.compile(HTTPLOG + r' client=(?P<real_client>\S+) service=(?P<service>\S+) key=(?P<key>\S+) '
                     r'decided=(?P<decided>\S+) cookie=(?P<cookie>\S+) agent_ms=(?P<agent_ms>\S+)$')


@pytest.fixture(scope="module")
def stack() -> Iterator[Services]:
    with Services(SERVICES, n_slots=2, env={"HAPROXY_LOG_LEVEL": "info"}) as s:
        yield s


def logged(stack: Services, marker: str) -> str:
    """HAProxy's one log line whose request holds `marker`, once it is written."""
    path = Path(stack.run_dir, "haproxy.log")
    found: list[str] = []

    def written() -> bool:
        found[:] = [line for line in path.read_text(errors="replace").splitlines() if marker in line]
        return bool(found)

    wait_for(written, f"HAProxy logs the request {marker}", 10)
    [line] = found
    return line


def log_line(stack: Services, marker: str) -> dict[str, str]:
    """The routing fields of the one fe_main line whose request path holds `marker`."""
    line = logged(stack, marker)
    match = ROUTING.match(line)
    assert match, f"not httplog + the routing fields: {line}"
    return match.groupdict() | {"line": line}


def visit(stack: Services, user: User) -> tuple[str, dict[str, str], str | None]:
    """One request with a unique path: (the task that answered, its log fields, the Set-Cookie value)."""
    marker = f"/explain-{uuid.uuid4().hex[:12]}"
    answer = user.get("127.0.0.1", stack.traffic_port, marker)
    assert answer.status == 200 and answer.served_by, answer
    issued = answer.set_cookie.split("=", 1)[1].split(";", 1)[0] if answer.set_cookie else None
    return answer.served_by, log_line(stack, marker), issued


def server_name(address: str) -> str:
    return address.replace(":", "_")


def test_a_first_visit_then_the_return_of_the_same_user(stack: Services) -> None:
    user = User("first", "127.8.0.1", headers={"Host": "shop.example.com"})
    served, line, issued = visit(stack, user)
    assert line["frontend"] == "fe_main" and line["backend"] == "be_shop", line["line"]
    assert line["server"] == server_name(served) and line["service"] == "be_shop", line["line"]
    # A first visit: no key of the chain (cookie:SWARMID_shop), placed by HAProxy by load: nothing
    # decided, no SPOE, and the cookie of the server that served it.
    assert line["real_client"] == line["client"] == "127.8.0.1", line["line"]
    assert line["key"] == "new", line["line"]
    assert line["agent_ms"] == "-", line["line"]
    assert issued is not None and line["cookie"] == issued, (issued, line["line"])
    assert line["decided"] == "-", line["line"]

    again, line, reissued = visit(stack, user)
    assert again == served and reissued is None
    assert (line["key"], line["decided"], line["cookie"], line["agent_ms"]) == (
        "cookie", server_name(served), "-", "-"), line["line"]


def test_a_header_key_is_named(stack: Services) -> None:
    user = User("keyed", "127.8.0.2", headers={"Host": "api.example.com", "X-User": "alice"})
    served, line, _ = visit(stack, user)
    assert (line["backend"], line["service"], line["key"]) == ("be_api", "be_api", "header"), line["line"]
    assert line["decided"] == line["server"] == server_name(served), line["line"]


def test_a_cookie_the_table_does_not_know_is_decided_by_the_agent(stack: Services) -> None:
    user = User("forged", "127.8.0.3", headers={"Host": "shop.example.com"}, cookies={"SWARMID_shop": "0" * 20})
    served, line, issued = visit(stack, user)
    assert re.fullmatch(r"\d+", line["agent_ms"]), f"the agent was asked over SPOE: {line['line']}"
    assert line["decided"] == server_name(served), line["line"]
    assert issued is not None and line["cookie"] == issued, line["line"]  # re-issued: a cookie that names a member


def test_the_httplog_fields_are_kept(stack: Services) -> None:
    """The stats frontend keeps plain `option httplog`: fe_main's line is that, plus the routing fields."""
    marker = f"/metrics?explain={uuid.uuid4().hex[:12]}"
    assert User("ops").get("127.0.0.1", stack.stats_port, marker).status == 200
    stats = logged(stack, marker)
    plain = re.match(HTTPLOG + "$", stats)
    assert plain and plain["frontend"] == "stats", stats
    user = User("shape", "127.8.0.4", headers={"Host": "shop.example.com"})
    _, line, _ = visit(stack, user)
    prefix = line["line"][:line["line"].index(" client=")]
    assert len(prefix.split(" ")) == len(stats.split(" ")), (prefix, stats)
