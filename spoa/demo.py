"""`haproxy-swarm demo`: the product on loopback, with a scripted scale-up and scale-down.

Owns: the walk-through a newcomer sees. It starts (through `spoa.local.services.Services`) a real
DNS server (dnsmasq) serving `tasks.demo` and `tasks.api`, real HTTP backends on 127.0.10.x (demo)
and 127.0.11.x (api), and `haproxy-swarm run` (real HAProxy with the shipped config + the agent)
reading a Swarm config of two lines: `demo`, the default service, and `api`, routed by
`Host: api.localhost`. It shows stickiness, a scale-up of demo to five tasks and a scale-down to
two, then the api service beside it and its scale-up, with what moved and what did not. Ctrl-C
stops everything it started; it never leaves processes behind. Must not: be needed in production.
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
from pathlib import Path

from spoa.local.client import User, users
from spoa.local.services import Services
from spoa.status import collect, render


@dataclass
class DemoPorts:
    traffic: int = 8099
    stats: int = 8888
    metrics: int = 9101


DEMO = "demo"  # the default service: whatever Host is not API_HOST; its cookie keeps the name SWARMID
API = "api"
API_HOST = "api.localhost"


class Demo:
    def __init__(self, ports: DemoPorts, out: Callable[[str], None] = print, refresh: float = 1.0) -> None:
        self.ports = ports
        self.out = out
        self.stack = Services([(DEMO, None, "cookie=SWARMID"), (API, API_HOST, "")], n_slots=5, refresh=refresh,
                              ports=(ports.traffic, ports.stats, ports.metrics),
                              env={"COOKIE_SECRET": "demo-secret", "DRAIN_TIMEOUT": "5"})
        for i, task in enumerate(self.stack.services[DEMO].tasks):
            task.name = f"task-{i + 1}"  # api's are api-1, api-2, ...
        self.answers: Counter[str] = Counter()  # answers per service, each checked to come from its tasks

    def visit(self, user: User, service: str = DEMO) -> str:
        """One request of `user`; fails unless a task of `service` answered it."""
        answer = user.get("127.0.0.1", self.ports.traffic)
        if answer.status != 200:
            raise RuntimeError(f"{user.name} got HTTP {answer.status}")
        if self.stack.service_of(answer.served_by) != service:
            raise RuntimeError(f"{user.name} (Host: {user.headers.get('Host', '127.0.0.1')}) was answered by "
                               f"{answer.served_by}, not a task of {service}")
        self.answers[service] += 1
        return self.stack.task_name(answer.served_by)

    def scale(self, n: int, service: str = DEMO) -> float:
        """Scale `service` to tasks 1..n (DNS + processes); return how long HAProxy took to show them
        UP. Returns once the removed tasks' servers are drained and deleted too: until then a user of
        a removed task may be sent to one task and then settle on another."""
        self.stack.scale_service(service, range(n), wait=False)
        took = self.stack.wait_service(service, range(n), timeout=30)
        self.stack.wait_removed(service, timeout=30)
        return took

    def ips(self, service: str, n: int) -> str:
        """`127.0.10.2-4`: the addresses of the service's first n tasks."""
        first, last = self.stack.services[service].tasks[0].ip, self.stack.services[service].tasks[n - 1].ip
        return f"{first}-{last.rsplit('.', 1)[1]}"

    def start(self) -> None:
        s = self.stack
        self.out(f"• starting a DNS server (dnsmasq) on loopback serving tasks.{DEMO} and tasks.{API}")
        s.dns.start()
        self.out(f"• starting 3 backend tasks of {DEMO} on {self.ips(DEMO, 3)}:{s.backend_port} and 2 of {API} on "
                 f"{self.ips(API, 2)}:{s.backend_port} (each answers with its name)")
        self.out("• starting `haproxy-swarm run` (HAProxy with the shipped haproxy.cfg + the agent), its Swarm "
                 "config holding two services:")
        for line in Path(s.config_file).read_text().splitlines():
            self.out(f"    {line}")
        self.out(f"  (a line without a route is the default service; `{API_HOST} …` takes the requests with "
                 f"Host: {API_HOST})")
        started = time.monotonic()
        s.start(members=range(3), members_of={API: range(2)}, wait=False)
        s.wait_service(DEMO, range(3), timeout=30)
        s.wait_service(API, range(2), timeout=30)
        self.out(f"  ready: 3 {DEMO} tasks and 2 {API} tasks UP in HAProxy after their first health check "
                 f"({time.monotonic() - started:.1f}s)")

    def script(self) -> None:
        out = self.out
        pid = self.stack.haproxy_info()["Pid"]
        # Each user has its own source address, as distinct clients on the internet do (and as the 60
        # below): with 3 tasks and 4 users, two of them share a task whatever the addresses are.
        named = [User(name, f"127.1.1.{i + 1}") for i, name in enumerate(("alice", "bob", "carol", "dave"))]
        out("\n1. Four users, three requests each: each stays on one task (the agent sets a cookie)")
        out("   A first visit is placed by HAProxy on the least loaded task (whatever the user's address); "
            "the SWARMID cookie then names that task, so users on one task share it.")
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

        self.second_service(after, crowd)

        info = self.stack.haproxy_info()
        out(f"\n5. HAProxy worker pid {pid} → {info['Pid']}, uptime {info.get('Uptime')}: "
            f"{'no reload' if info['Pid'] == pid else 'RELOADED'}")
        out("\n   haproxy-swarm status:")
        for line in render(collect(f"http://127.0.0.1:{self.ports.metrics}", self.stack.socket)).splitlines():
            out(f"   {line}")
        out(f"\n   traffic:  http://127.0.0.1:{self.ports.traffic}/   (any Host but {API_HOST}: the default "
            f"service {DEMO})")
        out(f"             curl -H 'Host: {API_HOST}' http://127.0.0.1:{self.ports.traffic}/   (the {API} service; "
            f"in a browser http://{API_HOST}:{self.ports.traffic}/)")
        out(f"   stats:    http://127.0.0.1:{self.ports.stats}/   (one backend per service, be_{DEMO} and be_{API}: "
            "every task is a server, with its health)")
        out(f"   metrics:  http://127.0.0.1:{self.ports.metrics}/metrics")
        out(f"   status:   .venv/bin/haproxy-swarm status --metrics http://127.0.0.1:{self.ports.metrics} "
            f"--haproxy-socket {self.stack.socket}")

    def second_service(self, demo_tasks: dict[str, str], crowd: list[User]) -> None:
        """Step 4: the api service beside demo, routed by Host, and a scale-up of api alone."""
        out = self.out
        out(f"\n4. A second service, {API}, behind the same HAProxy: requests with Host: {API_HOST} go to its tasks")
        out(f"   (backend be_{API}, its own ring and table, its own cookie SWARMID_{API}; demo's users never see it)")
        api_users = [User(f"api-user-{i}", f"127.3.0.{i + 1}", headers={"Host": API_HOST}) for i in range(20)]
        first = {u.name: self.visit(u, API) for u in api_users}
        again = {u.name: self.visit(u, API) for u in api_users}
        out(f"   20 users with Host: {API_HOST}: {dict(sorted(Counter(first.values()).items()))}, "
            f"cookies {sorted({name for u in api_users for name in u.cookies})}; sent again, "
            f"{sum(again[n] != first[n] for n in first)} moved")
        other = User("someone", "127.3.1.1", headers={"Host": "www.localhost"})
        out(f"   Host: www.localhost (no line routes it) → {self.visit(other)}, the default service {DEMO}")
        out(f"   Scale {API} up to 4 tasks (only tasks.{API} changes in DNS)")
        out(f"   HAProxy shows 4 {API} tasks UP {self.scale(4, API):.1f}s after the DNS change")
        out(f"   the 20 {API} users: {sum(self.visit(u, API) != first[u.name] for u in api_users)} moved; "
            f"the 60 {DEMO} users: {sum(self.visit(u) != demo_tasks[u.name] for u in crowd)} moved")
        newcomers = users(40, "new-api", network="127.4")
        for u in newcomers:
            u.headers["Host"] = API_HOST
        spread = Counter(self.visit(u, API) for u in newcomers)
        out(f"   40 new {API} users: {dict(sorted(spread.items()))}")
        out(f"   every answer so far came from a task of the service its Host names: "
            f"{self.answers[DEMO]} from {DEMO}'s tasks, {self.answers[API]} from {API}'s")

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
