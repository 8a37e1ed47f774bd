"""The runtime API client and the writer against a real HAProxy running the shipped haproxy.cfg.

Also the pure parts of `spoa.haproxy.answers` (typed rows, failure recognition), first.
Every HAProxy, backend and socket a test starts, the test stops; waits are polls with deadlines.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import io
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from polling import poll

from spoa.haproxy.answers import (
    AdminState,
    CheckResult,
    CheckState,
    OpState,
    answer_failed,
    parse_info,
    parse_map,
    parse_server_sessions,
    parse_servers_state,
    verb_of,
)
from spoa.haproxy.errors import MalformedAnswer, RuntimeAPIError, RuntimeAPIUnavailable
from spoa.haproxy.process import HAProxyProcess, haproxy_version
from spoa.haproxy.reconcile import ActionKind, CheckSettings, Reconciler
from spoa.haproxy.runtime import CommandCounts, RuntimeAPI, validate_command
from spoa.haproxy.writer import HAProxyWriter, StepReport
from spoa.local.backends import Backend
from spoa.local.ports import free_port
from spoa.member import Member

BE = "be_app"

# --------------------------------------------------------------------------- answers (pure)

STATE_26 = """1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight \
srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state \
bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr \
srv_agent_addr srv_agent_port
3 be_app 1 dns1 - 0 32 1 1 0 1 0 0 14 0 0 0 tasks.backend 80 - 0 0 - - 0
3 be_app 33 127.0.0.2_46617 127.0.0.2 2 0 1 1 0 6 3 2 6 0 0 0 - 46617 - 0 0 - - 0
3 be_app 34 fd00--5_80 fd00::5 0 1 1 1 7 1 0 0 2 0 0 0 - 80 - 0 0 - - 0
"""


def test_servers_state_rows_are_typed() -> None:
    rows = parse_servers_state(STATE_26)
    assert [r.name for r in rows] == ["dns1", "127.0.0.2_46617", "fd00--5_80"]
    dns, up, new = rows
    assert dns.admin == AdminState.RMAINT and dns.addr == "-" and dns.in_maintenance
    assert (up.addr, up.port, up.op_state, up.check_result, up.check_health) == (
        "127.0.0.2", 46617, OpState.RUNNING, CheckResult.PASSED, 2)
    assert up.is_up and up.check_passed(rise=2) and not up.check_passed(rise=3)
    assert new.admin == AdminState.FMAINT and new.check_state == CheckState.CONFIGURED and not new.checks_enabled
    assert new.since_change == 7 and not new.is_up


def test_servers_state_columns_are_found_by_name() -> None:
    """A later version adding or moving columns (3.x) changes nothing."""
    text = ("1\n# srv_name be_name srv_id srv_port srv_addr srv_admin_state srv_op_state new_column "
            "srv_check_result srv_check_health srv_check_state\n"
            "10.0.0.1_80 be_app 5 80 10.0.0.1 8 2 x 3 3 6\n"
            "10.0.0.2_80 be_app 6 80 10.0.0.2 0 9 x 9 0 6\n")
    a, b = parse_servers_state(text)
    assert (a.name, a.port, a.admin, a.op_state, a.draining, a.is_up) == (
        "10.0.0.1_80", 80, AdminState.FDRAIN, OpState.RUNNING, True, False)
    # Values we do not know never make a server look healthy.
    assert b.op_state == OpState.STOPPED and b.check_result == CheckResult.UNKNOWN and not b.is_up


@pytest.mark.parametrize("text", ["", "No such backend.\n", "1\n3 be_app 1 x\n", "1\n# be_name srv_name\n",
                                  "1\n# " + " ".join(f"c{i}" for i in range(3)) + "\n1 2 3\n",
                                  STATE_26.replace(" 46617 - 0", " 46617 0")])
def test_malformed_servers_state_is_a_typed_error(text: str) -> None:
    with pytest.raises(MalformedAnswer):
        parse_servers_state(text)


@given(st.text(max_size=300))
def test_parsers_raise_only_malformed_answer(text: str) -> None:
    for parse in (parse_servers_state, parse_map, parse_info, lambda t: parse_server_sessions(t, BE)):
        with contextlib.suppress(MalformedAnswer):
            parse(text)


def test_sessions_map_and_info_parsing() -> None:
    stat = ("# pxname,svname,qcur,qmax,scur,smax\nbe_app,BACKEND,0,0,9,9\nbe_app,10.0.0.1_80,1,1,2,5\n"
            "be_app,dns1,,,,\nother,10.0.0.1_80,0,0,7,7\n")
    assert parse_server_sessions(stat, BE) == {"10.0.0.1_80": 3, "dns1": 0}
    entries = parse_map("0x55d1 k1 10.0.0.1_80\n0x55d2 k2 value with spaces\n")
    assert [(e.ref, e.key, e.value) for e in entries] == [("0x55d1", "k1", "10.0.0.1_80"),
                                                          ("0x55d2", "k2", "value with spaces")]
    assert parse_info("Name: HAProxy\nPid: 42\nUptime_sec: 3\n")["Pid"] == "42"


@pytest.mark.parametrize(("command", "answer", "failed"), [
    ("add server be_app/x 1.2.3.4:80 check", "New server registered.\n", False),
    ("add server be_app/x 1.2.3.4:80 check", "Already exists a server with the same name in backend.\n", True),
    ("del server be_app/x", "Server deleted.\n", False),
    ("del server be_app/x", "Only servers in maintenance mode can be deleted.\n", True),
    ("enable server be_app/x", "", False),
    ("enable server be_app/x", "No such server.\n", True),
    ("set server be_app/x state drain", "", False),
    ("add map /m k v", "", False),
    ("del map /m #0x1", "Key not found.\n", True),
    ("show map /m", "", False),
    ("show map /m", "Unknown map identifier. Please use #<id> or <file>.\n", True),
    ("show servers state be_app", "Can't find backend.\n", True),
    ("show stat be_app 4 -1", "No such proxy.\n", True),
    ("bogus", "Unknown command, but maybe one of the following ones is a better match:\n", True),
])
def test_failure_answers_are_recognised_per_command(command: str, answer: str, failed: bool) -> None:
    assert answer_failed(command, answer) is failed


def test_verbs_and_command_validation() -> None:
    assert verb_of("add server be/x 1.2.3.4:80") == "add server"
    assert verb_of("show servers state be") == "show servers"
    assert verb_of("prompt") == "prompt"
    for bad in ("", "show info;show stat", "add map /m k v\nshutdown", "x" * 5000):
        with pytest.raises(ValueError):
            validate_command(bad)


# --------------------------------------------------------------------------- real HAProxy

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def haproxy(tmp_path: Path) -> Iterator[HAProxyProcess]:
    env = {
        "RUN_DIR": str(tmp_path),
        "FRONTEND_BIND": f"127.0.0.1:{free_port()}",
        "STATS_BIND": f"127.0.0.1:{free_port()}",
        "AGENT_ADDR": f"127.0.0.1:{free_port()}",  # nobody listens: requests go on without the agent
        "DNS_NAMESERVER": f"127.0.0.1:{free_port(kind=socket.SOCK_DGRAM)}",
    }
    with HAProxyProcess(env) as h:
        yield h


def port_of(bind: str) -> int:
    return int(bind.rsplit(":", 1)[1])


@pytest.fixture
def backend2() -> Iterator[Backend]:
    with Backend("127.0.0.2", free_port("127.0.0.2")) as b:
        yield b


@pytest.fixture
def backend3() -> Iterator[Backend]:
    """Not started: a task that is in DNS but does not listen yet."""
    b = Backend("127.0.0.3", free_port("127.0.0.3"))
    yield b
    b.stop()


def member(b: Backend) -> Member:
    return Member.parse(b.ip, b.port)


def cookie(m: Member) -> str:
    """A cookie value of the issued length (20): haproxy.cfg's table path looks up no other."""
    return hashlib.sha256(m.server_name.encode()).hexdigest()[:20]


