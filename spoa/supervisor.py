"""`haproxy-swarm run`: HAProxy (master-worker, the shipped config) and the agent, supervised together.

Owns: starting both with one set of settings, waiting until both are ready, restarting the agent if
it dies (HAProxy keeps serving meanwhile: its own balancing takes over), forwarding signals
(SIGTERM/SIGINT → HAProxy soft-stop and agent shutdown; SIGHUP → HAProxy reload) and a clear exit
when HAProxy cannot start. What the container runs, and what the end-to-end tests run as plain
processes. Must not: decide anything about routing or rewrite HAProxy's config.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from spoa import acme
from spoa.config import (
    ConfigError,
    HostPort,
    Settings,
    ondemand_listen,
    pattern_backends,
    service_settings,
    settings_env,
)
from spoa.haproxy import template
from spoa.haproxy.answers import ServerState, parse_servers_state
from spoa.haproxy.errors import RuntimeAPIError
from spoa.haproxy.process import HAProxyError, HAProxyProcess, shipped_config, show_info
from spoa.haproxy.table import write_atomically

log = logging.getLogger("spoa.supervisor")

AGENT_RESTART_MIN = 0.5
AGENT_RESTART_MAX = 10.0
STOP_GRACE = 30.0
FILE_CHECK_INTERVAL = 1.0  # how often SWARM_CONFIG_FILE is read for a change (several services)
SERVERS_SAVE_INTERVAL = 2.0  # how often the agent's servers and their states are saved for a reload


class Supervisor:
    def __init__(self, settings: Settings, ready_timeout: float = 30.0,
                 reload_settings: Callable[[], Settings] | None = None) -> None:
        """`reload_settings`: reads the settings again (SIGHUP, or SWARM_CONFIG_FILE changed), for
        several services; None: the file is not watched."""
        self.settings = settings
        self.ready_timeout = ready_timeout
        self.reload_settings = reload_settings
        env = dict(os.environ) | settings_env(settings) | settings.haproxy_env()
        self.config = Path(settings.haproxy_config or shipped_config()).resolve()
        # Absolute: parsing one SPOE configuration leaves HAProxy's current directory where it started.
        env["SPOE_CONF"] = str(self.config.parent / "spoe.conf")
        env["ONDEMAND_CONF"] = str(self.config.parent / "ondemand.conf")
        # Each service's backend, rendered from the shipped be_app (spoa.haproxy.template) into
        # RUN_DIR, with the servers the agent holds whenever it is rendered again. SERVICES_MAP is in
        # HAProxy's environment from the start, so a reload keeps it.
        self._template = self.config.read_text(encoding="utf-8"), (self.config.parent / "spoe.conf").read_text(
            encoding="utf-8")
        self._rendered: str | None = None
        self._saved_state: str | None = None
        self._next_servers_save = 0.0
        services_config, services_map = self._write_services(settings)
        env["RENDERED"] = "1"
        env["SERVER_STATE_FILE"] = os.path.join(settings.run_dir, template.SERVER_STATE)
        if settings.services:
            env["SERVICES_MAP"] = services_map
            env["ONDEMAND_MAP"] = template.ondemand_map(settings)
            env["ONDEMAND_ADDR"] = str(ondemand_listen(settings))
        extra = [services_config]
        if settings.trusted_proxies:
            os.makedirs(settings.run_dir, exist_ok=True)
            write_atomically(settings.trusted_proxies_file,
                             "".join(f"{net}\n" for net in settings.trusted_proxies).encode())
        self.env = env
        self.haproxy = HAProxyProcess(env, config=str(self.config),
                                      binary=settings.haproxy_bin or None, extra=extra)
        self._services_file = _file_state(settings.config_file) if settings.services else None
        self._next_file_check = 0.0
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
        """The agent accepts SPOP: on AGENT_LISTEN, or with several services on the first one's port
        (AGENT_LISTEN then answers the look-ups of patterns, if there are any)."""
        listen = self.settings.listen
        if self.settings.services:
            configured = service_settings(self.settings)
            listen = configured[0].listen if configured else ondemand_listen(self.settings)
        try:
            with socket.create_connection((listen.host, listen.port), timeout=0.2):
                return True
        except OSError:
            return False

    def _prepare_acme(self) -> None:
        """ACME (spoa.acme): this HAProxy has an ACME client, ACME_DIRECTORY answers, and the
        `acme` section and crt-store are written, for HAProxy to read before haproxy.cfg."""
        if not self.settings.acme_names:
            return
        first, crt_list = acme.prepare(self.settings, self.haproxy.binary, self.settings.run_dir)
        self.haproxy.first = (first,)
        self.haproxy.env["ACME_CRT_LIST"] = self.env["ACME_CRT_LIST"] = crt_list

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

    # ------------------------------------------------------------------ several services

    def _render(self, settings: Settings, servers: Sequence[ServerState]) -> tuple[template.Rendered, list[Settings]]:
        return render_services(*self._template, settings, servers)

    def _write_services(self, settings: Settings, servers: Sequence[ServerState] = ()) -> tuple[str, str]:
        """Render the services' backends, listing `servers` (what HAProxy holds) in each, and write them."""
        rendered, backends = self._render(settings, servers)
        self._rendered = rendered.config
        return template.write(rendered, settings, backends)

    def _save_servers(self) -> None:
        """Save what a reload must start from: the agent's servers into the rendered backends (written
        only when they changed) and every server's state into the server-state file HAProxy loads.
        Before every reload `run` makes, and every SERVERS_SAVE_INTERVAL (for one made by signalling
        HAProxy's master directly). HAProxy not answering: nothing is saved."""
        self._next_servers_save = time.monotonic() + SERVERS_SAVE_INTERVAL
        servers = self._read_servers()
        if servers is None:
            return
        rendered, backends = self._render(self.settings, servers)
        if rendered.config != self._rendered:
            self._rendered = rendered.config
            template.write(rendered, self.settings, backends)

    def _read_servers(self) -> list[ServerState] | None:
        """Every server HAProxy holds, its states saved into the server-state file; None when HAProxy
        does not answer."""
        try:
            answer = self.haproxy.command("show servers state")
            servers = parse_servers_state(answer)
        except (OSError, RuntimeAPIError) as e:
            log.debug("servers not saved: %s", e)
            return None
        if answer != self._saved_state:
            write_atomically(self.env["SERVER_STATE_FILE"], answer.encode())
            self._saved_state = answer
        return servers

    def _reload_haproxy(self) -> None:
        """SIGUSR2 to HAProxy's master, after saving the servers the new worker starts from."""
        self._save_servers()
        os.kill(self.haproxy.pid, signal.SIGUSR2)

    def _services_changed(self) -> bool:
        """SWARM_CONFIG_FILE changed since it was last read (checked once a second)."""
        if self._services_file is None or time.monotonic() < self._next_file_check:
            return False
        self._next_file_check = time.monotonic() + FILE_CHECK_INTERVAL
        return _file_state(self.settings.config_file) != self._services_file

    def _apply_services(self, reload: bool = False) -> None:
        """Read the services again; when they changed, write their backends, reload HAProxy (the old
        worker finishes what it serves; the new one starts from the map files, and from each service's
        DNS fallback until the agent has written its servers back) and restart the agent. A file that
        does not parse, or that HAProxy refuses, changes nothing: the error is logged."""
        assert self.reload_settings is not None
        self._services_file = _file_state(self.settings.config_file)
        try:
            new = self.reload_settings()
        except ConfigError as e:
            log.error("%s: not applied, still routing by the services read before: %s", self.settings.config_file, e)
            if reload:
                self._reload_haproxy()  # the reload asked for, with the services as they were
            return
        if not new.services:
            log.error("%s now names a single service without a route; switching between one service and "
                      "several needs a restart: not applied", self.settings.config_file)
            return
        if new.services == self.settings.services:
            if reload:  # SIGHUP with the same services: the reload asked for (e.g. a renewed TLS_CERT)
                log.info("services unchanged; reloading HAProxy (SIGUSR2 to its master)")
                self._reload_haproxy()
            return
        servers = self._read_servers() or []
        self._write_services(new, servers)
        try:
            self.haproxy.check()
        except HAProxyError as e:
            log.error("HAProxy refuses the services of %s, not applied: %s", self.settings.config_file, e)
            self._write_services(self.settings, servers)
            return
        before = {line.name for line in self.settings.services}
        after = {line.name for line in new.services}
        log.info("services changed (%s): reloading HAProxy and restarting the agent",
                 ", ".join([f"+{n}" for n in sorted(after - before)] + [f"-{n}" for n in sorted(before - after)]
                           + [f"~{line.name}" for line in new.services
                              if line.name in before and line not in self.settings.services]) or "order")
        self.settings = new
        self._reload_haproxy()
        agent, self.agent = self.agent, None
        if agent is not None and agent.poll() is None:
            agent.terminate()
            try:
                agent.wait(timeout=10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(timeout=5)
        self._start_agent()

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
            self._prepare_acme()
        except ConfigError as e:
            log.error("cannot start: %s", e)
            return 1
        try:
            with acme.key_lock(self.settings) if self.settings.acme_names else contextlib.nullcontext():
                self.haproxy.check()  # (its first parse of the `acme` section writes the account key)
                if self.settings.acme_names:
                    self.haproxy.env["ACME_THUMBPRINT"] = self.env["ACME_THUMBPRINT"] = \
                        acme.account_thumbprint(self.settings)
        except HAProxyError as e:
            log.error("HAProxy refuses the configuration %s:\n%s", self.haproxy.config, e)
            return 1
        except ConfigError as e:
            log.error("cannot start: %s", e)
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
            https = f", HTTPS on {self.settings.https_bind}" if self.settings.https else ""
            log.info("ready: HAProxy %s (master pid %d), agent on %s, traffic on %s%s, stats on %s",
                     info.get("Version", "?"), self.haproxy.pid, self.settings.listen,
                     self.env.get("FRONTEND_BIND", "*:8099"), https, self.env.get("STATS_BIND", "*:8888"))
        return self._loop()

    def _loop(self) -> int:
        backoff = AGENT_RESTART_MIN
        restart_at: float | None = None
        started = time.monotonic()
        while self._stop_signal is None:
            if self._reload_requested and self.reload_settings is not None and self.settings.services:
                self._reload_requested = False
                log.info("SIGHUP: reading %s again", self.settings.config_file)
                self._apply_services(reload=True)
            elif self._reload_requested:
                self._reload_requested = False
                log.info("reloading HAProxy (SIGUSR2 to its master)")
                self._reload_haproxy()
            elif self.reload_settings is not None and self._services_changed():
                log.info("%s changed", self.settings.config_file)
                self._apply_services()
            if time.monotonic() >= self._next_servers_save:
                self._save_servers()
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


def _file_state(path: str) -> bytes | None:
    """The file's content (None: unreadable), to notice a change whatever its mtime does (a Swarm or
    Kubernetes config is swapped in by a rename)."""
    try:
        return Path(path).read_bytes()
    except OSError:
        return None


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


def render_services(config: str, spoe: str, settings: Settings,
                    servers: Sequence[ServerState] = ()) -> tuple[template.Rendered, list[Settings]]:
    """The services' backends from the shipped template (`config`, `spoe`), each listing its
    agent-owned `servers`; and the settings of every backend rendered (services, patterns' backends)."""
    services = list(service_settings(settings))
    found = [one for _, backends in pattern_backends(settings) for one in backends]
    by_backend: dict[str, list[ServerState]] = {}
    for server in servers:
        by_backend.setdefault(server.backend, []).append(server)
    rendered = template.render(config, spoe, settings, services, found, servers=by_backend)
    return rendered, [*services, *found]


def rendered_config(settings: Settings) -> str:
    """What `run` gives HAProxy after the shipped haproxy.cfg, as it renders it at start (no servers
    yet: the agent adds them; a later rendering lists them too)."""
    config = Path(settings.haproxy_config or shipped_config()).resolve()
    rendered, _ = render_services(config.read_text(encoding="utf-8"),
                                  (config.parent / "spoe.conf").read_text(encoding="utf-8"), settings)
    path = os.path.join(settings.run_dir, template.SERVICES_CONFIG)
    return f"# haproxy -f {config} -f {path}\n# {path}:\n{rendered.config}"


def run(settings: Settings, reload_settings: Callable[[], Settings] | None = None) -> int:
    return Supervisor(settings, reload_settings=reload_settings).run()
