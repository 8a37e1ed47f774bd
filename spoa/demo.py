"""`haproxy-swarm demo`: the product on loopback, with a scripted scale-up and scale-down.

Owns: the walk-through a newcomer sees. It starts (through `spoa.local.stack.Stack`) a real DNS
server (dnsmasq) serving `tasks.demo`, real HTTP backends on 127.0.0.x and `haproxy-swarm run`
(real HAProxy with the shipped config + the agent), then shows stickiness, a scale-up to five tasks
and a scale-down to two, with what moved and what did not. Ctrl-C stops everything it started; it
never leaves processes behind. Must not: be needed in production.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from spoa.local.client import User, users
from spoa.local.stack import Stack
from spoa.status import collect, render


@dataclass
class DemoPorts:
    traffic: int = 8099
    stats: int = 8888
    metrics: int = 9101


class Demo:
    def __init__(self, ports: DemoPorts, out: Callable[[str], None] = print, refresh: float = 1.0) -> None:
        self.ports = ports
        self.out = out
        self.stack = Stack(n_slots=5, refresh=refresh, service="tasks.demo",
                           ports=(ports.traffic, ports.stats, ports.metrics),
                           env={"COOKIE_SECRET": "demo-secret", "DRAIN_TIMEOUT": "5"})

    def visit(self, user: User) -> str:
        answer = user.get("127.0.0.1", self.ports.traffic)
        if answer.status != 200:
            raise RuntimeError(f"{user.name} got HTTP {answer.status}")
        return self.stack.task_name(answer.served_by)

    def scale(self, n: int) -> float:
        """Scale to tasks 1..n (DNS + processes) and return how long HAProxy took to show them UP."""
        self.stack.scale(range(n), wait=False)
        return self.stack.wait_up(range(n), timeout=30)

    def start(self) -> None:
        s = self.stack
        self.out("• starting a DNS server (dnsmasq) on loopback serving tasks.demo")
        s.dns.start()
        self.out(f"• starting 3 backend tasks on 127.0.0.2-4:{s.backend_port} (each answers with its name)")
        self.out("• starting `haproxy-swarm run` (HAProxy with the shipped haproxy.cfg + the agent)")
        started = time.monotonic()
        s.start(members=range(3), wait=False)
        s.wait_up(range(3), timeout=30)
        self.out(f"  ready: 3 tasks UP in HAProxy after their first health check "
                 f"({time.monotonic() - started:.1f}s)")

    def script(self) -> None:
        out = self.out
        pid = self.stack.haproxy_info()["Pid"]
        # Each user has its own source address, as distinct clients on the internet do (and as the 60
        # below): with 3 tasks and 4 users, two of them share a task whatever the addresses are.
        named = [User(name, f"127.1.1.{i + 1}") for i, name in enumerate(("alice", "bob", "carol", "dave"))]
        out("\n1. Four users, three requests each: each stays on one task (the agent sets a cookie)")
        out("   A first visit goes where the hash of the user's source address points (STICKY_KEY="
            "cookie:SWARMID,src); the SWARMID cookie then names that task, so users on one task share it.")
        for user in named:
            seen = [self.visit(user) for _ in range(3)]
            out(f"   {user.name:6} from {user.source_ip:10} → {', '.join(seen)}   "
                f"(SWARMID={user.cookies.get('SWARMID')})")
        crowd = users(60, "user")
        first = {u.name: self.visit(u) for u in crowd}
        out(f"   60 more users spread over the tasks: {dict(sorted(Counter(first.values()).items()))}")

        out("\n2. Scale up to 5 tasks (only DNS changes; HAProxy is not reloaded)")
        out(f"   HAProxy shows 5 tasks UP {self.scale(5):.1f}s after the DNS change "
            f"(each new task after its first health check)")
        moved = sum(self.visit(u) != first[u.name] for u in crowd)
        out(f"   the 60 users with a cookie: {moved} moved")
        spread = Counter(self.visit(u) for u in users(60, "new", network="127.2"))
        out(f"   60 new users: {dict(sorted(spread.items()))}  (the new tasks get their share)")

        out("\n3. Scale down to 2 tasks: task-3, task-4 and task-5 go away")
        before = {u.name: self.visit(u) for u in crowd}
        out(f"   HAProxy shows 2 tasks UP {self.scale(2):.1f}s after the DNS change")
        after = {u.name: self.visit(u) for u in crowd}
        stayed = [n for n in after if before[n] in ("task-1", "task-2")]
        out(f"   users on task-1/task-2: {len(stayed)}, of whom moved: "
            f"{sum(after[n] != before[n] for n in stayed)}")
        out(f"   users on removed tasks: {len(after) - len(stayed)}, now on "
            f"{dict(sorted(Counter(after[n] for n in after if n not in stayed).items()))}, with a new cookie")

        info = self.stack.haproxy_info()
        out(f"\n4. HAProxy worker pid {pid} → {info['Pid']}, uptime {info.get('Uptime')}: "
            f"{'no reload' if info['Pid'] == pid else 'RELOADED'}")
        out("\n   haproxy-swarm status:")
        for line in render(collect(f"http://127.0.0.1:{self.ports.metrics}", self.stack.socket)).splitlines():
            out(f"   {line}")
        out(f"\n   traffic:  http://127.0.0.1:{self.ports.traffic}/")
        out(f"   stats:    http://127.0.0.1:{self.ports.stats}/   (every task is a server, with its health)")
        out(f"   metrics:  http://127.0.0.1:{self.ports.metrics}/metrics")
        out(f"   status:   .venv/bin/haproxy-swarm status --metrics http://127.0.0.1:{self.ports.metrics} "
            f"--haproxy-socket {self.stack.socket}")

    def stop(self) -> None:
        self.stack.stop()


def main(ports: DemoPorts, wait: bool = True) -> int:
    missing = [b for b in ("haproxy", "dnsmasq") if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        print(f"haproxy-swarm demo: {' and '.join(missing)} not found; ./scripts/demo installs them", file=sys.stderr)
        return 2

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    demo = Demo(ports)
    try:
        demo.start()
        demo.script()
        if wait:
            print("\nRunning. Ctrl-C stops everything the demo started.", flush=True)
            while True:
                demo.stack.check_running()
                time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping…", flush=True)
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"\nhaproxy-swarm demo: {e}", file=sys.stderr)
        return 1
    finally:
        demo.stop()
    return 0
