"""`haproxy-swarm run` as a subprocess: what the container runs (issue 4).

- it reports ready only once both the agent and HAProxy answer;
- it restarts the agent when it dies, and HAProxy goes on serving meanwhile (no reload either);
- SIGTERM: exit 0, and no HAProxy or agent process is left;
- a port already in use: a quick non-zero exit with a message naming the address (and the setting,
  for the agent's own ports), nothing left running;
- a bad setting: exit 2 with a message naming the setting and the value.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence

import pytest
from polling import wait_for

from spoa.haproxy.process import show_info
from spoa.local.client import User
from spoa.local.ports import free_port
from spoa.local.stack import Stack, child_pids

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]




def processes_with(run_dir: str) -> list[int]:
    """HAProxy and agent processes started for `run_dir` (found by RUN_DIR in their environment)."""
    found = []
    marker = f"RUN_DIR={run_dir}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
            if b"haproxy" not in cmdline and b"spoa" not in cmdline:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack(n_slots=3)
    try:
        yield s.start(wait=False)
    finally:
        s.stop()


def test_ready_only_when_the_agent_and_haproxy_both_answer(stack: Stack) -> None:
    wait_for(lambda: "spoa.supervisor: ready:" in stack.log_tail(100_000), "run reports ready")
    log = stack.log_tail(100_000)
    assert log.index("SPOE agent listening on") < log.index("spoa.supervisor: ready:")
    assert listening(stack.agent_port)
    assert show_info(stack.socket)["Pid"]
    stack.wait_up([0, 1, 2])
    assert User("first").get("127.0.0.1", stack.traffic_port).status == 200


def test_a_dead_agent_is_restarted_while_haproxy_serves(stack: Stack) -> None:
    stack.wait_up([0, 1, 2])
    master, worker = stack.haproxy_pid(), stack.haproxy_info()["Pid"]
    user = User("steady", "127.9.0.1")
    for crash in range(2):
        victim = stack.agent_pid()
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        statuses: list[int] = []

        def restarted(victim: int = victim, statuses: list[int] = statuses) -> bool:
            statuses.append(user.get("127.0.0.1", stack.traffic_port).status)  # HAProxy keeps serving
            return stack.agent_pid() not in (None, victim)

        took = wait_for(restarted, f"run restarts the agent (crash {crash + 1})")
        assert statuses and set(statuses) == {200}, statuses
        print(f"\ncrash {crash + 1}: agent restarted after {took:.2f}s, {len(statuses)} requests meanwhile, all 200")
        wait_for(lambda: listening(stack.agent_port), "the new agent listens")
    assert stack.haproxy_pid() == master and stack.haproxy_info()["Pid"] == worker, "HAProxy untouched"
    assert stack.log_tail(100_000).count("agent exited with code -9") == 2


def test_sigterm_exits_0_and_leaves_nothing(stack: Stack) -> None:
    stack.wait_up([0, 1, 2])
    assert stack.proc is not None
    run = stack.proc
    master = stack.haproxy_pid()
    assert master is not None
    pids = [run.pid, master, *child_pids(master), *child_pids(run.pid)]
    assert len(set(pids)) >= 4, pids  # run, its agent, HAProxy's master and a worker
    start = time.monotonic()
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=30) == 0, stack.log_tail()
    took = time.monotonic() - start
    wait_for(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in pids), "every process is gone", 5)
    assert processes_with(stack.run_dir) == []
    for port in (stack.traffic_port, stack.stats_port, stack.agent_port, stack.metrics_port):
        assert not listening(port), port
    print(f"\nSIGTERM: run exited 0 after {took:.2f}s")


def run_env(run_dir: str, **overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("SWARM_SERVICE", "DNS_NAMESERVER", "STICKY_KEY", "DNS_REFRESH", "AGENT_LISTEN"):
        env.pop(name, None)
    return env | {
        "SWARM_SERVICE": "tasks.backend:80",
        "DNS_NAMESERVER": f"127.0.0.1:{free_port()}",  # nothing answers: not needed to start
        "RUN_DIR": run_dir,
        "FRONTEND_BIND": f"127.0.0.1:{free_port()}",
        "STATS_BIND": f"127.0.0.1:{free_port()}",
        "METRICS_LISTEN": f"127.0.0.1:{free_port()}",
        "AGENT_LISTEN": f"127.0.0.1:{free_port()}",
    } | overrides


def run_until_exit(env: dict[str, str], *args: str, timeout: float = 20,
                   wrapper: Sequence[str] = ()) -> tuple[int, str, float]:
    """`run` until it exits: (code, output, seconds). `wrapper`: a command it runs under (setpriv)."""
    start = time.monotonic()
    proc = subprocess.Popen([*wrapper, sys.executable, "-m", "spoa", "run", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"run did not exit within {timeout}s") from None
    return proc.returncode, out.decode(errors="replace"), time.monotonic() - start


@pytest.mark.parametrize("setting", ["FRONTEND_BIND", "STATS_BIND", "AGENT_LISTEN", "METRICS_LISTEN"])
def test_a_port_in_use_stops_run_quickly_with_a_clear_message(setting: str) -> None:
    with tempfile.TemporaryDirectory(prefix="haproxy-swarm-run-") as run_dir, socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, out, took = run_until_exit(run_env(run_dir, **{setting: f"127.0.0.1:{port}"}))
        leftovers = processes_with(run_dir)
    assert code != 0, out
    assert took < 10, f"took {took:.1f}s"
    assert f"127.0.0.1:{port}" in out and "in use" in out.lower(), out
    if setting in ("AGENT_LISTEN", "METRICS_LISTEN"):
        assert setting in out, out
    assert leftovers == [], leftovers


@pytest.mark.parametrize(("env", "args", "named"), [
    ({"DNS_REFRESH": "soon"}, (), "DNS_REFRESH"),
    ({"STICKY_KEY": "cookie:SWARMID,bogus:x"}, (), "STICKY_KEY"),
    ({"DNS_NAMESERVER": "dns.example"}, (), "DNS_NAMESERVER"),
    ({}, ("--listen", "nonsense"), "AGENT_LISTEN (--listen)"),
])
def test_a_bad_setting_exits_2_naming_it(env: dict[str, str], args: tuple[str, ...], named: str) -> None:
    with tempfile.TemporaryDirectory(prefix="haproxy-swarm-run-") as run_dir:
        code, out, _ = run_until_exit(run_env(run_dir, **env), *args, timeout=10)
        assert processes_with(run_dir) == []
    assert code == 2, out
    assert named in out, out
    bad = next(iter(env.values())) if env else args[-1]
    assert repr(bad) in out or bad in out, out