def make_writer(h: HAProxyProcess, *, drain_timeout: float = 30, observer: CommandCounts | None = None,
                backend: str = BE) -> HAProxyWriter:
    api = RuntimeAPI(h.socket_path, observer=observer)
    return HAProxyWriter(api, Reconciler(backend, drain_timeout=drain_timeout),
                         cookie_map=str(Path(h.env["RUN_DIR"]) / "cookies.map"), cookie_value=cookie)


def now() -> float:
    return asyncio.get_running_loop().time()


async def step_until(w: HAProxyWriter, desired: set[Member], done: Callable[[StepReport], bool],
                     timeout: float = 8.0) -> tuple[StepReport, list[StepReport]]:
    """Step like the agent does (sooner when the report asks) until `done`; fail at the deadline."""
    deadline = now() + timeout
    reports: list[StepReport] = []
    while True:
        report = await w.step(frozenset(desired), now())
        reports.append(report)
        if done(report):
            return report, reports
        assert now() < deadline, f"not done after {timeout}s; last report: {report}"
        await asyncio.sleep(min(report.retry_after or 0.1, 0.1))


async def http_get(port: int, cookie_value: str | None = None) -> tuple[int, dict[str, str]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = "GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
        if cookie_value is not None:
            head += f"Cookie: SWARMID={cookie_value}\r\n"
        writer.write((head + "\r\n").encode())
        async with asyncio.timeout(10):
            data = await reader.read()
    finally:
        writer.close()
    lines = data.partition(b"\r\n\r\n")[0].decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers


async def stats_rows(h: HAProxyProcess) -> dict[str, dict[str, str]]:
    """The stats GUI's CSV export (what an operator looks at), rows of be_app by server name."""
    url = f"http://127.0.0.1:{port_of(h.env['STATS_BIND'])}/;csv"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    text = (await asyncio.to_thread(fetch)).lstrip("# ")
    return {row["svname"]: row for row in csv.DictReader(io.StringIO(text)) if row["pxname"] == BE}


async def servers(h: HAProxyProcess) -> dict[str, dict[str, int | str]]:
    rows = parse_servers_state(await RuntimeAPI(h.socket_path).command(f"show servers state {BE}"))
    return {r.name: {"admin": r.admin, "op": r.op_state, "addr": f"{r.addr}:{r.port}"} for r in rows
            if not r.name.startswith("dns")}


async def cookie_map(h: HAProxyProcess) -> dict[str, str]:
    path = Path(h.env["RUN_DIR"]) / "cookies.map"
    return {e.key: e.value for e in parse_map(await RuntimeAPI(h.socket_path).command(f"show map {path}"))}


async def test_client_commands_answers_and_errors(haproxy: HAProxyProcess) -> None:
    counts = CommandCounts()
    api = RuntimeAPI(haproxy.socket_path, observer=counts)
    assert int((await api.command("show info")).split("\nPid: ")[1].split()[0]) == haproxy.worker_pid()
    async with api.session() as s:
        assert (await s.command("add server be_app/10.0.0.1_80 10.0.0.1:80 check")).startswith("New server")
        with pytest.raises(RuntimeAPIError) as e:
            await s.command("enable server be_app/nosuch")
        assert e.value.command == "enable server be_app/nosuch" and "No such server" in e.value.answer
        assert await s.command("enable server be_app/10.0.0.1_80") == ""
        # 2.6 answers this one without the usual empty line: the session must stay in step anyway.
        with pytest.raises(RuntimeAPIError, match="maintenance"):
            await s.command("del server be_app/10.0.0.1_80")
        rows = {r.name: r for r in await s.servers_state(BE)}
        assert rows["10.0.0.1_80"].admin == AdminState(0) and rows["10.0.0.1_80"].port == 80
        assert not any(name.startswith("dns") for name in rows)  # the fallback has its own backend
        assert (await s.server_sessions(BE))["10.0.0.1_80"] == 0
        with pytest.raises(ValueError):
            await s.command("show info; show stat")
        assert await s.command("del server be_app/nosuch", check=False) == "No such server.\n"
    assert counts.sent["add server"] == 1 and counts.failed["enable server"] == 1
    assert counts.failed["del server"] == 2 and counts.failed["show info"] == 0


async def test_unavailable_socket_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeAPIUnavailable, match="connect failed"):
        await RuntimeAPI(str(tmp_path / "missing.sock")).command("show info")
    with pytest.raises(RuntimeAPIUnavailable, match="connect failed"):
        await RuntimeAPI(f"127.0.0.1:{free_port()}").command("show info")

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts and never answers, like a frozen HAProxy
        writer.close()

    server = await asyncio.start_unix_server(silent, str(tmp_path / "frozen.sock"))
    async with server:
        started = time.monotonic()
        with pytest.raises(RuntimeAPIUnavailable, match=r"within 0\.2s"):
            await RuntimeAPI(str(tmp_path / "frozen.sock"), timeout=0.2).command("show info")
        assert time.monotonic() - started < 2


