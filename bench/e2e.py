"""End-to-end benchmark (not a test): HAProxy + agent against HAProxy's native consistent hashing.

Same run, same backends, same HAProxy thread count, wrk on loopback:

  (a) baseline   HAProxy alone: `balance hash req.cook(SWARMID)` + `hash-type consistent` (a small
                 config generated here; the baseline is not the product), each request with a cookie
  (b) first      the shipped haproxy.cfg + agent (`haproxy-swarm run` through `Stack`), no cookie:
                 HAProxy decides from the decision table (slot of the source address) and sets the
                 cookie; with --env DECIDE=agent every request asks the agent over SPOE
  (c) returning  the same stack, each request with a valid sticky cookie (HAProxy routes it from
                 the agent-kept cookie map without asking the agent)
  (d) src        a second stack with STICKY_KEY=src: the table decides by source address (with
                 DECIDE=agent: every request asks the agent)

The backends are one HAProxy process answering `http-request return` on 127.0.0.2.. (so they are
never the bottleneck), found through one dnsmasq. Cases are interleaved in every run; the figures
are medians over the runs. Printed per case: requests/s, p50, p99 (wrk's own latency histogram),
the ratio to (a), the p99 added to (a), and CPU per request of the agent and of HAProxy (from
/proc/<pid>/stat utime+stime before and after). Every case also reports the decisions per request
the agent's /metrics counted (HAProxy's own included, read from its counters) and checks that no
request failed.

    .venv/bin/python bench/e2e.py                                  # 3 runs x 10 s per case
    .venv/bin/python bench/e2e.py --duration 5 --runs 5 --connections 64
    .venv/bin/python bench/e2e.py --cases a,b                      # a subset
    .venv/bin/python bench/e2e.py --threads 2                      # HAPROXY_NBTHREAD for every HAProxy
    .venv/bin/python bench/e2e.py --env DECIDE=agent               # the SPOE path
    .venv/bin/python bench/e2e.py --env COUNT_DECISIONS=0          # without counting HAProxy's decisions

Targets (shared/DESIGN.md, issue 6): (b), (c), (d) >= 0.85 x (a); p99 added <= 1 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spoa.haproxy.process import admin_command, haproxy_binary, show_info, stop_process
from spoa.local.dnsmasq import Dnsmasq
from spoa.local.ports import free_port
from spoa.local.stack import Stack

COOKIE = "SWARMID"
SECRET = "bench-secret"
CASES = {
    "a": "(a) HAProxy balance hash cookie",
    "b": "(b) agent, first visits",
    "c": "(c) agent, returning visitors",
    "d": "(d) agent, STICKY_KEY=src",
}

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

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)


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


def baseline_config(port: int, servers: Sequence[str], threads: int | None) -> str:
    """HAProxy's own consistent hashing on the sticky cookie, with the shipped config's defaults."""
    nbthread = f"    nbthread {threads}\n" if threads else ""
    lines = "\n".join(f"    server s{i + 1} {addr} check inter 2s" for i, addr in enumerate(servers))
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
    retries 2
    option redispatch 1
frontend fe_main
    bind 127.0.0.1:{port}
    default_backend be_app
backend be_app
    balance hash req.cook({COOKIE})
    hash-type consistent
{lines}
"""


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
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
-- Cycles through pre-formatted requests (one per cookie value; none when no cookie is given) and
-- prints wrk's own figures in microseconds at the end.
local cookies = {%s}
local reqs = {}
local i = 0
init = function(args)
  if #cookies == 0 then
    reqs[1] = wrk.format("GET", "/")
  else
    for n, c in ipairs(cookies) do
      reqs[n] = wrk.format("GET", "/", {["Cookie"] = "%s=" .. c})
    end
  end
end
request = function()
  i = i %% #reqs + 1
  return reqs[i]
end
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


def run_wrk(port: int, cookies: Sequence[str], duration: float, connections: int, threads: int,
            workdir: str) -> WrkResult:
    script = os.path.join(workdir, f"wrk-{len(cookies)}.lua")
    Path(script).write_text(WRK_SCRIPT % (", ".join(f'"{c}"' for c in cookies), COOKIE))
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
    wrk: WrkResult
    agent_us: float | None  # agent CPU per request
    haproxy_us: float  # HAProxy worker CPU per request
    decided: float | None  # agent decisions per request (1 = every request asked the agent)
    new_conns: float  # server connections opened per request (0 when HAProxy reuses them)
    others: float  # CPUs busy with processes outside this case (other work on the machine), 0..nproc
    total_us: float  # CPU per request of everything in the case: wrk, HAProxy, backends, agent


