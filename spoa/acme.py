"""Certificates from ACME through HAProxy's own ACME client, and certificate files kept current
without a reload.

Owns: what `run` prepares before HAProxy starts (the check that this HAProxy has an ACME client, the
check that ACME_DIRECTORY answers, the `acme` section and `crt-store` HAProxy reads before the
shipped haproxy.cfg, the account key and its thumbprint), and the agent's `Certificates` task:
  - ordering: HAProxy's own scheduler is off (`acme.scheduler off`); the replica that holds the lease
    in ACME_DIR (a file every replica sees: one replica orders, never all of them) asks HAProxy for
    a certificate (`acme renew`) when one is missing or has less than a third of its validity left,
    waits for the task to end (`acme status`), and on success writes the new certificate and key
    (`dump ssl cert`) into ACME_DIR/certs, atomically. A failure is logged and counted and retried
    after ACME_RETRY seconds, doubled on each failure up to an hour; the certificate served stays.
  - loading: every replica (the orderer too) loads a file in ACME_DIR/certs, or TLS_CERT, whose
    content changed into HAProxy with `set ssl cert` / `commit ssl cert`: no reload, no connection
    lost, the new certificate served to new handshakes at once.
  - the HTTP-01 answer is HAProxy's (haproxy.cfg): `<token>.<thumbprint>` for any token, so the CA's
    request may reach any replica.
  - metrics: each certificate's expiry, names, renewals and failures, leadership.
Must not: sit on the request path, or hold anything HAProxy does not also hold (a restart starts
from ACME_DIR).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import socket
import ssl
import subprocess
import time
from calendar import timegm
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from spoa.acme_key import AccountKeyError, thumbprint
from spoa.config import ConfigError, Settings
from spoa.haproxy.process import admin_command

log = logging.getLogger("spoa.acme")

SECTION = "haproxy_swarm"  # the `acme` section's name
STORE = "acme"  # the crt-store's name: certificates are `@acme/<name>.pem`
PREFIX = "haproxy_swarm_"
RETRY_MAX = 3600.0
LEASE_TTL = 30.0  # seconds a lease lasts unless its holder renews it
CHECK_INTERVAL = 1.0  # how often files, lease and HAProxy's certificates are looked at
RENEW_FRACTION = 3  # renew when less than 1/RENEW_FRACTION of the validity is left
DIRECTORY_TIMEOUT = 5.0


def certs_dir(settings: Settings) -> str:
    return os.path.join(settings.acme_dir, "certs")


def account_key(settings: Settings) -> str:
    return os.path.join(settings.acme_dir, "account.key")


def cert_ref(name: str) -> str:
    return f"@{STORE}/{name}.pem"


# --------------------------------------------------------------------------- before HAProxy starts


def has_acme_client(binary: str) -> tuple[bool, str]:
    """(True, version) when `haproxy -vv` lists +ACME in its features; (False, version) otherwise."""
    out = subprocess.run([binary, "-vv"], capture_output=True, text=True, timeout=10).stdout
    words = out.split()
    version = words[words.index("version") + 1] if "version" in words else "?"
    return "+ACME" in words, version


def check_directory(settings: Settings, timeout: float = DIRECTORY_TIMEOUT) -> None:
    """ACME_DIRECTORY answers as HAProxy will reach it: its host resolved through DNS_NAMESERVER
    (HAProxy's httpclient uses the same nameserver), then an HTTPS GET verified by ACME_CA_FILE (or
    the system's CAs), and the answer is an ACME directory (newNonce, newAccount, newOrder).
    ConfigError naming the setting otherwise."""
    url = settings.acme_directory
    rest = url.removeprefix("https://")
    hostport, _, path = rest.partition("/")
    host, port = hostport, 443
    if hostport.startswith("["):
        host, _, after = hostport[1:].partition("]")
        port = int(after[1:]) if after.startswith(":") else 443
    elif ":" in hostport:
        host, port_text = hostport.rsplit(":", 1)
        port = int(port_text)
    where = f"ACME_DIRECTORY (--acme-directory): {url}"
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        address = _resolve(host, settings, where)
    context = ssl.create_default_context(cafile=settings.acme_ca_file or None)
    try:
        with socket.create_connection((address, port), timeout=timeout) as raw, \
                context.wrap_socket(raw, server_hostname=host) as tls:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
            conn.sock = tls
            conn.request("GET", "/" + path, headers={"Host": hostport, "User-Agent": "haproxy-swarm"})
            reply = conn.getresponse()
            body = reply.read(1 << 20)
    except ssl.SSLError as e:
        ca = f"ACME_CA_FILE {settings.acme_ca_file}" if settings.acme_ca_file else "the system's CAs (ACME_CA_FILE)"
        raise ConfigError(f"{where}: TLS with {address}:{port} failed ({e.reason or e}); "
                          f"checked against {ca}") from None
    except OSError as e:
        raise ConfigError(f"{where} cannot be reached: {address}:{port}: {e.strerror or e}") from None
    if reply.status != 200:
        raise ConfigError(f"{where} answered HTTP {reply.status}, not an ACME directory")
    try:
        directory = json.loads(body)
        missing = [k for k in ("newNonce", "newAccount", "newOrder") if k not in directory]
    except (ValueError, TypeError):
        missing = ["(not JSON)"]
    if missing:
        raise ConfigError(f"{where} is not an ACME directory: missing {', '.join(missing)}")


def _resolve(host: str, settings: Settings, where: str) -> str:
    import dns.exception
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [settings.nameserver.host]
    resolver.port = settings.nameserver.port
    try:
        answer = resolver.resolve(host, "A", lifetime=DIRECTORY_TIMEOUT)
        return str(answer[0])
    except dns.exception.DNSException as e:
        raise ConfigError(f"{where} cannot be reached: {host} does not resolve through DNS_NAMESERVER "
                          f"{settings.nameserver} ({e.__class__.__name__})") from None


def render(settings: Settings) -> str:
    """The configuration HAProxy reads before haproxy.cfg: the `acme` section and the `crt-store`
    (a certificate must be declared before the bind that uses it)."""
    lines = [
        "# Written by haproxy-swarm run (spoa.acme) from its settings; read before haproxy.cfg.",
        "global",
        "    expose-experimental-directives",
        "    # The agent orders and renews (spoa.acme.Certificates): one replica, not each of them.",
        "    acme.scheduler off",
        "    # The CA is reached through the nameserver of the service's DNS (resolvers swarmdns).",
        "    httpclient.resolvers.id swarmdns",
        "    httpclient.resolvers.prefer ipv4",
    ]
    if settings.acme_ca_file:
        lines.append(f'    httpclient.ssl.ca-file "{settings.acme_ca_file}"')
    lines += ["", f"acme {SECTION}", f'    directory "{settings.acme_directory}"',
              f'    account-key "{account_key(settings)}"', "    challenge http-01"]
    if settings.acme_email:
        lines.append(f'    contact "{settings.acme_email}"')
    lines += ["", f"crt-store {STORE}", f'    crt-base "{certs_dir(settings)}"']
    for name in settings.acme_names:
        lines.append(f'    load crt "{name}.pem" acme {SECTION} domains "{name}"')
    return "\n".join(lines) + "\n"


def prepare(settings: Settings, binary: str, run_dir: str) -> tuple[str, str]:
    """Everything before HAProxy's start: (the config file to read first, the crt-list). ConfigError
    names the setting when this HAProxy has no ACME client, ACME_DIR is not writable or
    ACME_DIRECTORY does not answer (unless every certificate is already in ACME_DIR: a CA outage
    must not stop a restart that orders nothing)."""
    names = settings.acme_names
    ok, version = has_acme_client(binary)
    what = "ACME_DOMAINS (--acme-domains)" if settings.acme_domains else "tls=acme in SWARM_CONFIG_FILE"
    if not ok:
        raise ConfigError(f"{what} asks for certificates from ACME, but HAProxy {version} ({binary}) has no "
                          "ACME client (`haproxy -vv` lists no +ACME; HAProxy 3.4, the image's, has one). "
                          "Leave ACME_DOMAINS empty and tls=acme out, or give a certificate with TLS_CERT")
    try:
        os.makedirs(certs_dir(settings), exist_ok=True)
        probe = os.path.join(settings.acme_dir, f".probe-{os.getpid()}")
        Path(probe).write_bytes(b"")
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"ACME_DIR (--acme-dir): {settings.acme_dir} is not a writable directory: "
                          f"{e.strerror or e}") from None
    have_all = all(os.path.isfile(os.path.join(certs_dir(settings), f"{n}.pem")) for n in names)
    try:
        check_directory(settings)
    except ConfigError as e:
        if not have_all:
            raise
        log.warning("%s; starting with the certificates in %s, renewals will be retried", e, certs_dir(settings))
    config = os.path.join(run_dir, "acme.cfg")
    crt_list = os.path.join(run_dir, "acme.crt-list")
    Path(config).write_text(render(settings), encoding="utf-8")
    # Each certificate with its name as SNI filter: HAProxy starts with a temporary certificate (no
    # name in it) until the first order, and would otherwise take its SNI names from that one.
    Path(crt_list).write_text("".join(f"{cert_ref(n)} {n}\n" for n in names), encoding="utf-8")
    return config, crt_list


@contextlib.contextmanager
def key_lock(settings: Settings) -> Iterator[None]:
    """Held while HAProxy writes the account key (its first parse of the `acme` section) and `run`
    reads it: two replicas starting at once end up with one key."""
    fd = os.open(os.path.join(settings.acme_dir, ".account.lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def account_thumbprint(settings: Settings) -> str:
    path = account_key(settings)
    try:
        return thumbprint(Path(path).read_bytes())
    except OSError as e:
        raise ConfigError(f"ACME_DIR (--acme-dir): the account key {path} cannot be read: {e.strerror}") from None
    except AccountKeyError as e:
        raise ConfigError(f"ACME_DIR (--acme-dir): the account key {path} is not usable: {e}") from None


# --------------------------------------------------------------------------- the agent's task


@dataclass
class Cert:
    """One certificate HAProxy serves that we keep current."""

    ref: str  # its name in HAProxy (`@acme/<name>.pem`, or TLS_CERT's path)
    path: str  # the file it is loaded from
    names: tuple[str, ...]
    source: str  # "acme" or "file"
    not_after: float | None = None
    not_before: float | None = None
    serial: str = ""
    serial_before: str = ""  # the serial when the running order started
    file_digest: str = ""  # of the content last loaded (or found loaded)
    renewals: int = 0
    failures: int = 0
    updates: int = 0  # loaded from its file without a reload
    next_attempt: float = 0.0  # monotonic; 0: as soon as due
    backoff: float = 0.0
    renewing_since: float | None = None
    retry: bool = False  # an order failed: ordered again at next_attempt, due or not, until one succeeds


def parse_show_ssl_cert(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def parse_not_after(text: str) -> float | None:
    """`Dec  6 05:07:17 2031 GMT` → Unix time."""
    try:
        return float(timegm(time.strptime(" ".join(text.split()), "%b %d %H:%M:%S %Y GMT")))
    except ValueError:
        return None


def acme_states(text: str) -> dict[str, str]:
    """`acme status` → {certificate: state (Running, Scheduled, Stopped)}."""
    states = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) >= 3:
            states[cols[0]] = cols[2]
    return states


class Certificates:
    """The agent's certificate task (see the module's docstring)."""

    def __init__(self, settings: Settings, interval: float = CHECK_INTERVAL) -> None:
        self.settings = settings
        self.socket = settings.admin_socket
        self.interval = interval
        self.certs: list[Cert] = []
        if settings.tls_cert:
            self.certs.append(Cert(settings.tls_cert, settings.tls_cert, (), "file"))
        for name in settings.acme_names:
            self.certs.append(Cert(cert_ref(name), os.path.join(certs_dir(settings), f"{name}.pem"), (name,), "acme"))
        self.leader = False
        # `run`'s pid (the agent's parent): an agent that `run` restarts keeps the lease.
        self.holder = f"{socket.gethostname()}:{os.getppid()}"
        self.lease_path = os.path.join(settings.acme_dir, "leader")
        self._stopping = asyncio.Event()
        self._last_problem = ""

    @classmethod
    def wanted(cls, settings: Settings) -> bool:
        return bool(settings.tls_cert or settings.acme_names)

    def stop(self) -> None:
        self._stopping.set()

    async def _cmd(self, command: str) -> str:
        return await asyncio.to_thread(admin_command, self.socket, command)

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.step()
                self._last_problem = ""
            except Exception as e:  # HAProxy not answering yet (a start, a reload), ACME_DIR not writable
                problem = f"{e.__class__.__name__}: {e}"
                if problem != self._last_problem:  # once per new problem, not every second
                    log.warning("certificates: %s; trying again every %.0fs", problem, self.interval)
                self._last_problem = problem
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=self.interval)
        if self.leader:
            with contextlib.suppress(OSError):
                if self._lease_holder() == self.holder:
                    os.unlink(self.lease_path)

    async def step(self) -> None:
        acme = [c for c in self.certs if c.source == "acme"]
        if acme:
            self._lease()
        for cert in self.certs:
            await self._load_file(cert)
            await self._read(cert)
        if acme:
            # Every replica follows an order its HAProxy runs (an operator's `acme renew` too) and
            # saves its result; only the lease holder starts orders of its own.
            states = acme_states(await self._cmd("acme status"))
            for cert in acme:
                await self._order(cert, states.get(cert.ref, ""), may_order=self.leader)

    # ------------------------------------------------------------------ loading files

    async def _load_file(self, cert: Cert) -> None:
        """A file whose content changed since we last looked is loaded into HAProxy (set + commit),
        unless HAProxy already serves that certificate (same serial)."""
        try:
            pem = Path(cert.path).read_text(encoding="ascii")
        except (OSError, UnicodeDecodeError):
            return
        digest = hashlib.sha256(pem.encode()).hexdigest()
        if digest == cert.file_digest:
            return
        if "-----BEGIN CERTIFICATE-----" not in pem or "PRIVATE KEY-----" not in pem:
            return  # half-written or not a bundle: wait for the next change
        payload = "\n".join(line for line in pem.splitlines() if line.strip()) + "\n"
        answer = await self._cmd(f"set ssl cert {cert.ref} <<\n{payload}")
        if "Transaction" not in answer and "transaction" not in answer:
            log.error("certificate %s: HAProxy refused the content of %s: %s", cert.ref, cert.path, answer.strip())
            cert.file_digest = digest  # not again until it changes
            return
        pending = parse_show_ssl_cert(await self._cmd(f"show ssl cert *{cert.ref}"))
        current = parse_show_ssl_cert(await self._cmd(f"show ssl cert {cert.ref}"))
        if pending.get("Serial") and pending.get("Serial") == current.get("Serial"):
            await self._cmd(f"abort ssl cert {cert.ref}")
        else:
            answer = await self._cmd(f"commit ssl cert {cert.ref}")
            if "Success" not in answer:
                log.error("certificate %s: commit of %s failed: %s", cert.ref, cert.path, answer.strip())
                await self._cmd(f"abort ssl cert {cert.ref}")
                return
            cert.updates += 1
            log.info("certificate %s: loaded %s into HAProxy without a reload (serial %s, expires %s)",
                     cert.ref, cert.path, pending.get("Serial", "?"), pending.get("notAfter", "?"))
        cert.file_digest = digest

    async def _read(self, cert: Cert) -> None:
        info = parse_show_ssl_cert(await self._cmd(f"show ssl cert {cert.ref}"))
        cert.serial = info.get("Serial", "")
        cert.not_after = parse_not_after(info.get("notAfter", ""))
        cert.not_before = parse_not_after(info.get("notBefore", ""))
        if cert.source == "file":
            sans = info.get("Subject Alternative Name", "")
            cert.names = tuple(s.removeprefix("DNS:") for s in sans.replace(",", " ").split() if s.startswith("DNS:"))

    # ------------------------------------------------------------------ ordering (the lease holder)

    @staticmethod
    def due(cert: Cert) -> bool:
        """No certificate yet (HAProxy's temporary one has expired), or less than a third of its
        validity left (Let's Encrypt's advice: renew at two thirds of the lifetime)."""
        if cert.not_after is None:
            return True
        lifetime = cert.not_after - (cert.not_before or cert.not_after - 90 * 86400)
        return cert.not_after - time.time() < max(lifetime, 0) / RENEW_FRACTION

    async def renew(self, cert: Cert) -> None:
        """Ask HAProxy to order `cert` now (also what an operator's forced renewal does)."""
        await self._cmd(f"acme renew {cert.ref}")
        cert.renewing_since = time.monotonic()
        cert.serial_before = cert.serial
        log.info("certificate %s: ordering from %s (names %s)", cert.ref, self.settings.acme_directory,
                 ",".join(cert.names))

    async def _order(self, cert: Cert, state: str, may_order: bool) -> None:
        now = time.monotonic()
        if cert.renewing_since is None and state == "Running":
            # Started by someone else (an operator's `acme renew`): follow it to its end.
            cert.renewing_since = now
            cert.serial_before = cert.serial
            return
        if cert.renewing_since is not None:
            if state == "Running":
                return
            await self._read(cert)  # the task may have ended after this step's first reading
            cert.renewing_since = None
            if cert.serial and cert.serial != cert.serial_before:
                cert.renewals += 1
                cert.retry = False
                cert.backoff = 0.0
                cert.next_attempt = 0.0
                await self._save(cert)
                log.info("certificate %s: renewed (serial %s), written to %s", cert.ref, cert.serial, cert.path)
            else:
                cert.failures += 1
                cert.retry = True
                cert.backoff = min(RETRY_MAX, cert.backoff * 2 if cert.backoff else self.settings.acme_retry)
                cert.next_attempt = now + cert.backoff
                then = f"retrying in {cert.backoff:.0f}s" if may_order else "the replica holding the lease orders it"
                log.error("certificate %s: the order from %s failed (failure %d; HAProxy's log says why, in its "
                          "'acme:' lines); the certificate served stays; %s", cert.ref, self.settings.acme_directory,
                          cert.failures, then)
            return
        if not may_order or now < cert.next_attempt:
            return
        if cert.retry or self.due(cert):
            await self.renew(cert)

    async def _save(self, cert: Cert) -> None:
        """The certificate HAProxy now serves, into its file (atomically): a restart, and every other
        replica, loads it from there."""
        pem = await self._cmd(f"dump ssl cert {cert.ref}")
        if "-----BEGIN CERTIFICATE-----" not in pem or "PRIVATE KEY-----" not in pem:
            log.error("certificate %s: `dump ssl cert` gave no certificate and key: %s", cert.ref, pem[:200])
            return
        pem = "\n".join(line for line in pem.splitlines() if line.strip()) + "\n"
        tmp = f"{cert.path}.tmp-{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cert.path)
        cert.file_digest = hashlib.sha256(pem.encode()).hexdigest()

    # ------------------------------------------------------------------ the lease

    def _lease_holder(self) -> str | None:
        try:
            return json.loads(Path(self.lease_path).read_text())["holder"]  # type: ignore[no-any-return]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _lease(self) -> None:
        """One replica orders: whoever holds the lease file in ACME_DIR (renewed every step; taken
        over when its holder stopped renewing it for LEASE_TTL)."""
        now = time.time()
        try:
            age = now - os.stat(self.lease_path).st_mtime
        except FileNotFoundError:
            age = None
        holder = self._lease_holder()
        if holder == self.holder:
            os.utime(self.lease_path)
            self._set_leader(True)
            return
        if age is not None and age < LEASE_TTL:
            self._set_leader(False)
            return
        if age is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.lease_path)
        try:
            fd = os.open(self.lease_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            self._set_leader(False)
            return
        with os.fdopen(fd, "w") as f:
            json.dump({"holder": self.holder, "since": now}, f)
        self._set_leader(self._lease_holder() == self.holder)

    def _set_leader(self, leader: bool) -> None:
        if leader != self.leader:
            log.info("ACME: this replica (%s) %s the certificates of %s", self.holder,
                     "now orders" if leader else "no longer orders; it loads", self.settings.acme_dir)
        self.leader = leader

    # ------------------------------------------------------------------ metrics

    def collect(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(PREFIX + "certificate_expiry_timestamp_seconds",
                                   "When the certificate HAProxy serves expires (Unix time).",
                                   labels=["certificate", "names", "source"])
        renewals = CounterMetricFamily(PREFIX + "acme_renewals",
                                       "ACME orders that ended with a new certificate.", labels=["certificate"])
        failures = CounterMetricFamily(PREFIX + "acme_renewal_failures",
                                       "ACME orders that failed (the certificate served stayed).",
                                       labels=["certificate"])
        updates = CounterMetricFamily(PREFIX + "certificate_updates",
                                      "Certificates loaded from their file into HAProxy without a reload.",
                                      labels=["certificate"])
        for cert in self.certs:
            if cert.not_after is not None:
                expiry.add_metric([cert.ref, ",".join(cert.names), cert.source], cert.not_after)
            updates.add_metric([cert.ref], cert.updates)
            if cert.source == "acme":
                renewals.add_metric([cert.ref], cert.renewals)
                failures.add_metric([cert.ref], cert.failures)
        yield expiry
        yield updates
        if any(c.source == "acme" for c in self.certs):
            yield renewals
            yield failures
            leader = GaugeMetricFamily(PREFIX + "acme_leader",
                                       "1 when this replica holds the ACME lease (it orders the certificates).")
            leader.add_metric([], 1.0 if self.leader else 0.0)
            yield leader
