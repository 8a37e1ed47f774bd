"""End-to-end benchmark (not a test): the shipped haproxy.cfg + agent against what users build by hand.

Same run, same backends, same HAProxy thread count, wrk on loopback. The native configurations
are small configs generated here (they are not the product), with the shipped config's defaults:

  (a)   native `balance hash req.cook(SWARMID)` + `hash-type consistent`, static servers, each
        request with one of 1,000 cookies
  (n1f) native cookie stickiness as users build it for Swarm: `server-template` + `resolvers`,
        `balance roundrobin`, `cookie SWARMID insert indirect nocache dynamic`; no cookie (first
        visits: HAProxy balances and inserts the cookie)
  (n1r) the same, each request with a valid cookie HAProxy issued (returning visitors)
  (n2h) native `balance hash req.hdr(X-User)` + `hash-type consistent` (server-template +
        resolvers), each request with one of 1,000 X-User values
  (n2s) native `balance source` (server-template + resolvers)
  (b)   the product (`haproxy-swarm run`, the shipped haproxy.cfg, through `Stack`), no cookie:
        a first visit, placed by HAProxy by load (BALANCE), which sets the sticky cookie. Against (n1f)
  (c)   the same stack, each request with a valid sticky cookie (the cookie map). Against (n1r)
  (h)   a stack with STICKY_KEY=header:X-User (--header-key), one of 1,000 X-User values. Against (n2h)
  (d)   a stack with STICKY_KEY=src. Against (n2s)

Each case is measured twice per run: at saturation (wrk, --connections, as fast as it goes:
req/s, p50/p99) and at a fixed rate below saturation (wrk with a Lua `delay`: --paced-connections
connections, each waiting --paced-delay ms between a response and its next request), where
HAProxy's own CPU per request (the worker's threads, /proc/<pid>/task/*/schedstat, ns) is the
steady figure. Cases are interleaved in every run; the figures are medians over the runs, ratios
and differences are medians of the per-run ones (a case against its native counterpart of the
same run). Every sample checks that no request failed.

Attribution (--drop RULE, repeatable): for each rule, a second copy of each product stack runs a
bench-only copy of haproxy.cfg without that rule (or with the environment variable that turns it
off), interleaved with the shipped one; the report gives what the rule costs (HAProxy µs/request,
shipped minus without). Never a product figure: the copies change behaviour.

    .venv/bin/python bench/e2e.py                                  # all cases, 5 runs x 5 s
    .venv/bin/python bench/e2e.py --cases n1f,n1r,b,c              # a subset
    .venv/bin/python bench/e2e.py --cases b,c --drop count --drop setcookie --drop log
    .venv/bin/python bench/e2e.py --threads 2                      # HAPROXY_NBTHREAD for every HAProxy
    .venv/bin/python bench/e2e.py --env DECIDE=agent               # the SPOE path
    HAPROXY_BIN=/var/cache/haproxy-swarm/haproxy-3.4/sbin/haproxy .venv/bin/python bench/e2e.py

Targets (issue 19): (b), (c), (h), (d) each >= 1.0 x its native counterpart, HAProxy CPU within
+1 µs/request of it, p99 added <= 0.2 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spoa.haproxy.process import admin_command, haproxy_binary, shipped_config, show_info, stop_process
from spoa.local.dnsmasq import Dnsmasq
from spoa.local.ports import free_port
from spoa.local.stack import SERVICE, Stack

COOKIE = "SWARMID"
USER_HEADER = "X-User"
SECRET = "bench-secret"


@dataclass(frozen=True)
class Kind:
    label: str
    native: str | None = None  # the native counterpart's case


KINDS = {
    "a": Kind("(a) native balance hash cookie"),
    "n1f": Kind("(n1f) native cookie insert, first visits"),
    "n1r": Kind("(n1r) native cookie insert, returning"),
    "n2h": Kind("(n2h) native balance hash X-User"),
    "n2s": Kind("(n2s) native balance source"),
    "b": Kind("(b) first visits", "n1f"),
    "c": Kind("(c) returning visitors", "n1r"),
    "h": Kind("(h) header key", "n2h"),
    "d": Kind("(d) STICKY_KEY=src", "n2s"),
}
PRODUCT = ("b", "c", "h", "d")


@dataclass(frozen=True)
class Rule:
    """A rule of the per-request path, taken out of a bench-only copy of haproxy.cfg (`lines`:
    regular expressions of the lines to drop; `off`: of the lines whose condition becomes `if FALSE`,
    so the maps they name stay loaded and the agent can publish; each must match) or turned off by
    `env`."""
    what: str
    lines: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    off: tuple[str, ...] = ()


RULES = {
    "count": Rule("the counting stick table (COUNT_DECISIONS=0)", env={"COUNT_DECISIONS": "0"}),
    "chain": Rule("the key chain's set-vars and use-server (map look-ups included; `if FALSE`)",
                  off=(r"^\s*http-request set-var\(txn\.sticky\.", r"^\s*use-server ")),
    "setcookie": Rule("Set-Cookie building (server -> cookie map, the header; `if FALSE`)",
                      off=(r"^\s*http-response set-var\(txn\.sticky\.cookie\)",
                           r"^\s*http-response add-header Set-Cookie")),
    "cachecontrol": Rule("Cache-Control: private", (r"^\s*http-response add-header Cache-Control",)),
    "xrealip": Rule("X-Real-IP", (r"^\s*http-request set-header X-Real-IP",)),
    "forwardfor": Rule("option forwardfor", (r"^\s*option forwardfor",)),
    "client": Rule("txn.client, X-Real-IP and option forwardfor",
                   (r"^\s*http-request set-var\(txn\.client\) src$", r"^\s*http-request set-header X-Real-IP",
                    r"^\s*option forwardfor")),
    "logformat": Rule("the access log-format (option httplog's format instead)", (r"^\s*log-format ",)),
    "log": Rule("logging altogether (log-format, option httplog, log global)",
                (r"^\s*log-format ", r"^\s*option httplog", r"^\s*log global")),
    "quietlog": Rule("`option dontlog-normal` below info (the access lines no level emits); without it: "
                     "today's config before issue 19", (r"^\s*option dontlog-normal",)),
    "spoe": Rule("the SPOE filter and its send-spoe-group (kept for unknown cookies)",
                 (r"^\s*filter spoe engine sticky", r"^\s*http-request send-spoe-group sticky")),
    "fallback": Rule("fe_main's cold-start fallback tests (do-resolve, use_backend be_app_dns)",
                     (r"^\s*http-request do-resolve\(txn\.fallback_ip,.* if \{ nbsrv\(be_app\) eq 0 \}",
                      r"^\s*use_backend be_app_dns ")),
}


def label(key: str) -> str:
    base, _, rule = key.partition("/")
    return KINDS[base].label + (f" without {rule}" if rule else "")

# ------------------------------------------------------------------------------------- processes


def _wait_listening(host: str, port: int, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s")


class HAProxyConfig:
    """A HAProxy started from a generated config (`haproxy -W -db`), stopped with its process group."""

    def __init__(self, name: str, config: str, workdir: str) -> None:
        self.name = name
        self.path = os.path.join(workdir, f"{name}.cfg")
        self.socket = os.path.join(workdir, f"{name}.sock")
        Path(self.path).write_text(config.replace("@SOCKET@", self.socket))
        self.log = os.path.join(workdir, f"{name}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> HAProxyConfig:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([haproxy_binary(), "-W", "-db", "-f", self.path],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy {self.name} exited: {Path(self.log).read_text()[-1500:]}")
            with contextlib.suppress(OSError):
                show_info(self.socket)
                return self
            time.sleep(0.02)
        raise TimeoutError(f"haproxy {self.name} did not answer on {self.socket}")

    def worker_pid(self) -> int:
        return int(show_info(self.socket)["Pid"])

    def wait_servers_up(self, count: int, timeout: float = 30.0) -> None:
        """Until `count` servers of be_app are UP (server-template: filled from DNS)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(up_servers(self.socket)) >= count:
                return
            time.sleep(0.1)
        raise TimeoutError(f"haproxy {self.name}: fewer than {count} servers UP after {timeout}s")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)