@dataclass
class Case:
    key: str
    port: int
    haproxy_pid: int
    socket: str
    cookies: list[str]
    agent: int | None = None
    metrics_port: int | None = None
    backends_pid: int = 0
    loop: str = "-"  # the agent's event loop (uvloop or asyncio), from its build_info metric
    samples: list[Sample] = field(default_factory=list)


def measure(case: Case, args: argparse.Namespace, workdir: str) -> Sample:
    decisions_before = (metric(case.metrics_port, "haproxy_swarm_decisions_total")
                        if case.metrics_port is not None else 0.0)
    agent_before = cpu_seconds(case.agent) if case.agent is not None else 0.0
    haproxy_before = cpu_seconds(case.haproxy_pid)
    connects_before = server_connects(case.socket)
    ours_before = agent_before + haproxy_before + cpu_seconds(case.backends_pid) + children_cpu()
    busy_before = busy_cpu()
    result = run_wrk(case.port, case.cookies, args.duration, args.connections, args.wrk_threads, workdir)
    haproxy_us = (cpu_seconds(case.haproxy_pid) - haproxy_before) / result.requests * 1e6
    new_conns = (server_connects(case.socket) - connects_before) / result.requests
    busy = busy_cpu() - busy_before
    ours = (cpu_seconds(case.haproxy_pid) + cpu_seconds(case.backends_pid) + children_cpu()
            + (cpu_seconds(case.agent) if case.agent is not None else 0.0)) - ours_before
    others = max(0.0, busy - ours) / result.seconds
    total_us = ours / result.requests * 1e6
    agent_us = decided = None
    if case.agent is not None and case.metrics_port is not None:
        agent_us = (cpu_seconds(case.agent) - agent_before) / result.requests * 1e6
        decided = (metric(case.metrics_port, "haproxy_swarm_decisions_total") - decisions_before) / result.requests
    if result.errors:
        raise RuntimeError(f"case {case.key}: {result.errors} failed requests")
    return Sample(result, agent_us, haproxy_us, decided, new_conns, others, total_us)


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


@contextlib.contextmanager
def environment(args: argparse.Namespace) -> Iterator[dict[str, Case]]:
    """Backends, dnsmasq, the baseline and the stacks the cases need; all stopped on the way out."""
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
        cases: dict[str, Case] = {}
        wanted = set(args.cases)
        if "a" in wanted:
            port = free_port()
            baseline = HAProxyConfig("baseline", baseline_config(port, servers, args.threads), workdir)
            started.append(baseline.start())
            # 1000 distinct session cookies, cycled through.
            cookies = [f"{i * 2654435761 % (1 << 40):020x}" for i in range(1000)]
            cases["a"] = Case("a", port, baseline.worker_pid(), baseline.socket, cookies)
        for keys, env in (("bc", {}), ("d", {"STICKY_KEY": "src"})):
            if not wanted & set(keys):
                continue
            tasks = [FastTask(ip, backend_port, f"task-{i + 1}") for i, ip in enumerate(ips)]
            stack = Stack(dns=dns, tasks=tasks, refresh=2.0,  # type: ignore[arg-type]
                          env={"COOKIE_SECRET": SECRET, "LOG_LEVEL": "warning", **extra, **env})
            started.append(stack)
            stack.start(range(len(ips)))
            pid = int(stack.haproxy_info()["Pid"])
            agent = stack.agent_pid()
            if agent is None:
                raise RuntimeError("no agent process under `haproxy-swarm run`")
            for key in wanted & set(keys):
                cookies = live_cookies(stack) if key == "c" else []
                cases[key] = Case(key, stack.traffic_port, pid, stack.socket, cookies, agent, stack.metrics_port,
                                  loop=agent_loop(stack.metrics_port))
        cases = {k: cases[k] for k in sorted(cases)}
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
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = admin_command(stack.socket, f"show map {path}")
        values = [line.split()[1] for line in text.splitlines() if len(line.split()) == 3]
        if len(values) == len(stack.members):
            return values
        time.sleep(0.1)
    raise RuntimeError(f"cookie map never held {len(stack.members)} entries")


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
            f"{(wrk.stdout + wrk.stderr).split(' Copyright')[0].strip()}")