async def test_new_member_gets_no_request_before_its_check_passes(
        haproxy: HAProxyProcess, backend2: Backend, backend3: Backend) -> None:
    w = make_writer(haproxy)
    m2, m3 = member(backend2), member(backend3)  # m3: in DNS, app not listening yet
    first = await w.step(frozenset({m2, m3}), now())
    assert first.done(ActionKind.ADD) == {m2.server_name, m3.server_name}
    assert not first.up and first.pending == {m2, m3}
    state = await servers(haproxy)
    assert state[m2.server_name]["addr"] == backend2.address and state[m3.server_name]["addr"] == backend3.address
    gui = await stats_rows(haproxy)
    assert {m2.server_name, m3.server_name} <= set(gui)

    started = now()
    report, _ = await step_until(w, {m2, m3}, lambda r: m2 in r.up)
    assert now() - started < 2 * CheckSettings().inter  # enabled within a check interval or two
    assert report.pending == {m3}
    assert (await servers(haproxy))[m3.server_name]["admin"] == AdminState.FMAINT
    assert await cookie_map(haproxy) == {cookie(m2): m2.server_name}

    frontend = port_of(haproxy.env["FRONTEND_BIND"])
    for value in (None, cookie(m3), "unknown"):
        status, headers = await http_get(frontend, value)
        assert (status, headers["x-served-by"]) == (200, backend2.address)
    for _ in range(3):  # a few more refreshes: still not enabled, still no request
        report = await w.step(frozenset({m2, m3}), now())
        assert m3 not in report.up
    assert (await stats_rows(haproxy))[m3.server_name]["stot"] == "0"

    backend3.start()  # the app starts listening
    started = now()
    report, _ = await step_until(w, {m2, m3}, lambda r: m3 in r.up)
    assert now() - started < 2 * CheckSettings().inter
    assert report.up == {m2, m3}
    assert await cookie_map(haproxy) == {cookie(m2): m2.server_name, cookie(m3): m3.server_name}
    status, headers = await http_get(frontend, cookie(m3))
    assert (status, headers["x-served-by"]) == (200, backend3.address)


