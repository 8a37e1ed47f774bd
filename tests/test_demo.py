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
    assert "A first visit goes where the hash of the user's source address points" in out
    assert re.search(r"users on task-1/task-2: \d+, of whom moved: 0", out)
    spread = re.search(r"60 new users: \{(.*)\}", out)
    assert spread and "'task-4'" in spread.group(1) and "'task-5'" in spread.group(1)
    assert ": no reload" in out
    assert "127.0.0.2_" in out  # the status table lists the members
    for port in ports:  # everything it started is gone: nothing listens on its ports any more
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not a listener
            s.bind(("127.0.0.1", port))
