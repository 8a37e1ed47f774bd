"""The whole product on loopback: dnsmasq + HTTP backends + `haproxy-swarm run` as plain processes.

Owns: starting and stopping that set for the end-to-end tests and benchmarks, scaling the service
(DNS + backend processes) and reading HAProxy's view back. Everything is real: the shipped
haproxy.cfg, the real agent, real DNS and real HTTP. Must not: leave a process behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Self

from spoa.haproxy.process import admin_command, process_alive, show_info
from spoa.local.backends import Backend
from spoa.local.dnsmasq import Dnsmasq
from spoa.local.ports import free_port
from spoa.status import parse_metrics

SERVICE = "tasks.backend"


def parse_servers_state(text: str) -> list[dict[str, str]]:
    """`show servers state` → one dict per server, keyed by the header's column names."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    header = next((ln for ln in lines if ln.startswith("#")), None)
    if header is None:
        return []
    names = header.lstrip("# ").split()
    return [dict(zip(names, ln.split(), strict=False)) for ln in lines if not ln.startswith("#") and " " in ln]


def child_pids(pid: int) -> list[int]:
    """The live children of process `pid` (from /proc), oldest first; [] when it is gone."""
    children: list[int] = []
    try:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
            if int(fields[1]) == pid and fields[0] != b"Z":
                children.append(int(entry))
    except OSError:
        return []
    return sorted(children)


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def _child_of(parent: int, kind: str) -> int | None:
    """The pid of `run`'s child of `kind` ("agent" or "haproxy"), or None."""
    for pid in child_pids(parent):
        argv = _cmdline(pid)
        is_agent = argv[-3:] == ["spoa", "agent", ""]  # `python -m spoa agent`, as the supervisor starts it
        is_haproxy = bool(argv) and os.path.basename(argv[0]) == "haproxy"
        if (is_agent and kind == "agent") or (is_haproxy and kind == "haproxy"):
            return pid
    return None