@contextlib.asynccontextmanager
async def silent_backend(ip: str) -> AsyncIterator[tuple[Member, list[asyncio.StreamWriter]]]:
    """A task that accepts connections and never answers: a request to it stays in flight."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(OSError):
            await reader.read()
        writer.close()

    port = free_port(ip)
    server = await asyncio.start_server(hold, ip, port)
    try:
        yield Member.parse(ip, port), held
    finally:
        server.close()
        for writer in held:
            writer.close()


async def test_removed_member_drains_then_is_deleted(haproxy: HAProxyProcess, backend2: Backend) -> None:
    drain_timeout = 2.0
    w = make_writer(haproxy, drain_timeout=drain_timeout)
    m2 = member(backend2)
    async with silent_backend("127.0.0.4") as (slow, _):
        await step_until(w, {m2, slow}, lambda r: r.up == {m2, slow})
        # A request in flight on the slow member (routed by its cookie), never answered.
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(haproxy.env["FRONTEND_BIND"]))
        writer.write(f"GET / HTTP/1.1\r\nHost: t\r\nCookie: SWARMID={cookie(slow)}\r\n\r\n".encode())
        async def reached() -> bool:
            return (await stats_rows(haproxy))[slow.server_name]["scur"] == "1"
        await poll(reached, "the request reaches the slow member", 5, 0.05)

        # m2 has no session: drained, then deleted on the next refresh.
        report = await w.step(frozenset({slow}), now())
        assert report.done(ActionKind.DRAIN) == {m2.server_name} and report.up == {slow}
        assert (await servers(haproxy))[m2.server_name]["admin"] == AdminState.FDRAIN
        assert await cookie_map(haproxy) == {cookie(slow): slow.server_name}
        report, _ = await step_until(w, {slow}, lambda r: m2.server_name in r.done(ActionKind.DELETE))
        assert m2.server_name not in await servers(haproxy)

        # slow keeps its session: it drains until the timeout, then the session is cut, then it goes.
        started = now()
        report = await w.step(frozenset(), now())
        assert report.done(ActionKind.DRAIN) == {slow.server_name} and not report.up
        report, reports = await step_until(w, set(), lambda r: slow.server_name in r.done(ActionKind.CUT))
        assert now() - started >= drain_timeout and len(reports) > 1
        assert "sessions cut" in " ".join(report.events) and not report.errors
        assert all(slow.server_name in r.draining for r in reports)
        report, _ = await step_until(w, set(), lambda r: slow.server_name in r.done(ActionKind.DELETE), timeout=3)
        assert not report.draining and not report.errors
        assert await servers(haproxy) == {} and await cookie_map(haproxy) == {}
        async with asyncio.timeout(5):
            answer = await reader.read(4096)  # the client whose session was cut learns it at once
        if haproxy_version() >= (3, 0):
            assert answer == b""  # 3.x aborts the cut stream: the connection closes without an answer
        else:
            assert answer.startswith(b"HTTP/1.1 502 ")  # 2.6 answers the cut stream with a 502
        writer.close()


async def test_reload_is_repaired_in_one_step(haproxy: HAProxyProcess, backend2: Backend) -> None:
    w = make_writer(haproxy)
    async with silent_backend("127.0.0.5") as (m5, _):
        desired = {member(backend2), m5}
        await step_until(w, desired, lambda r: r.up == desired)
        old_pid = haproxy.worker_pid()
        assert haproxy.reload() != old_pid
        assert await servers(haproxy) == {}  # dynamic servers are gone after a reload

        report = await w.step(frozenset(desired), now())
        assert report.reloaded and report.done(ActionKind.ADD) == {m.server_name for m in desired}
        assert "repaired after reload: 2 servers re-added" in report.events
        assert set(await servers(haproxy)) == {m.server_name for m in desired}
        await step_until(w, desired, lambda r: r.up == desired)
        assert await cookie_map(haproxy) == {cookie(m): m.server_name for m in desired}


async def test_backend_killed_while_up_is_reported_down(haproxy: HAProxyProcess, backend2: Backend) -> None:
    w = make_writer(haproxy)
    with Backend("127.0.0.6", free_port("127.0.0.6")) as backend6:
        m2, m6 = member(backend2), member(backend6)
        await step_until(w, {m2, m6}, lambda r: r.up == {m2, m6})
        backend6.stop()
        started = now()
        report, _ = await step_until(w, {m2, m6}, lambda r: m6 in r.down)
        assert report.up == {m2} and w.up == {m2}
        checks = CheckSettings()
        assert now() - started < checks.inter + checks.fall * checks.fastinter + 1.0
        assert await cookie_map(haproxy) == {cookie(m2): m2.server_name}
        status, headers = await http_get(port_of(haproxy.env["FRONTEND_BIND"]), cookie(m6))
        assert (status, headers["x-served-by"]) == (200, backend2.address)


async def test_a_socket_that_never_answers_is_closed_by_us(tmp_path: Path) -> None:
    """A session whose `prompt` times out closes its connection at once (not at garbage collection)."""
    closed = asyncio.Event()

    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):  # reads what comes, answers nothing, until the client closes
            pass
        closed.set()
        writer.close()

    path = str(tmp_path / "mute.sock")
    server = await asyncio.start_unix_server(mute, path)
    try:
        session = RuntimeAPI(path, timeout=0.2).session()  # still referenced: no help from the GC
        with pytest.raises(RuntimeAPIUnavailable):
            async with session:
                pass
        async with asyncio.timeout(2):
            await closed.wait()
    finally:
        server.close()


async def test_step_never_raises_when_haproxy_is_gone(haproxy: HAProxyProcess, backend2: Backend,
                                                      tmp_path: Path) -> None:
    m2 = member(backend2)
    w = make_writer(haproxy)
    await step_until(w, {m2}, lambda r: r.up == {m2})
    haproxy.stop()
    report = await w.step(frozenset({m2}), now())
    assert not report.reachable and any("socket unavailable" in e for e in report.errors)
    assert report.up == {m2}  # the last health view, for members still wanted
    assert (await w.step(frozenset(), now())).up == frozenset()

    nowhere = HAProxyWriter(RuntimeAPI(str(tmp_path / "none.sock")), Reconciler(BE, drain_timeout=1))
    report = await nowhere.step(frozenset({m2}), now())
    assert not report.reachable and not report.up and "socket unavailable" in str(report)


async def test_unknown_backend_is_reported_not_raised(haproxy: HAProxyProcess) -> None:
    w = make_writer(haproxy, backend="be_missing")
    report = await w.step(frozenset({Member.parse("10.0.0.1", 80)}), now())
    assert report.reachable and not report.results
    assert any("cannot read HAProxy's state" in e for e in report.errors)


async def test_unknown_cookie_map_does_not_stop_the_servers(haproxy: HAProxyProcess, backend2: Backend) -> None:
    m2 = member(backend2)
    w = HAProxyWriter(RuntimeAPI(haproxy.socket_path), Reconciler(BE, drain_timeout=30),
                      cookie_map="/nonexistent/cookies.map", cookie_value=cookie)
    report, _ = await step_until(w, {m2}, lambda r: r.up == {m2})
    assert any("cookie map left alone" in e and "Unknown map" in e for e in report.errors)
    assert await cookie_map(haproxy) == {}


async def test_ipv6_member(haproxy: HAProxyProcess) -> None:
    w = make_writer(haproxy)
    # HAProxy takes an IPv6 member's server as named, at its address, whether or not it answers: a
    # unique-local address nothing listens on stays pending (in maintenance, its checks failing).
    far = Member.parse("fd00::5", 8080)
    report = await w.step(frozenset({far}), now())
    assert report.done(ActionKind.ADD) == {"fd00--5_8080"} and report.pending == {far}
    assert (await servers(haproxy))["fd00--5_8080"]["addr"] == "fd00::5:8080"
    # One that answers on the IPv6 loopback (a listener that accepts is enough for TCP checks) goes UP.
    async with silent_backend("::1") as (m, _):
        await step_until(w, {m}, lambda r: r.up == {m} and far.server_name not in r.draining)
        assert await servers(haproxy) == {m.server_name: {"admin": AdminState(0), "op": OpState.RUNNING,
                                                          "addr": f"::1:{m.port}"}}
