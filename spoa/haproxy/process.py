"""The HAProxy process: the shipped haproxy.cfg run as a child (what `haproxy-swarm run` supervises).

Owns: locating the shipped config and the haproxy binary (HAPROXY_BIN), starting HAProxy in
master-worker mode with a given environment, waiting until its admin socket answers, reloading it
the way an operator does (SIGUSR2 to the master) and stopping it, or any child, without leaving a
process behind. Product code: `run` uses it, and so do the local kit (spoa/local: the demo and the
tests) and bench/. Must not: change the config (everything varies through environment variables)
or import from spoa/local.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

_INSTALLED_CONFIG = "/etc/haproxy-swarm/haproxy.cfg"
# A server-state file (`show servers state`, format version 1) that lists no server.
EMPTY_SERVER_STATE = ("1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
                      "srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health "
                      "srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord "
                      "srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port\n")


def shipped_config() -> str:
    """The shipped haproxy.cfg: beside the source tree when run from a checkout, else installed."""
    here = Path(__file__).resolve().parents[2] / "haproxy.cfg"
    return str(here) if here.is_file() else _INSTALLED_CONFIG


def haproxy_binary() -> str:
    """The haproxy binary to run: HAPROXY_BIN when set (tests select the HAProxy version with it),
    else `haproxy` on PATH (Debian installs it in /usr/sbin)."""
    return os.environ.get("HAPROXY_BIN") or shutil.which("haproxy") or "/usr/sbin/haproxy"


def haproxy_version(binary: str | None = None) -> tuple[int, int]:
    """(major, minor) of the haproxy binary, from `haproxy -v`: tests assert each version's behaviour
    where 2.6 and 3.x differ (docs/runtime-api.md, docs/protocol.md)."""
    out = subprocess.run([binary or haproxy_binary(), "-v"], capture_output=True, text=True,
                         timeout=10, check=True).stdout
    words = out.split()
    version = words[words.index("version") + 1] if "version" in words else ""
    major, minor = version.split(".")[:2]
    return int(major), int(minor)


def admin_command(socket_path: str, command: str, timeout: float = 5.0) -> str:
    """Send one command on the admin socket and return the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(socket_path)
        s.sendall(command.encode() + b"\n")
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode(errors="replace")


def show_info(socket_path: str) -> dict[str, str]:
    info = {}
    for line in admin_command(socket_path, "show info").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


class HAProxyError(RuntimeError):
    pass