def report(cases: Mapping[str, Case], args: argparse.Namespace) -> None:
    def med(values: Iterable[float | None]) -> float:
        vals = [v for v in values if v is not None]
        return statistics.median(vals) if vals else float("nan")

    base = cases.get("a")
    print()
    print(f"medians of {args.runs} runs x {args.duration:g} s, {args.connections} connections, "
          f"wrk -t{args.wrk_threads}, {args.members} backends; x (a): the median of the per-run ratios "
          "(cases of one run are measured back to back)")
    print("| case | req/s | x (a) | p50 ms | p99 ms | p99 added ms | decisions counted | agent µs/req | HAProxy µs/req "
          "| all µs/req | server conns/1k req | other load, CPUs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, case in cases.items():
        samples = case.samples
        rps = med(s.wrk.rps for s in samples)
        ratio = added = "-"
        if base is not None and key != "a":
            ratio = f"{med(s.wrk.rps / b.wrk.rps for s, b in zip(samples, base.samples, strict=True)):.2f}"
            added = f"{med(s.wrk.p99_ms - b.wrk.p99_ms for s, b in zip(samples, base.samples, strict=True)):+.2f}"
        agent = med(s.agent_us for s in samples)
        decided = med(s.decided for s in samples)
        print(f"| {CASES[key]} | {rps:,.0f} | {ratio} | {med(s.wrk.p50_ms for s in samples):.2f} | "
              f"{med(s.wrk.p99_ms for s in samples):.2f} | {added} | "
              f"{'-' if decided != decided else f'{decided:.0%}'} | "
              f"{'-' if agent != agent else f'{agent:.1f}'} | {med(s.haproxy_us for s in samples):.1f} | "
              f"{med(s.total_us for s in samples):.1f} | {med(s.new_conns for s in samples) * 1000:.1f} | "
              f"{med(s.others for s in samples):.2f} |")
    print()
    print("per run, req/s:", "; ".join(f"{k}: " + ", ".join(f"{s.wrk.rps:,.0f}" for s in c.samples)
                                       for k, c in cases.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of traffic per case before run 1")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--wrk-threads", type=int, default=1)
    parser.add_argument("--members", type=int, default=3, help="backends (service tasks)")
    parser.add_argument("--threads", type=int, default=0,
                        help="HAProxy nbthread for the baseline and the stacks (0: HAProxy's default)")
    parser.add_argument("--cases", default="a,b,c,d", help="comma-separated subset of a,b,c,d")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment of the stacks (b, c, d), e.g. DECIDE=agent or COUNT_DECISIONS=0")
    args = parser.parse_args()
    args.cases = [c for c in args.cases.split(",") if c]
    if not set(args.cases) <= set(CASES) or not args.cases or not 1 <= args.runs <= 50 or args.members > 200:
        parser.error("bad --cases, --runs or --members")
    print(machine())
    with environment(args) as cases:
        threads = {k: show_threads(c) for k, c in cases.items()}
        print("HAProxy threads:", ", ".join(f"{k}={t}" for k, t in threads.items()),
              "| agent event loop:", ", ".join(f"{k}={c.loop}" for k, c in cases.items() if c.agent))
        workdir = tempfile.mkdtemp(prefix="haproxy-swarm-wrk-")
        try:
            for case in cases.values():  # warm-up: SPOP connections, caches, CPU frequency
                run_wrk(case.port, case.cookies, args.warmup, args.connections, args.wrk_threads, workdir)
            for run in range(args.runs):
                for case in cases.values():
                    sample = measure(case, args, workdir)
                    case.samples.append(sample)
                    print(f"run {run + 1} {CASES[case.key]}: {sample.wrk.rps:,.0f} req/s, "
                          f"p50 {sample.wrk.p50_ms:.2f} ms, p99 {sample.wrk.p99_ms:.2f} ms"
                          + (f", agent {sample.agent_us:.1f} µs/req, asked {sample.decided:.0%}"
                             if sample.agent_us is not None and sample.decided is not None else "")
                          + f", HAProxy {sample.haproxy_us:.1f} µs/req"
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
