"""`haproxy-swarm demo`: the product on loopback, with a scripted scale-up and scale-down.

Owns: the walk-through a newcomer sees. It starts a real DNS server (dnsmasq) serving `tasks.demo`,
real HTTP backends on 127.0.0.x, and `haproxy-swarm run` (real HAProxy + the agent), then shows
stickiness, a scale-up to five tasks and a scale-down to two, with what moved and what did not.
Ctrl-C stops everything it started; it never leaves processes behind. Must not: be needed in
production.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from spoa.local.backends import Backend
from spoa.local.client import User, users
from spoa.local.dnsmasq import Dnsmasq
from spoa.local.haproxy import admin_command, show_info
from spoa.local.ports import free_port

SERVICE = "tasks.demo"


@dataclass
class DemoPorts:
    traffic: int = 8099
    stats: int = 8888
    metrics: int = 9101


class Demo:
    def __init__(self, ports: DemoPorts, out: Callable[[str], None] = print, refresh: float = 1.0) -> None:
        self.ports = ports
        self.out = out
        self.refresh = refresh
        self.run_dir = tempfile.mkdtemp(prefix="haproxy-swarm-demo-")
        self.backend_port = free_port("127.0.0.2")
        self.tasks = {i: Backend(f"127.0.0.{i + 1}", self.backend_port, name=f"task-{i}") for i in range(1, 7)}
        self.dns: Dnsmasq | None = None
        self.run_proc: subprocess.Popen[bytes] | None = None
        self.socket = os.path.join(self.run_dir, "admin.sock")

    # ------------------------------------------------------------------ plumbing

    def name_of(self, served_by: str | None) -> str:
        for task in self.tasks.values():
            if task.address == served_by:
                return task.name
        return f"?({served_by})"

    def scale_to(self, ids: Iterable[int]) -> None:
        wanted = set(ids)
        for i, task in self.tasks.items():
            if i in wanted:
                task.start()
        assert self.dns is not None
        self.dns.set_hosts({SERVICE: [self.tasks[i].ip for i in sorted(wanted)]})
        for i, task in self.tasks.items():
            if i not in wanted:
                task.stop()  # Swarm stops the container as it leaves DNS

    def up_servers(self) -> set[str]:
        """Addresses of the agent-written servers that HAProxy reports UP."""
        try:
            state = admin_command(self.socket, "show servers state be_app")
        except OSError:
            return set()
        up = set()
        for line in state.splitlines()[1:]:
            cols = line.split()
            if len(cols) > 18 and not cols[3].startswith("dns") and cols[5] == "2" and cols[6] == "0":
                up.add(f"{cols[4]}:{cols[18]}")
        return up

    def wait_members(self, ids: Iterable[int], timeout: float = 30.0) -> float:
        want = {self.tasks[i].address for i in ids}
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.up_servers() == want:
                return time.monotonic() - start
            self._check_running()
            time.sleep(0.1)
        raise TimeoutError(f"HAProxy did not show {sorted(want)} UP within {timeout:.0f}s "
                           f"(it shows {sorted(self.up_servers())}); see {self.run_dir}/run.log")

    def _check_running(self) -> None:
        if self.run_proc is not None and self.run_proc.poll() is not None:
            raise RuntimeError(f"haproxy-swarm run exited ({self.run_proc.returncode}); "
                               f"see {self.run_dir}/run.log")

    def visit(self, user: User) -> str:
        answer = user.get("127.0.0.1", self.ports.traffic)
        if answer.status != 200:
            raise RuntimeError(f"{user.name} got HTTP {answer.status}")
        return self.name_of(answer.served_by)

    # ------------------------------------------------------------------ the walk-through

    def start(self) -> None:
        out = self.out
        out(f"• starting a DNS server (dnsmasq) on loopback serving {SERVICE}")
        self.dns = Dnsmasq()
        self.dns.start()
        out(f"• starting 3 backend tasks on 127.0.0.2-4:{self.backend_port} (each says who it is)")
        self.scale_to([1, 2, 3])
        env = dict(os.environ) | {
            "SWARM_SERVICE": f"{SERVICE}:{self.backend_port}",
            "DNS_NAMESERVER": f"127.0.0.1:{self.dns.port}",
            "DNS_REFRESH": str(self.refresh),
            "MEMBER_GRACE": str(2 * self.refresh),
            "DRAIN_TIMEOUT": "5",
            "RUN_DIR": self.run_dir,
            "FRONTEND_BIND": f"127.0.0.1:{self.ports.traffic}",
            "STATS_BIND": f"127.0.0.1:{self.ports.stats}",
            "METRICS_LISTEN": f"127.0.0.1:{self.ports.metrics}",
            "AGENT_LISTEN": f"127.0.0.1:{free_port()}",
            "COOKIE_SECRET": "demo-secret",
        }
        out("• starting `haproxy-swarm run` (HAProxy with the shipped haproxy.cfg + the agent)")
        log = open(os.path.join(self.run_dir, "run.log"), "wb")  # noqa: SIM115 - closed with the process
        self.run_proc = subprocess.Popen([sys.executable, "-m", "spoa", "run"], env=env,
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        log.close()
        took = self.wait_members([1, 2, 3])
        out(f"  ready: 3 tasks UP in HAProxy after their first health check ({took:.1f}s)")

    def script(self) -> None:
        out = self.out
        pid = show_info(self.socket)["Pid"]
        alice, bob = User("alice", "127.1.1.1"), User("bob", "127.1.1.2")
        out("\n1. Two users, three requests each: each stays on one task")
        for user in (alice, bob):
            seen = [self.visit(user) for _ in range(3)]
            out(f"   {user.name:6} → {', '.join(seen)}   (cookie SWARMID={user.cookies.get('SWARMID')})")

        crowd = users(30, "user")
        first = {u.name: self.visit(u) for u in crowd}
        out(f"   30 more users spread over the tasks: {dict(sorted(Counter(first.values()).items()))}")

        out("\n2. Scale up to 5 tasks (DNS changes; no reload)")
        self.scale_to([1, 2, 3, 4, 5])
        took = self.wait_members([1, 2, 3, 4, 5])
        out(f"   HAProxy shows 5 tasks UP {took:.1f}s after the DNS change")
        moved = [u.name for u in crowd if self.visit(u) != first[u.name]]
        out(f"   the 30 users with a cookie: {len(moved)} moved")
        newcomers = users(30, "new", network="127.2")
        spread = Counter(self.visit(u) for u in newcomers)
        out(f"   30 new users: {dict(sorted(spread.items()))}  (the new tasks get their share)")
        out(f"   alice → {self.visit(alice)}, bob → {self.visit(bob)}")

        out("\n3. Scale down to 2 tasks: task-3, task-4 and task-5 go away")
        before = {u.name: self.visit(u) for u in crowd}
        self.scale_to([1, 2])
        took = self.wait_members([1, 2])
        out(f"   HAProxy shows 2 tasks UP {took:.1f}s after the DNS change")
        after = {u.name: self.visit(u) for u in crowd}
        kept = [n for n in after if before[n] in ("task-1", "task-2")]
        moved_kept = [n for n in kept if after[n] != before[n]]
        out(f"   users on task-1/task-2: {len(kept)}, of whom moved: {len(moved_kept)}")
        out(f"   users on removed tasks: {len(after) - len(kept)}, now on "
            f"{dict(sorted(Counter(after[n] for n in after if n not in kept).items()))} with a new cookie")

        info = show_info(self.socket)
        out(f"\n4. HAProxy worker pid {pid} → {info['Pid']}, uptime {info.get('Uptime')}: "
            f"{'no reload' if info['Pid'] == pid else 'RELOADED'}")
        out(f"   traffic:  http://127.0.0.1:{self.ports.traffic}/")
        out(f"   stats:    http://127.0.0.1:{self.ports.stats}/   (every task is a server, with its health)")
        out(f"   metrics:  http://127.0.0.1:{self.ports.metrics}/metrics")
        out(f"   status:   haproxy-swarm status --metrics http://127.0.0.1:{self.ports.metrics} "
            f"--haproxy-socket {self.socket}")

    def stop(self) -> None:
        proc, self.run_proc = self.run_proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for task in self.tasks.values():
            task.stop()
        if self.dns is not None:
            self.dns.stop()
            self.dns = None
        shutil.rmtree(self.run_dir, ignore_errors=True)


def main(ports: DemoPorts, wait: bool = True) -> int:
    missing = [b for b in ("haproxy", "dnsmasq") if shutil.which(b) is None
               and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        print(f"haproxy-swarm demo: {' and '.join(missing)} not found; ./scripts/demo installs them",
              file=sys.stderr)
        return 2
    demo = Demo(ports)
    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        demo.start()
        demo.script()
        if wait:
            print("\nRunning. Ctrl-C stops everything the demo started.", flush=True)
            while True:
                demo._check_running()
                time.sleep(0.5)
    except KeyboardInterrupt:
        interrupted = True
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"\nhaproxy-swarm demo: {e}", file=sys.stderr)
        demo.stop()
        return 1
    finally:
        if interrupted:
            print("\nstopping…", flush=True)
        demo.stop()
    return 0