def stop_process(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """Terminate `proc` and wait; after `grace` seconds kill it (and its group when it leads one)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(proc.pid) == proc.pid:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        proc.wait(timeout=grace)


def process_alive(pid: int) -> bool:
    """True while process `pid` exists and is not a zombie waiting for its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class HAProxyProcess:
    """`haproxy -W -db -f <config>` with `env` on top of this process's environment."""

    def __init__(self, env: Mapping[str, str], config: str | None = None,
                 binary: str | None = None, log_path: str | None = None, extra: Sequence[str] = (),
                 first: Sequence[str] = ()) -> None:
        """`extra`: config files read after `config` (several services: their backends, spoa.haproxy.template);
        `first`: read before it (ACME's crt-store, spoa.acme: declared before the bind that uses it)."""
        self.config = config or shipped_config()
        self.extra = tuple(extra)
        self.first = tuple(first)
        self.env = dict(os.environ) | dict(env)
        self.binary = binary or self.env.get("HAPROXY_BIN") or haproxy_binary()
        self.socket_path = self.env.get("HAPROXY_SOCKET") or os.path.join(
            self.env.get("RUN_DIR", "/var/run/haproxy-swarm"), "admin.sock")
        # HAProxy logs to stderr; a file (not an unread pipe) so it can never block on a full pipe.
        self.log_path = log_path or os.path.join(self.env.get("RUN_DIR", "/var/run/haproxy-swarm"),
                                                 "haproxy.log")
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: int | None = None

    def prepare(self) -> None:
        """Create the run directory and the (empty) maps HAProxy expects at start: the cookie map and
        the decision table's maps (a file already there is kept: a restart starts from its table).

        The maps are the ones in RUN_DIR unless the environment names others: the shipped config's
        own defaults (the read-only empty maps beside it) are for `haproxy -c` alone, not for a
        running HAProxy whose maps the agent keeps current."""
        run_dir = self.env.get("RUN_DIR", "/var/run/haproxy-swarm")
        os.makedirs(run_dir, exist_ok=True)
        for var, name in (("COOKIE_MAP", "cookies.map"), ("SLOT_MAP", "slots.map"),
                          ("SERVER_COOKIE_MAP", "server-cookies.map")):
            path = self.env.setdefault(var, os.path.join(run_dir, name))
            if not os.path.exists(path):
                Path(path).touch()
        # No server state saved yet: a file of no server (HAProxy warns about a missing or empty one).
        state = self.env.setdefault("SERVER_STATE_FILE", os.path.join(run_dir, "servers.state"))
        if not os.path.exists(state):
            Path(state).write_text(EMPTY_SERVER_STATE, encoding="utf-8")

    def check(self) -> None:
        """`haproxy -c`: raise HAProxyError with HAProxy's own message when the config is refused."""
        self.prepare()
        res = subprocess.run([self.binary, "-c", *self._config_args()], env=self.env,
                             capture_output=True, timeout=30)
        if res.returncode != 0:  # (not -q: 3.4 then prints nothing at all on failure)
            out = (res.stderr + res.stdout).decode(errors="replace")
            alerts = [line for line in out.splitlines() if "ALERT" in line] or out.strip().splitlines()
            raise HAProxyError("\n".join(alerts) or "haproxy -c failed")

    def start(self, timeout: float = 15.0) -> HAProxyProcess:
        self.prepare()
        self._log_file = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        stderr = self._log_file
        self.proc = subprocess.Popen(
            [self.binary, "-W", "-db", *self._config_args()], env=self.env,
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise HAProxyError(f"haproxy exited at start (code {self.proc.returncode}): {self._tail()}")
            try:
                show_info(self.socket_path)
                return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise HAProxyError(f"haproxy did not answer on {self.socket_path} within {timeout}s")

    def _config_args(self) -> list[str]:
        return [arg for path in (*self.first, self.config, *self.extra) for arg in ("-f", path)]

    def _tail(self) -> str:
        if os.path.exists(self.log_path):
            return Path(self.log_path).read_text(errors="replace").strip()[-2000:]
        return ""

    @property
    def pid(self) -> int:
        """The master's pid."""
        assert self.proc is not None
        return self.proc.pid

    def worker_pid(self) -> int:
        return int(show_info(self.socket_path)["Pid"])

    def command(self, command: str) -> str:
        return admin_command(self.socket_path, command)

    def reload(self, timeout: float = 15.0) -> int:
        """Reload like an operator (SIGUSR2 to the master); return the new worker's pid once the old
        worker has exited (it has no connection left to finish).

        The admin socket's listener is shared by both workers (`expose-fd listeners`): until the old
        worker has processed its soft-stop, a connection may still reach it after the new one answered.
        """
        old = self.worker_pid()
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        new: int | None = None
        while time.monotonic() < deadline:
            if new is None:
                try:
                    pid = self.worker_pid()
                    new = pid if pid != old else None
                except (OSError, KeyError, ValueError):
                    pass
            if new is not None and not process_alive(old):
                return new
            time.sleep(0.02)
        raise HAProxyError(f"haproxy did not reload within {timeout}s "
                           f"({'the old worker still runs' if new else 'no new worker'})")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            stop_process(proc)
        if self._log_file is not None:
            os.close(self._log_file)
            self._log_file = None

    def __enter__(self) -> HAProxyProcess:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