def up_servers(socket: str) -> list[str]:
    lines = admin_command(socket, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return [r["svname"] for r in rows if r.get("pxname") == "be_app"
            and r.get("svname") not in ("FRONTEND", "BACKEND") and r.get("status") == "UP"]


def backends_config(ips: Sequence[str], port: int) -> str:
    """One single-threaded HAProxy answering every request itself on each ip:port."""
    binds = "\n".join(f"    bind {ip}:{port}" for ip in ips)
    answer = 'lf-string "%[dst]:%[dst_port]\\n" hdr X-Served-By "%[dst]:%[dst_port]"'
    return f"""global
    nbthread 1
    stats socket @SOCKET@ mode 600 level admin
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
frontend tasks
{binds}
    http-request return status 200 content-type text/plain {answer}
"""


def native_config(port: int, backend: str, threads: int | None, resolvers: str = "") -> str:
    """A hand-built HAProxy config with the shipped config's defaults; `backend`: be_app's lines."""
    nbthread = f"    nbthread {threads}\n" if threads else ""
    return f"""global
{nbthread}    log stderr format short local0 notice
    stats socket @SOCKET@ mode 600 level admin
defaults
    mode http
    log global
    option httplog
    option dontlognull
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s
    timeout http-request 10s
    timeout queue 5s
    timeout check 2s
    retries 3
    option redispatch 1
{resolvers}frontend fe_main
    bind 127.0.0.1:{port}
    default_backend be_app
backend be_app
{backend}"""


def baseline_config(port: int, servers: Sequence[str], threads: int | None) -> str:
    """(a): HAProxy's own consistent hashing on the sticky cookie, static servers."""
    lines = "\n".join(f"    server s{i + 1} {addr} check inter 2s" for i, addr in enumerate(servers))
    return native_config(port, f"    balance hash req.cook({COOKIE})\n    hash-type consistent\n{lines}\n", threads)


def template_config(port: int, balance: str, members: int, backend_port: int, dns: str,
                    threads: int | None) -> str:
    """(n1), (n2): what users build by hand for a Swarm service: server-template fed by resolvers."""
    resolvers = f"""resolvers swarmdns
    nameserver ns1 {dns}
    accepted_payload_size 8192
    resolve_retries 3
    timeout resolve 1s
    timeout retry 1s
    hold valid 10s
"""
    backend = (f"{balance}\n    server-template s 1-{members} {SERVICE}:{backend_port} resolvers swarmdns "
               "init-addr none resolve-prefer ipv4 check inter 2s\n")
    return native_config(port, backend, threads, resolvers)


N1 = f"""    balance roundrobin
    cookie {COOKIE} insert indirect nocache dynamic
    dynamic-cookie-key {SECRET}"""
N2H = f"""    balance hash req.hdr({USER_HEADER})
    hash-type consistent"""
N2S = "    balance source"


def native_cookies(port: int, members: int, timeout: float = 20.0) -> list[str]:
    """The cookie values a native `cookie ... insert` HAProxy issues, one per server."""
    found: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(found) < members:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/")
        resp = conn.getresponse()
        resp.read()
        conn.close()
        m = re.match(rf"{COOKIE}=([^;]+)", resp.getheader("Set-Cookie") or "")
        if resp.status == 200 and m:
            found.add(m.group(1))
    if len(found) < members:
        raise RuntimeError(f"the native cookie insert issued {len(found)} cookies, not {members}")
    return sorted(found)


class FastTask:
    """Stands in for `spoa.local.backends.Backend` in a `Stack`: the shared HAProxy answers for it."""

    def __init__(self, ip: str, port: int, name: str) -> None:
        self.ip, self.port, self.name = ip, port, name

    @property
    def address(self) -> str:
        return f"{self.ip}:{self.port}"

    def start(self) -> FastTask:
        return self

    def stop(self) -> None:
        pass


def cpu_seconds(pid: int) -> float:
    """CPU-seconds of a process (utime + stime, 10 ms ticks), its finished threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_seconds(pid: int) -> float:
    """CPU-seconds of a process's live threads, in ns (/proc/<pid>/task/*/schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    return total / 1e9


def metric(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text: str = resp.read().decode()
    total = 0.0
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        metric_name, _, label_text = head.partition("{")
        if metric_name == name and all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total


# ------------------------------------------------------------------------------------------- wrk

WRK_SCRIPT = """
-- Cycles through pre-formatted requests (one per header value; a bare GET when there are none),
-- waits DELAY ms between a response and the next request on a connection when paced, and prints
-- wrk's own figures in microseconds at the end.
local headers = {%s}
local reqs = {}
local i = 0
init = function(args)
  if #headers == 0 then
    reqs[1] = wrk.format("GET", "/")
  else
    for n, h in ipairs(headers) do
      reqs[n] = wrk.format("GET", "/", {[h[1]] = h[2]})
    end
  end
end
request = function()
  i = i %% #reqs + 1
  return reqs[i]
end
%s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT requests=%%d duration_us=%%d p50=%%d p90=%%d p99=%%d max=%%d "
    .. "connect=%%d read=%%d write=%%d status=%%d timeout=%%d\\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds


def run_wrk(port: int, headers: Sequence[tuple[str, str]], duration: float, connections: int, threads: int,
            workdir: str, delay_ms: int = 0) -> WrkResult:
    script = os.path.join(workdir, f"wrk-{abs(hash(tuple(headers)))}-{delay_ms}.lua")
    if not os.path.exists(script):
        pace = f"delay = function() return {delay_ms} end" if delay_ms else ""
        Path(script).write_text(WRK_SCRIPT % (", ".join(f'{{"{n}", "{v}"}}' for n, v in headers), pace))
    seconds = max(1, round(duration))  # wrk takes whole seconds only
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "-s", script,
           f"http://127.0.0.1:{port}/"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30, check=False)
    m = re.search(r"^RESULT (.*)$", res.stdout, re.M)
    if res.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed ({res.returncode}): {res.stdout}\n{res.stderr}")
    v = {k: int(x) for k, x in (kv.split("=") for kv in m.group(1).split())}
    errors = v["connect"] + v["read"] + v["write"] + v["status"] + v["timeout"]
    return WrkResult(v["requests"], v["duration_us"] / 1e6, v["p50"] / 1e3, v["p99"] / 1e3, errors)


# ----------------------------------------------------------------------------------------- cases


@dataclass
class Sample:
    wrk: WrkResult  # at saturation
    paced: WrkResult  # at the fixed rate
    agent_us: float | None  # agent CPU per request (fixed rate)
    haproxy_us: float  # HAProxy worker CPU per request at the fixed rate (schedstat)
    haproxy_sat_us: float  # the same at saturation
    decided: float | None  # agent decisions per request (1 = every request asked the agent)
    new_conns: float  # server connections opened per request (0 when HAProxy reuses them)
    others: float  # CPUs busy with processes outside this case (other work on the machine), 0..nproc
    total_us: float  # CPU per request of everything in the case at saturation: wrk, HAProxy, backends, agent


@dataclass
class Case:
    key: str
    port: int
    haproxy_pid: int
    socket: str
    headers: list[tuple[str, str]]
    agent: int | None = None
    metrics_port: int | None = None
    backends_pid: int = 0
    loop: str = "-"  # the agent's event loop (uvloop or asyncio), from its build_info metric
    samples: list[Sample] = field(default_factory=list)


def measure(case: Case, args: argparse.Namespace, workdir: str) -> Sample:
    decisions_before = (metric(case.metrics_port, "haproxy_swarm_decisions_total")
                        if case.metrics_port is not None else 0.0)
    haproxy_before = run_seconds(case.haproxy_pid)
    connects_before = server_connects(case.socket)
    ours_before = (cpu_seconds(case.haproxy_pid) + cpu_seconds(case.backends_pid) + children_cpu()
                   + (cpu_seconds(case.agent) if case.agent is not None else 0.0))
    busy_before = busy_cpu()
    result = run_wrk(case.port, case.headers, args.duration, args.connections, args.wrk_threads, workdir)
    haproxy_sat_us = (run_seconds(case.haproxy_pid) - haproxy_before) / result.requests * 1e6
    new_conns = (server_connects(case.socket) - connects_before) / result.requests
    busy = busy_cpu() - busy_before
    ours = (cpu_seconds(case.haproxy_pid) + cpu_seconds(case.backends_pid) + children_cpu()
            + (cpu_seconds(case.agent) if case.agent is not None else 0.0)) - ours_before
    total_us = ours / result.requests * 1e6
    decided = None
    if case.metrics_port is not None:
        decided = (metric(case.metrics_port, "haproxy_swarm_decisions_total") - decisions_before) / result.requests
    # The fixed rate: HAProxy's (and the agent's) CPU per request, p50/p99 below saturation.
    haproxy_before = run_seconds(case.haproxy_pid)
    agent_before = run_seconds(case.agent) if case.agent is not None else 0.0
    busy_paced = busy_cpu()
    ours_paced = cpu_seconds(case.haproxy_pid) + cpu_seconds(case.backends_pid) + children_cpu() + (
        cpu_seconds(case.agent) if case.agent is not None else 0.0)
    paced = run_wrk(case.port, case.headers, args.duration, args.paced_connections, 1, workdir, args.paced_delay)
    haproxy_us = (run_seconds(case.haproxy_pid) - haproxy_before) / paced.requests * 1e6
    agent_us = ((run_seconds(case.agent) - agent_before) / paced.requests * 1e6
                if case.agent is not None else None)
    busy += busy_cpu() - busy_paced
    ours += (cpu_seconds(case.haproxy_pid) + cpu_seconds(case.backends_pid) + children_cpu() + (
        cpu_seconds(case.agent) if case.agent is not None else 0.0)) - ours_paced
    others = max(0.0, busy - ours) / (result.seconds + paced.seconds)
    if result.errors or paced.errors:
        raise RuntimeError(f"case {case.key}: {result.errors + paced.errors} failed requests")
    return Sample(result, paced, agent_us, haproxy_us, haproxy_sat_us, decided, new_conns, others, total_us)


def busy_cpu() -> float:
    """CPU-seconds the whole machine spent busy so far (/proc/stat, all CPUs)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """CPU-seconds of this process's finished children (wrk)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def server_connects(socket: str) -> int:
    """Connections HAProxy opened to the servers of be_app so far (`show stat` column `connect`)."""
    lines = admin_command(socket, "show stat").splitlines()
    header = lines[0].lstrip("# ").split(",")
    total = 0
    for line in lines[1:]:
        row = dict(zip(header, line.split(","), strict=False))
        if row.get("pxname") == "be_app" and row.get("svname") not in ("FRONTEND", "BACKEND"):
            total += int(row.get("connect") or 0)
    return total


def variant_config(rule: str, workdir: str) -> str:
    """A bench-only copy of the shipped haproxy.cfg without `rule`'s lines, beside links to the
    files the shipped one finds beside itself (spoe.conf, ondemand.conf, maps/)."""
    shipped = Path(shipped_config())
    folder = Path(workdir) / f"config-{rule}"
    folder.mkdir()
    for name in ("spoe.conf", "ondemand.conf", "maps"):
        (folder / name).symlink_to(shipped.parent / name)
    lines = shipped.read_text().splitlines()
    for pattern in RULES[rule].lines:
        kept = [line for line in lines if not re.search(pattern, line)]
        if len(kept) == len(lines):
            raise RuntimeError(f"--drop {rule}: no line of {shipped} matches {pattern!r}")
        lines = kept
    for pattern in RULES[rule].off:
        changed = [re.sub(r" if .*$", " if FALSE", line) if re.search(pattern, line) else line for line in lines]
        if changed == lines:
            raise RuntimeError(f"--drop {rule}: no line of {shipped} matches {pattern!r} with a condition")
        lines = changed
    (folder / "haproxy.cfg").write_text("\n".join(lines) + "\n")
    return str(folder / "haproxy.cfg")


def headers_for(key: str, cookies: Sequence[str] = ()) -> list[tuple[str, str]]:
    if key in ("a", "c", "n1r"):
        return [("Cookie", f"{COOKIE}={c}") for c in cookies]
    if key in ("h", "n2h"):
        return [(USER_HEADER, f"user-{i * 2654435761 % (1 << 32):x}") for i in range(1000)]
    return []


@contextlib.contextmanager
def environment(args: argparse.Namespace) -> Iterator[dict[str, Case]]:
    """Backends, dnsmasq, the native configs and the stacks the cases need; all stopped on the way out."""
    workdir = tempfile.mkdtemp(prefix="haproxy-swarm-e2e-")
    ips = [f"127.0.0.{i + 2}" for i in range(args.members)]
    backend_port = free_port("127.0.0.2")
    servers = [f"{ip}:{backend_port}" for ip in ips]
    started: list[HAProxyConfig | Stack | Dnsmasq] = []
    extra: dict[str, str] = {}
    if args.threads:
        extra["HAPROXY_NBTHREAD"] = str(args.threads)
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--env: expected NAME=VALUE, got {item!r}")
        extra[name] = value
    try:
        backends = HAProxyConfig("backends", backends_config(ips, backend_port), workdir)
        started.append(backends.start())
        _wait_listening(ips[0], backend_port)
        dns = Dnsmasq()
        started.append(dns.start())
        dns.set_hosts({SERVICE: ips})
        cases: dict[str, Case] = {}
        wanted = set(args.cases)
        if "a" in wanted:
            port = free_port()
            baseline = HAProxyConfig("baseline", baseline_config(port, servers, args.threads), workdir)
            started.append(baseline.start())
            cookies = [f"{i * 2654435761 % (1 << 40):020x}" for i in range(1000)]  # 1,000 session cookies
            cases["a"] = Case("a", port, baseline.worker_pid(), baseline.socket, headers_for("a", cookies))
        for keys, balance in (("n1f,n1r", N1), ("n2h", N2H), ("n2s", N2S)):
            mine = wanted & set(keys.split(","))
            if not mine:
                continue
            port = free_port()
            native = HAProxyConfig(keys.split(",")[0], template_config(
                port, balance, args.members, backend_port, str(dns.address), args.threads), workdir)
            started.append(native.start())
            native.wait_servers_up(args.members)
            for key in mine:
                cookies = native_cookies(port, args.members) if key == "n1r" else []
                cases[key] = Case(key, port, native.worker_pid(), native.socket, headers_for(key, cookies))
        groups: list[tuple[str, dict[str, str]]] = [
            ("bc", {}), ("h", {"STICKY_KEY": args.header_key}), ("d", {"STICKY_KEY": "src"})]
        shipped_cookies: list[str] = []
        for rule in ["", *args.drop]:
            env_rule: dict[str, str] = {}
            if rule:
                env_rule = dict(RULES[rule].env)
                if RULES[rule].lines or RULES[rule].off:
                    env_rule["HAPROXY_CONFIG"] = variant_config(rule, workdir)
            for keys, env in groups:
                if not wanted & set(keys):
                    continue
                tasks = [FastTask(ip, backend_port, f"task-{i + 1}") for i, ip in enumerate(ips)]
                stack = Stack(dns=dns, tasks=tasks, refresh=2.0,  # type: ignore[arg-type]
                              env={"COOKIE_SECRET": SECRET, "LOG_LEVEL": "warning", **extra, **env, **env_rule})
                started.append(stack)
                stack.start(range(len(ips)))
                pid = int(stack.haproxy_info()["Pid"])
                agent = stack.agent_pid()
                if agent is None:
                    raise RuntimeError("no agent process under `haproxy-swarm run`")
                for base in wanted & set(keys):
                    key = f"{base}/{rule}" if rule else base
                    if base == "c" and not rule:
                        shipped_cookies = live_cookies(stack)
                    # A variant's cookies are the shipped stack's (same secret, same members): its own
                    # cookie map may be unused (`--drop chain`), so HAProxy does not load it.
                    cookies = shipped_cookies if base == "c" else []
                    cases[key] = Case(key, stack.traffic_port, pid, stack.socket, headers_for(base, cookies), agent,
                                      stack.metrics_port, loop=agent_loop(stack.metrics_port))
        order = list(KINDS)
        cases = {k: cases[k] for k in sorted(cases, key=lambda k: (order.index(k.split("/")[0]), k))}
        for case in cases.values():
            case.backends_pid = backends.worker_pid()
        yield cases
    finally:
        for thing in reversed(started):
            with contextlib.suppress(Exception):
                thing.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def agent_loop(port: int) -> str:
    """The event loop `haproxy-swarm agent` runs on, as its build_info metric reports it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text: str = resp.read().decode()
    found = re.search(r'^haproxy_swarm_build_info\{[^}]*loop="([^"]+)"', text, re.M)
    return found.group(1) if found else "?"


def live_cookies(stack: Stack) -> list[str]:
    """The sticky cookie values HAProxy's cookie map holds (one per member that is UP)."""
    path = os.path.join(stack.run_dir, "cookies.map")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = admin_command(stack.socket, f"show map {path}")
        values = [line.split()[1] for line in text.splitlines() if len(line.split()) == 3]
        if len(values) == len(stack.members):
            return values
        time.sleep(0.1)
    raise RuntimeError(f"cookie map never held {len(stack.members)} entries ({stack.extra_env}): {text[:300]}")


# ---------------------------------------------------------------------------------------- report


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    version = subprocess.run([haproxy_binary(), "-v"], capture_output=True, text=True,
                             check=False).stdout.split("\n")[0]
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return (f"{os.cpu_count()} CPUs ({model}), Python {sys.version.split()[0]}, {version.split(' - ')[0]}, "
            f"{(wrk.stdout + wrk.stderr).split(' Copyright')[0].strip()}, load average "
            f"{Path('/proc/loadavg').read_text().split()[0]}")


def med(values: Iterable[float | None]) -> float:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else float("nan")


def paired(case: Case, other: Case | None, f: Callable[[Sample, Sample], float]) -> float:
    """The median over the runs of f(this case's sample, the other's sample of the same run)."""
    if other is None:
        return float("nan")
    return med(f(s, o) for s, o in zip(case.samples, other.samples, strict=True))


def fmt(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)


def report(cases: Mapping[str, Case], args: argparse.Namespace) -> None:
    base = cases.get("a")
    print()
    print(f"medians of {args.runs} runs x {args.duration:g} s per measurement; saturation: {args.connections} "
          f"connections, wrk -t{args.wrk_threads}; fixed rate: {args.paced_connections} connections x "
          f"{args.paced_delay} ms between requests; {args.members} backends. x native / x (a), Δ: medians "
          "of the per-run ratios and differences against the case's native counterpart of the same run")
    print()
    print("Saturation:")
    print("| case | req/s | x native | x (a) | p50 ms | p99 ms | p99 added ms | HAProxy µs/req | all µs/req "
          "| decisions counted | server conns/1k req | other load, CPUs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, case in cases.items():
        native = cases.get(KINDS[key.split("/")[0]].native or "")
        decided = med(s.decided for s in case.samples)
        print(f"| {label(key)} | {med(s.wrk.rps for s in case.samples):,.0f} | "
              f"{fmt(paired(case, native, lambda s, o: s.wrk.rps / o.wrk.rps), '.2f')} | "
              f"{fmt(paired(case, base if key != 'a' else None, lambda s, o: s.wrk.rps / o.wrk.rps), '.2f')} | "
              f"{med(s.wrk.p50_ms for s in case.samples):.2f} | {med(s.wrk.p99_ms for s in case.samples):.2f} | "
              f"{fmt(paired(case, native, lambda s, o: s.wrk.p99_ms - o.wrk.p99_ms), '+.2f')} | "
              f"{med(s.haproxy_sat_us for s in case.samples):.1f} | {med(s.total_us for s in case.samples):.1f} | "
              f"{fmt(decided, '.0%')} | {med(s.new_conns for s in case.samples) * 1000:.1f} | "
              f"{med(s.others for s in case.samples):.2f} |")
    print()
    print("Fixed rate (HAProxy's CPU per request from its threads' schedstat):")
    print("| case | req/s | HAProxy µs/req | Δ native µs/req | agent µs/req | p50 ms | p99 ms | p99 added ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for key, case in cases.items():
        native = cases.get(KINDS[key.split("/")[0]].native or "")
        print(f"| {label(key)} | {med(s.paced.rps for s in case.samples):,.0f} | "
              f"{med(s.haproxy_us for s in case.samples):.2f} | "
              f"{fmt(paired(case, native, lambda s, o: s.haproxy_us - o.haproxy_us), '+.2f')} | "
              f"{fmt(med(s.agent_us for s in case.samples), '.2f')} | "
              f"{med(s.paced.p50_ms for s in case.samples):.2f} | {med(s.paced.p99_ms for s in case.samples):.2f} | "
              f"{fmt(paired(case, native, lambda s, o: s.paced.p99_ms - o.paced.p99_ms), '+.2f')} |")
    variants = [k for k in cases if "/" in k]
    if variants:
        print()
        print("What each rule costs (the shipped config minus a bench-only copy without the rule, same run):")
        print("| case | rule | HAProxy µs/req, shipped - without (fixed rate) | same at saturation | "
              "req/s x shipped (saturation) |")
        print("|---|---|---:|---:|---:|")
        for key in variants:
            shipped, rule = cases.get(key.split("/")[0]), key.split("/")[1]
            case = cases[key]
            print(f"| {KINDS[key.split('/')[0]].label} | {rule}: {RULES[rule].what} | "
                  f"{fmt(paired(case, shipped, lambda s, o: o.haproxy_us - s.haproxy_us), '+.2f')} | "
                  f"{fmt(paired(case, shipped, lambda s, o: o.haproxy_sat_us - s.haproxy_sat_us), '+.2f')} | "
                  f"{fmt(paired(case, shipped, lambda s, o: s.wrk.rps / o.wrk.rps), '.2f')} |")
    targets = [k for k in PRODUCT if k in cases and KINDS[k].native in cases]
    if targets:
        print()
        print("Targets (>= 1.0 x native at saturation; HAProxy CPU <= +1 µs/req at the fixed rate; p99 added "
              "<= 0.2 ms at the fixed rate):")
        for key in targets:
            case, native = cases[key], cases[KINDS[key].native or ""]
            ratio = paired(case, native, lambda s, o: s.wrk.rps / o.wrk.rps)
            cpu = paired(case, native, lambda s, o: s.haproxy_us - o.haproxy_us)
            p99 = paired(case, native, lambda s, o: s.paced.p99_ms - o.paced.p99_ms)
            print(f"  {label(key)}: {ratio:.2f} x {'met' if ratio >= 1.0 else 'NOT met'}; "
                  f"{cpu:+.2f} µs {'met' if cpu <= 1.0 else 'NOT met'}; "
                  f"p99 {p99:+.2f} ms {'met' if p99 <= 0.2 else 'NOT met'}")
    print()
    print("per run, req/s at saturation:", "; ".join(
        f"{k}: " + ", ".join(f"{s.wrk.rps:,.0f}" for s in c.samples) for k, c in cases.items()))
    print("per run, HAProxy µs/req at the fixed rate:", "; ".join(
        f"{k}: " + ", ".join(f"{s.haproxy_us:.1f}" for s in c.samples) for k, c in cases.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of traffic per case before run 1")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections at saturation")
    parser.add_argument("--paced-connections", type=int, default=16, help="wrk connections at the fixed rate")
    parser.add_argument("--paced-delay", type=int, default=1,
                        help="ms each paced connection waits between a response and its next request")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--members", type=int, default=3, help="backends (service tasks)")
    parser.add_argument("--threads", type=int, default=0,
                        help="HAProxy nbthread for every HAProxy measured (0: HAProxy's default)")
    parser.add_argument("--cases", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--header-key", default=f"header:{USER_HEADER}",
                        help="STICKY_KEY of case (h), e.g. cookie:SWARMID,header:X-User")
    parser.add_argument("--drop", action="append", default=[], choices=sorted(RULES),
                        help="attribution: also run the product cases without this rule (bench-only config copy)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the stacks (b, c, h, d), e.g. DECIDE=agent or COUNT_DECISIONS=0")
    args = parser.parse_args()
    args.cases = [c for c in args.cases.split(",") if c]
    if not set(args.cases) <= set(KINDS) or not args.cases or not 1 <= args.runs <= 50 or args.members > 200:
        parser.error("bad --cases, --runs or --members")
    print(machine())
    with environment(args) as cases:
        threads = {k: show_threads(c) for k, c in cases.items()}
        print("HAProxy threads:", ", ".join(f"{k}={t}" for k, t in threads.items()),
              "| agent event loop:", ", ".join(f"{k}={c.loop}" for k, c in cases.items() if c.agent))
        workdir = tempfile.mkdtemp(prefix="haproxy-swarm-wrk-")
        try:
            for case in cases.values():  # warm-up: connections, caches, CPU frequency
                run_wrk(case.port, case.headers, args.warmup, args.connections, args.wrk_threads, workdir)
            for run in range(args.runs):
                for case in cases.values():
                    sample = measure(case, args, workdir)
                    case.samples.append(sample)
                    print(f"run {run + 1} {label(case.key)}: {sample.wrk.rps:,.0f} req/s, "
                          f"p50 {sample.wrk.p50_ms:.2f} ms, p99 {sample.wrk.p99_ms:.2f} ms, "
                          f"HAProxy {sample.haproxy_sat_us:.1f} µs/req; fixed rate {sample.paced.rps:,.0f} req/s: "
                          f"HAProxy {sample.haproxy_us:.2f} µs/req, p99 {sample.paced.p99_ms:.2f} ms"
                          + (f", agent {sample.agent_us:.2f} µs/req" if sample.agent_us is not None else "")
                          + (f", counted {sample.decided:.0%}" if sample.decided is not None else "")
                          + f", {sample.new_conns * 1000:.1f} server conns/1k req"
                          + f", other work on the machine {sample.others:.2f} CPUs", flush=True)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        report(cases, args)


def show_threads(case: Case) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{case.haproxy_pid}/status").read_text().split("Threads:")[1].split()[0]
    return "?"


if __name__ == "__main__":
    main()
