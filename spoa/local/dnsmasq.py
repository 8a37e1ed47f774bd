"""A real dnsmasq on a loopback port, serving names from a hosts file it writes (demo and tests).

Owns: the dnsmasq command line (nothing from /etc: no dnsmasq.conf, no /etc/hosts, no upstream;
names it does not hold answer NXDOMAIN), its hosts file, changing the names the way an operator does
(rewrite + SIGHUP) and waiting until the new answer is served, SRV records (`--srv-host`, which
dnsmasq only reads at start, so changing them restarts it on the same port), freezing it for outage
tests (SIGSTOP/SIGCONT), and stopping it without leaving a process behind.

Must not: be used in production, or listen anywhere but the loopback address it was given.

    with Dnsmasq({"tasks.backend": ["127.0.0.2", "127.0.0.3"]}) as dns_server:
        dns_server.address          # HostPort("127.0.0.1", <free port>)
        dns_server.set_hosts({"tasks.backend": ["127.0.0.2"]})   # served when this returns
"""

from __future__ import annotations

import contextlib
import ctypes
import grp
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from spoa.config import HostPort
from spoa.local.ports import free_tcp_udp_port

Hosts = Mapping[str, Iterable[str]]  # name → IPs (v4 and/or v6)
SrvRecords = Mapping[str, Iterable[tuple[str, int]]]  # _svc._proto.name → (target, port) pairs

_PR_SET_PDEATHSIG = 1


class DnsmasqError(RuntimeError):
    """dnsmasq did not start, died, or did not serve what it was given in time."""


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: the kernel kills dnsmasq when the thread that started it ends, even by SIGKILL, so a
    # killed test run leaves nothing behind. Only set when started from the main thread (see _spawn).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _normalise_hosts(hosts: Hosts) -> dict[str, tuple[str, ...]]:
    """Lower-case names → canonical IPs, in the order given (the hosts file keeps that order)."""
    table: dict[str, dict[str, None]] = {}
    for name, ips in hosts.items():
        key = name.rstrip(".").lower()
        if not key or any(c.isspace() or c == "#" for c in key):
            raise ValueError(f"invalid host name {name!r}")
        row = table.setdefault(key, {})
        for ip in ips:
            row[ipaddress.ip_address(ip).compressed] = None  # ValueError names the bad value
    return {name: tuple(row) for name, row in table.items()}


def _normalise_srv(srv: SrvRecords) -> dict[str, tuple[tuple[str, int], ...]]:
    table: dict[str, tuple[tuple[str, int], ...]] = {}
    for name, records in srv.items():
        key = name.rstrip(".").lower()
        if not key.startswith("_") or any(c.isspace() or c == "," for c in key):
            raise ValueError(f"invalid SRV name {name!r}; expected e.g. _http._tcp.backend")
        rows = []
        for target, port in records:
            if any(c.isspace() or c == "," for c in target) or not 0 < port < 65536:
                raise ValueError(f"invalid SRV record {target!r}:{port!r} for {name!r}")
            rows.append((target.rstrip(".").lower(), port))
        table[key] = tuple(dict.fromkeys(rows))  # in the order given
    return table


