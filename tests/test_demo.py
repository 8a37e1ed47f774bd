"""`haproxy-swarm demo` runs its walk-through end to end and leaves nothing behind."""

from __future__ import annotations

import re
import socket
import subprocess
import sys

import pytest

from spoa.local.ports import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


def test_demo_walks_through_scale_up_and_down_and_cleans_up() -> None:
    ports = [free_port(), free_port(), free_port()]
    res = subprocess.run(
        [sys.executable, "-m", "spoa", "demo", "--no-wait", "--traffic-port", str(ports[0]),
         "--stats-port", str(ports[1]), "--metrics-port", str(ports[2])],
        capture_output=True, text=True, timeout=100)
    out = res.stdout
    assert res.returncode == 0, res.stderr + out
    assert "the 60 users with a cookie: 0 moved" in out
    # Issue 13, item 3: each named user has its own source address, one line says what decides a
    # first visit, and the cookie is the task's (users on one task share it, users on two do not).
    named = re.findall(r"^\s+(alice|bob|carol|dave)\s+from (\S+)\s+→ (task-\d), \3, \3\s+\(SWARMID=(\w+)\)$",
                       out, re.MULTILINE)
    assert [n for n, *_ in named] == ["alice", "bob", "carol", "dave"], out
    assert len({source for _, source, _, _ in named}) == 4
    assert len({(task, cookie) for _, _, task, cookie in named}) == len({task for _, _, task, _ in named}) \
        == len({cookie for *_, cookie in named})
    assert "A first visit is placed by HAProxy on the least loaded task" in out
    assert re.search(r"users on task-1/task-2: \d+, of whom moved: 0", out)
    spread = re.search(r"60 new users: \{(.*)\}", out)
    assert spread and "'task-4'" in spread.group(1) and "'task-5'" in spread.group(1)
    assert ": no reload" in out
    assert "127.0.10.2_" in out  # the status table lists the members
    # Issue 12: a second service, api, routed by Host: its own tasks, cookie and backend; scaling it
    # moves no user of either service, and every answer came from the service the Host names (the
    # demo stops with an error on any other answer).
    api = re.search(r"20 users with Host: api\.localhost: \{(.*)\}, cookies \['SWARMID_api'\]; sent again, 0 moved",
                    out)
    assert api and set(re.findall(r"'(api-\d)'", api.group(1))) == {"api-1", "api-2"}, out
    assert "Host: www.localhost (no line routes it) → task-" in out
    assert re.search(r"HAProxy shows 4 api tasks UP [\d.]+s after the DNS change", out)
    assert "the 20 api users: 0 moved; the 60 demo users: 0 moved" in out
    new_api = re.search(r"40 new api users: \{(.*)\}", out)
    assert new_api and "'api-3'" in new_api.group(1) and "'api-4'" in new_api.group(1)
    assert re.search(r"every answer so far came from a task of the service its Host names: \d+ from demo's tasks, "
                     r"\d+ from api's", out)
    assert "service tasks.api:" in out and "-> backend be_api" in out and "127.0.11.5_" in out
    assert "-> backend be_demo" in out
    for port in ports:  # everything it started is gone: nothing listens on its ports any more
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not a listener
            s.bind(("127.0.0.1", port))