class Stack:
    """dnsmasq serving `tasks.backend`, backends on 127.0.0.2.., and `haproxy-swarm run`."""

    def __init__(self, n_slots: int = 8, env: Mapping[str, str] | None = None, refresh: float = 0.5,
                 run_dir: str | None = None, dns: Dnsmasq | None = None, backend_port: int | None = None,
                 service: str = SERVICE, ports: tuple[int, int, int] | None = None,
                 tasks: Sequence[Backend] | None = None) -> None:
        """`ports`: (traffic, stats, metrics); free ones by default. `tasks`: another Stack's backends
        to share (with its `dns`); this Stack then never stops them."""
        self.run_dir = run_dir or tempfile.mkdtemp(prefix="haproxy-swarm-stack-")
        self._own_run_dir = run_dir is None
        self._own_tasks = tasks is None
        if tasks is not None:
            backend_port = tasks[0].port
        self.backend_port = backend_port or free_port("127.0.0.2")
        self.tasks = list(tasks) if tasks is not None else [
            Backend(f"127.0.0.{i + 2}", self.backend_port, name=f"task-{i + 1}") for i in range(n_slots)]
        self._own_dns = dns is None
        self.dns = dns or Dnsmasq()
        self.service = service
        self.traffic_port, self.stats_port, self.metrics_port = ports or (free_port(), free_port(), free_port())
        self.agent_port = free_port()
        self.refresh = refresh
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = os.path.join(self.run_dir, "admin.sock")
        self.log_path = os.path.join(self.run_dir, "run.log")
        self.members: list[int] = []

    # ------------------------------------------------------------------ life cycle

    def env(self) -> dict[str, str]:
        return dict(os.environ) | {
            "SWARM_SERVICE": f"{self.service}:{self.backend_port}",
            "DNS_NAMESERVER": str(self.dns.address),
            "DNS_REFRESH": str(self.refresh),
            "MEMBER_GRACE": str(2 * self.refresh),
            "DRAIN_TIMEOUT": "3",
            "RUN_DIR": self.run_dir,
            "FRONTEND_BIND": f"127.0.0.1:{self.traffic_port}",
            "STATS_BIND": f"127.0.0.1:{self.stats_port}",
            "METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            "AGENT_LISTEN": f"127.0.0.1:{self.agent_port}",
            "COOKIE_SECRET": "test-secret",
            "LOG_LEVEL": "info",
        } | self.extra_env

    def start(self, members: Iterable[int] = (0, 1, 2), wait: bool = True, start_backends: bool = True) -> Self:
        """Start `run` with the task slots `members` in DNS. `start_backends` False: their backends
        do not listen yet (a cold start whose tasks are not ready; then `wait` must be False)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("this Stack is already running")  # a second `run` would be left behind
        try:
            if self._own_dns and not self.dns.running:
                self.dns.start()
            self.scale(members, wait=False, start_backends=start_backends)
            log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
            self.proc = subprocess.Popen([sys.executable, "-m", "spoa", "run"], env=self.env(),
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
            if wait:
                self.wait_up(self.members)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                # `run` hangs: kill it, and its children too - HAProxy leads a session of its own,
                # so killing `run`'s process group would leave it (and its ports) behind.
                children = [pid for pid in (_child_of(proc.pid, "haproxy"), _child_of(proc.pid, "agent"))
                            if pid is not None]
                os.killpg(proc.pid, signal.SIGKILL)
                for pid in children:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        if os.getpgid(pid) == pid:
                            os.killpg(pid, signal.SIGKILL)
                        else:
                            os.kill(pid, signal.SIGKILL)
                proc.wait(timeout=5)
        if self._own_tasks:
            for task in self.tasks:
                task.stop()
        if self._own_dns:
            self.dns.stop()
        if self._own_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> Self:
        if self.proc is not None and self.proc.poll() is None:
            return self  # `with stack.start(members):` - already started
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ scaling

    def scale(self, members: Iterable[int], wait: bool = True, start_backends: bool = True,
              stop_removed: bool = True) -> None:
        """Make the service's members the task slots `members` (DNS + backend processes)."""
        wanted = sorted(set(members))
        if start_backends:
            for i in wanted:
                self.tasks[i].start()
        self.dns.set_hosts({self.service: [self.tasks[i].ip for i in wanted]})
        if stop_removed:
            for i, task in enumerate(self.tasks):
                if i not in wanted:
                    task.stop()
        self.members = wanted
        if wait:
            self.wait_up(wanted)

    def task_name(self, address: str | None) -> str:
        return next((t.name for t in self.tasks if t.address == address), f"?({address})")

    def addresses(self, slots: Iterable[int]) -> set[str]:
        return {self.tasks[i].address for i in slots}

    # ------------------------------------------------------------------ HAProxy's view

    def command(self, command: str) -> str:
        return admin_command(self.socket, command)

    def servers(self) -> list[dict[str, str]]:
        """The agent-written servers of be_app (not the `dns*` fallback servers)."""
        try:
            rows = parse_servers_state(self.command("show servers state be_app"))
        except OSError:
            return []
        return [r for r in rows if not r.get("srv_name", "").startswith("dns")]

    def up(self) -> set[str]:
        """Addresses HAProxy has UP and ready (not in maintenance, not draining)."""
        return {f"{r['srv_addr']}:{r['srv_port']}" for r in self.servers()
                if r.get("srv_op_state") == "2" and r.get("srv_admin_state") == "0"}

    def wait_up(self, slots: Iterable[int], timeout: float = 20.0) -> float:
        """Wait until HAProxy has exactly the task slots `slots` UP and the agent routes to as many
        members with its decision table published (/readyz 200, "N of M members up"). HAProxy
        learns of a dead task first (one refused connection marks it DOWN) and the agent up to a
        control step later; the table follows the agent's view. Returns the seconds it took."""
        want = self.addresses(slots)
        agrees = f"{len(want)} of "
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            self.check_running()
            if self.up() == want:
                status, body = self.readyz()
                if status == 200 and body.startswith(agrees):
                    return time.monotonic() - start
            time.sleep(0.05)
        raise TimeoutError(f"HAProxy shows {sorted(self.up())} UP, wanted {sorted(want)}; agent's /readyz: "
                           f"{self.readyz()}; log:\n{self.log_tail()}")

    def reload(self, how: str = "SIGHUP to run", timeout: float = 15.0) -> float:
        """Reload HAProxy as an operator does, `how`: "SIGHUP to run" or "SIGUSR2 to the master";
        return the seconds until the new worker answered, after waiting for the old one to exit (until
        then it may still answer on the shared admin socket, with its own view)."""
        old = self.haproxy_info()["Pid"]
        master = self.haproxy_pid()
        assert self.proc is not None and master is not None, "not running"
        start = time.monotonic()
        if how == "SIGHUP to run":
            self.proc.send_signal(signal.SIGHUP)
        elif how == "SIGUSR2 to the master":
            os.kill(master, signal.SIGUSR2)
        else:
            raise ValueError(f"no such way to reload: {how!r}")
        worker: float | None = None
        while time.monotonic() - start < timeout:
            if worker is None:
                with contextlib.suppress(OSError):
                    if self.haproxy_info().get("Pid") not in (None, old):
                        worker = time.monotonic() - start
            if worker is not None and not process_alive(int(old)):
                return worker
            time.sleep(0.01)
        raise TimeoutError(f"HAProxy did not reload ({how}) within {timeout}s")

    def agent_pid(self) -> int | None:
        """The pid of the agent `run` supervises now (None while it is being restarted)."""
        return self._child("agent")

    def haproxy_pid(self) -> int | None:
        """The pid of HAProxy's master process (its workers are the master's children)."""
        return self._child("haproxy")

    def _child(self, kind: str) -> int | None:
        return None if self.proc is None else _child_of(self.proc.pid, kind)

    def check_running(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"haproxy-swarm run exited ({self.proc.returncode}):\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-n:]
        except OSError:
            return ""

    def haproxy_info(self) -> dict[str, str]:
        return show_info(self.socket)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            body: bytes = resp.read()
        return body.decode()

    def readyz(self) -> tuple[int, str]:
        """The agent's /readyz: (HTTP status, body); (0, error) while it does not answer."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()
        except OSError as e:
            return 0, str(e)

    def map_entries(self, path: str) -> dict[str, str]:
        """The entries of one of HAProxy's maps (`show map`), key -> value."""
        out: dict[str, str] = {}
        for line in self.command(f"show map {path}").splitlines():
            parts = line.split()
            if len(parts) == 3:
                out[parts[1]] = parts[2]
        return out

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 when absent)."""
        samples = parse_metrics(self.metrics()).get(name, [])
        return sum(value for have, value in samples if labels.items() <= have.items())