class Dnsmasq:
    """One dnsmasq child process. Use as a context manager, or call `start()` and `stop()`."""

    def __init__(
        self,
        hosts: Hosts | None = None,
        *,
        srv: SrvRecords | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        workdir: str | None = None,
        binary: str | None = None,
        edns_packet_max: int | None = None,
    ) -> None:
        """`port` 0 picks a free one. `host` must be an address of a local interface (127.0.0.1, ::1)."""
        ipaddress.ip_address(host)
        self.host = host
        self.port = port
        self.binary = binary or shutil.which("dnsmasq") or "/usr/sbin/dnsmasq"
        self.edns_packet_max = edns_packet_max
        self._hosts = _normalise_hosts(hosts or {})
        self._srv = _normalise_srv(srv or {})
        self._own_workdir = workdir is None
        self.workdir = workdir or ""
        self.proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], Dnsmasq] | None = None
        self._paused = False
        self._probe_name = f"ready-{secrets.token_hex(6)}.haproxy-swarm.invalid"

    # ------------------------------------------------------------------ paths and state

    @property
    def address(self) -> HostPort:
        """Where it answers (UDP and TCP): what `DNS_NAMESERVER` should be."""
        return HostPort(self.host, self.port)

    @property
    def hosts_path(self) -> str:
        return os.path.join(self.workdir, "hosts")

    @property
    def log_path(self) -> str:
        return os.path.join(self.workdir, "dnsmasq.log")

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise DnsmasqError("dnsmasq is not running")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def hosts(self) -> dict[str, frozenset[str]]:
        """What it serves now: name → IPs."""
        return {name: frozenset(ips) for name, ips in self._hosts.items()}

    # ------------------------------------------------------------------ life cycle

    def start(self, timeout: float = 10.0) -> Dnsmasq:
        """Start and wait until it answers; with port 0, retry on another port if one was taken."""
        if self.proc is not None:
            raise DnsmasqError("dnsmasq is already running")
        if not self.workdir:
            self.workdir = tempfile.mkdtemp(prefix="haproxy-swarm-dnsmasq-")
        self._write_hosts()
        pick = self.port == 0
        for _attempt in range(5 if pick else 1):
            if pick:
                self.port = free_tcp_udp_port(self.host)
            try:
                self._spawn(timeout)
                return self
            except _PortTaken:
                if not pick:
                    raise DnsmasqError(f"port {self.port} on {self.host} is taken: {self._log_tail()}") from None
                self.port = 0
        raise DnsmasqError(f"no free port for dnsmasq on {self.host}")

    def stop(self) -> None:
        """Stop dnsmasq (SIGTERM, then SIGKILL after 5 s) and remove the files it was given.

        The port is kept: `start()` again serves on the same port (a DNS server that was down)."""
        self._terminate()
        if self._own_workdir and self.workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = ""

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start again on the same port (what a DNS server restart looks like)."""
        if self.proc is None:
            raise DnsmasqError("dnsmasq is not running")
        self._terminate()
        self._spawn(timeout)

    def pause(self) -> None:
        """Freeze the process (SIGSTOP): queries go unanswered until `resume()`."""
        os.kill(self.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self, timeout: float = 10.0) -> None:
        """Continue a paused dnsmasq; return once it answers again."""
        os.kill(self.pid, signal.SIGCONT)
        self._paused = False
        self._wait_answering(timeout)

    def __enter__(self) -> Dnsmasq:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ------------------------------------------------------------------ changing what it serves

    def set_hosts(self, hosts: Hosts, timeout: float = 5.0) -> None:
        """Serve exactly `hosts` (names not given any more answer NXDOMAIN); returns once served.

        The hosts file lists the addresses in the order given."""
        new = _normalise_hosts(hosts)
        old, self._hosts = self._hosts, new
        self._write_hosts()
        if self.proc is None:
            return
        os.kill(self.pid, signal.SIGHUP)
        self._wait_served({name: frozenset(new.get(name, ())) for name in old.keys() | new.keys()}, timeout)

    def set_srv(self, srv: SrvRecords, timeout: float = 10.0) -> None:
        """Serve exactly these SRV records; dnsmasq reads them only at start, so this restarts it."""
        self._srv = _normalise_srv(srv)
        if self.proc is not None:
            self.restart(timeout)

    def query(self, name: str, rdtype: str = "A", timeout: float = 2.0) -> frozenset[str]:
        """What it serves for `name` now, over TCP (whole answers): IPs, or `target:port` for SRV."""
        kind = dns.rdatatype.from_text(rdtype)
        reply = dns.query.tcp(dns.message.make_query(name, kind), self.host, timeout=timeout,
                              port=self.port)
        if reply.rcode() != dns.rcode.NOERROR:
            return frozenset()
        out: set[str] = set()
        for rrset in reply.answer:
            if rrset.rdtype != kind:
                continue
            for rdata in rrset:
                if kind == dns.rdatatype.SRV:
                    out.add(f"{str(rdata.target).rstrip('.')}:{rdata.port}")
                else:
                    out.add(ipaddress.ip_address(rdata.address).compressed)
        return frozenset(out)

    # ------------------------------------------------------------------ internals

    def _command(self) -> list[str]:
        cmd = [
            self.binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",  # nothing from /etc/dnsmasq.conf
            "--no-hosts",  # nothing from /etc/hosts
            "--no-resolv",
            "--no-poll",
            "--local=/#/",  # no upstream: names it does not hold answer NXDOMAIN, not REFUSED
            f"--addn-hosts={self.hosts_path}",
            f"--port={self.port}",
            f"--listen-address={self.host}",
            "--bind-interfaces",
            "--pid-file=",
            "--log-facility=-",
        ]
        if os.geteuid() == 0:
            # dnsmasq would drop to `nobody`, who cannot read our private working directory.
            cmd += ["--user=root", f"--group={grp.getgrgid(0).gr_name}"]
        if self.edns_packet_max is not None:
            cmd.append(f"--edns-packet-max={self.edns_packet_max}")
        for name, records in self._srv.items():
            cmd += [f"--srv-host={name},{target},{port}" for target, port in records]
        return cmd

    def _spawn(self, timeout: float) -> None:
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            # The death signal follows the starting *thread*: from a worker thread (asyncio.to_thread)
            # it would kill dnsmasq when that thread ends, so there only the finalizer guards.
            main = threading.current_thread() is threading.main_thread()
            proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True, preexec_fn=_die_with_parent if main else None)
        finally:
            os.close(log)
        self.proc = proc
        self._paused = False
        self._finalizer = weakref.finalize(self, _kill, proc)
        try:
            self._wait_answering(timeout)
        except BaseException:
            self._terminate()
            raise

    def _wait_answering(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        # Our own name: an answer from another server that holds the port does not count.
        probe = dns.message.make_query(self._probe_name, dns.rdatatype.A)
        while True:
            code = self.proc.poll()
            if code is not None:
                tail = self._log_tail()
                if "Address already in use" in tail:
                    raise _PortTaken(tail)
                raise DnsmasqError(f"dnsmasq exited at start (code {code}): {tail}")
            try:
                reply = dns.query.udp(probe, self.host, timeout=0.1, port=self.port)
                if reply.rcode() == dns.rcode.NOERROR and reply.answer:
                    return
            except (dns.exception.DNSException, OSError):
                pass
            if time.monotonic() > deadline:
                raise DnsmasqError(f"dnsmasq did not answer on {self.address} within {timeout}s: "
                                   f"{self._log_tail()}")
            time.sleep(0.01)

    def _wait_served(self, expected: Mapping[str, frozenset[str]], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = dict(expected)
        last_error = ""
        while pending:
            if not self.running:
                raise DnsmasqError(f"dnsmasq died: {self._log_tail()}")
            for name, ips in list(pending.items()):
                try:
                    served = self.query(name, "A") | self.query(name, "AAAA")
                except (dns.exception.DNSException, OSError) as e:
                    last_error = f"{type(e).__name__}: {e}"
                    continue
                if served == ips:
                    del pending[name]
            if not pending:
                return
            if time.monotonic() > deadline:
                name = next(iter(pending))
                raise DnsmasqError(f"dnsmasq did not serve the new addresses of {name} within {timeout}s"
                                   f"{'; ' + last_error if last_error else ''}")
            time.sleep(0.01)

    def _write_hosts(self) -> None:
        lines = [f"{ip} {name}\n" for name, ips in self._hosts.items() for ip in ips]
        lines.append(f"127.0.0.1 {self._probe_name}\n")
        tmp = self.hosts_path + ".new"
        Path(tmp).write_text("".join(lines), encoding="ascii")
        os.replace(tmp, self.hosts_path)  # dnsmasq never reads a half-written file

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                if self._paused:
                    proc.send_signal(signal.SIGCONT)  # a stopped process does not act on SIGTERM
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _kill(proc)
        self._paused = False

    def _log_tail(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace").strip()[-2000:]
        except OSError:
            return ""


class _PortTaken(DnsmasqError):
    pass
