"""`haproxy-swarm run`: HAProxy (master-worker, the shipped config) and the agent, supervised together.

Owns: starting both with one set of settings, waiting until both are ready, restarting the agent if
it dies (HAProxy keeps serving meanwhile: its own balancing takes over), forwarding signals
(SIGTERM/SIGINT → HAProxy soft-stop and agent shutdown; SIGHUP → HAProxy reload) and a clear exit
when HAProxy cannot start. What the container runs, and what the end-to-end tests run as plain
processes. Must not: decide anything about routing or rewrite HAProxy's config.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from spoa.config import HostPort, Settings, settings_env
from spoa.haproxy.process import HAProxyError, HAProxyProcess, shipped_config, show_info

log = logging.getLogger("spoa.supervisor")

AGENT_RESTART_MIN = 0.5
AGENT_RESTART_MAX = 10.0
STOP_GRACE = 30.0


class Supervisor:
    def __init__(self, settings: Settings, ready_timeout: float = 30.0) -> None:
        self.settings = settings
        self.ready_timeout = ready_timeout
        env = dict(os.environ) | settings_env(settings) | settings.haproxy_env()
        self.env = env
        self.haproxy = HAProxyProcess(env, config=settings.haproxy_config or shipped_config(),
                                      binary=settings.haproxy_bin or None)
        self.agent: subprocess.Popen[bytes] | None = None
        self._stop_signal: int | None = None
        self._reload_requested = False
        self.agent_restarts = 0

    # ------------------------------------------------------------------ children

    def _start_agent(self) -> None:
        self.agent = subprocess.Popen([sys.executable, "-m", "spoa", "agent"], env=self.env,
                                      stdin=subprocess.DEVNULL)
        log.info("agent started (pid %d)", self.agent.pid)

    def _agent_listening(self) -> bool:
        listen = self.settings.listen
        try:
            with socket.create_connection((listen.host, listen.port), timeout=0.2):
                return True
        except OSError:
            return False

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._stop_signal is not None:
                return
            if self.agent is not None and self.agent.poll() is not None:
                raise RuntimeError(f"the agent exited at start with code {self.agent.returncode}")
            if self._agent_listening():
                try:
                    show_info(self.haproxy.socket_path)
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise RuntimeError(f"not ready within {self.ready_timeout:g}s (agent on {self.settings.listen}, "
                           f"HAProxy socket {self.haproxy.socket_path})")

    # ------------------------------------------------------------------ signals

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self._reload_requested = True

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        for name, address in (("AGENT_LISTEN", self.settings.listen),
                              ("METRICS_LISTEN", self.settings.metrics_listen)):
            problem = _cannot_listen(address)
            if problem:
                # Checked before anything starts: with a foreign listener there, the agent's port would
                # seem to answer and HAProxy would send its SPOP frames to that other program.
                log.error("cannot start: %s %s: %s", name, address, problem)
                return 1
        try:
            self.haproxy.check()
        except HAProxyError as e:
            log.error("HAProxy refuses the configuration %s:\n%s", self.haproxy.config, e)
            return 1
        self._start_agent()
        try:
            self.haproxy.start(timeout=self.ready_timeout)
            self._wait_ready()
        except (HAProxyError, RuntimeError) as e:
            log.error("could not start: %s", e)
            self._shutdown()
            return 1
        if self._stop_signal is None:
            info = show_info(self.haproxy.socket_path)
            https = f", HTTPS on {self.settings.https_bind}" if self.settings.tls_cert else ""
            log.info("ready: HAProxy %s (master pid %d), agent on %s, traffic on %s%s, stats on %s",
                     info.get("Version", "?"), self.haproxy.pid, self.settings.listen,
                     self.env.get("FRONTEND_BIND", "*:8099"), https, self.env.get("STATS_BIND", "*:8888"))
        return self._loop()

    def _loop(self) -> int:
        backoff = AGENT_RESTART_MIN
        restart_at: float | None = None
        started = time.monotonic()
        while self._stop_signal is None:
            if self._reload_requested:
                self._reload_requested = False
                log.info("reloading HAProxy (SIGUSR2 to its master)")
                os.kill(self.haproxy.pid, signal.SIGUSR2)
            proc = self.haproxy.proc
            if proc is None or proc.poll() is not None:
                code = proc.returncode if proc is not None else -1
                log.error("HAProxy exited (code %s); stopping. Its log: %s", code, self.haproxy.log_path)
                self._shutdown()
                return 1
            if self.agent is not None and self.agent.poll() is not None:
                log.warning("agent exited with code %s; HAProxy balances on its own until it is back; "
                            "restarting in %.1fs", self.agent.returncode, backoff)
                self.agent = None
                restart_at = time.monotonic() + backoff
            if self.agent is None and restart_at is not None and time.monotonic() >= restart_at:
                self._start_agent()
                self.agent_restarts += 1
                started = time.monotonic()
                restart_at = None
                backoff = min(backoff * 2, AGENT_RESTART_MAX)
            elif self.agent is not None and backoff > AGENT_RESTART_MIN and time.monotonic() - started > 60:
                backoff = AGENT_RESTART_MIN  # it has stayed up a minute: forget earlier crashes
            time.sleep(0.1)
        log.info("received %s: stopping HAProxy (soft-stop) and the agent",
                 signal.Signals(self._stop_signal).name)
        self._shutdown()
        return 0

    def _shutdown(self) -> None:
        agent, self.agent = self.agent, None
        if agent is not None and agent.poll() is None:
            agent.terminate()
        proc = self.haproxy.proc
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGUSR1)  # soft-stop: finish what is in flight
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                log.warning("HAProxy still busy after %.0fs; stopping it hard", STOP_GRACE)
        self.haproxy.stop()
        if agent is not None:
            try:
                agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(timeout=5)


def _cannot_listen(address: HostPort) -> str | None:
    """Why a TCP listener cannot be opened on `address` right now (e.g. in use), or None."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the agent does: TIME_WAIT is no obstacle
        try:
            s.bind((address.host, address.port))
        except OSError as e:
            return (e.strerror or str(e)).lower()
    return None


def run(settings: Settings) -> int:
    return Supervisor(settings).run()
