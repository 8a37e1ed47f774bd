"""Configuration: one typed, validated object built once at start.

Owns: the table of settings (environment variable = command-line flag, default, meaning), their
parsing and validation. Every error names the setting and the bad value. Must not: read settings
anywhere else, or hold state beyond the `Settings` it returns.

Precedence: command-line flag > environment variable > default. The seed's set-up keeps working: a
Swarm config whose content is `tasks.backend:80`, mounted at `SWARM_CONFIG_FILE`, names the service
when `SWARM_SERVICE` is not set.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

DEFAULT_RUN_DIR = "/var/run/haproxy-swarm"


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the setting and the value."""


# --------------------------------------------------------------------------- value types


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """The service whose members we route to.

    `tasks.backend:80` → A/AAAA records of `tasks.backend`, every member on port 80.
    `_http._tcp.backend` → SRV records; target and port per member.
    """

    name: str
    port: int  # 0 for SRV services: the port comes with each record
    srv: bool = False

    def __str__(self) -> str:
        return self.name if self.srv else f"{self.name}:{self.port}"


KeyKind = Literal["cookie", "header", "param", "src"]
KEY_KINDS: tuple[KeyKind, ...] = ("cookie", "header", "param", "src")


@dataclass(frozen=True, slots=True)
class KeySource:
    """One element of the sticky key chain, e.g. `cookie:SWARMID`, `header:X-User`, `src`."""

    kind: KeyKind
    name: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.name}" if self.name else self.kind


@dataclass(frozen=True, slots=True)
class Route:
    """Which requests a service takes (SWARM_CONFIG_FILE with several services): a Host (exact, or
    `*.example.com` for any name under it; empty: any Host) and a path prefix that matches whole
    segments (`/api` takes `/api` and `/api/x`, not `/apix`; empty: any path)."""

    host: str = ""
    path: str = ""

    def __str__(self) -> str:
        return (self.host or "*") + self.path

    @property
    def rank(self) -> tuple[int, int, int]:
        """Sort key: more specific routes first (HAProxy takes the first match of the services map):
        an exact Host before a wildcard before any Host, then the longer path, then the longer Host."""
        host_class = 2 if not self.host else 1 if self.host.startswith("*.") else 0
        return host_class, -len(self.path), -len(self.host)

    def regex(self) -> str:
        """The route as a regular expression over `<host><path>`, the string haproxy.cfg matches
        (the Host header lowercased without its port, then the path without the query)."""
        if not self.host:
            host = "[^/]*"
        elif self.host.startswith("*."):
            host = "[^/]+" + re.escape(self.host[1:])
        else:
            host = re.escape(self.host)
        path = re.escape(self.path) + "(/|$)" if self.path else "/"
        return "^" + host + path


@dataclass(frozen=True, slots=True)
class ServiceLine:
    """One line of SWARM_CONFIG_FILE: `[ROUTE] SERVICE [name=N] [key=CHAIN] [cookie=C] [check=/P] [max=N]`."""

    line: int = field(compare=False)  # line number in the file, for messages (a comment added is no change)
    route: Route | None  # None: the default service (takes what no route matches)
    service: ServiceSpec
    name: str  # the service's name: HAProxy backend be_<name>, metrics label, map files
    sticky_key: tuple[KeySource, ...] | None = None  # None: STICKY_KEY
    sticky_cookie: str | None = None  # None: <STICKY_COOKIE>_<name>
    check_path: str | None = None  # None: CHECK_PATH
    # A pattern (`*.apps.example.com tasks.{1}:80`): the services it finds on demand at most; 0: a
    # service of its own. `service.name` then holds `{1}`, the label the Host has in the wildcard's place.
    on_demand: int = 0
    # `tls=acme`: the route's Host gets a certificate from ACME_DIRECTORY (spoa.acme).
    tls_acme: bool = False

    def service_for(self, label: str) -> ServiceSpec:
        """The service a pattern finds for the Host label `label` (`shop` -> `tasks.shop:80`)."""
        return replace(self.service, name=self.service.name.replace(PATTERN_LABEL, label))


# --------------------------------------------------------------------------- parsers

# Key names HAProxy's config may hold unquoted in a sample expression (DECIDE=table).
_CONFIG_WORD = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
# The longest chain: the sticky cookie, one other cookie, one header, one parameter and src.
MAX_CHAIN = 5
# Keys are hashed over their first KEY_LIMIT bytes (spoa.routing: the agent; haproxy.cfg: bytes()).
KEY_LIMIT = 1024
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")  # RFC 7230 token, bounded
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?$")


def parse_port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"port must be 1-65535, got {text!r}")
    return int(text)


def parse_host_port(text: str, default_port: int | None = None) -> HostPort:
    """`HOST:PORT`, `[V6]:PORT`, or `HOST` when a default port exists. `*` means all IPv4."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"missing ']' in {text!r}")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected ':PORT' after ']' in {text!r}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:  # a bare IPv6 address
        host, port_text = text, ""
    else:
        host, port_text = text, ""
    if host == "*":
        host = "0.0.0.0"
    if not host:
        raise ValueError(f"missing host in {text!r}")
    if not port_text:
        if default_port is None:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        return HostPort(host, default_port)
    return HostPort(host, parse_port(port_text))


def parse_service(text: str) -> ServiceSpec:
    text = text.strip()
    if not text:
        raise ValueError("empty service; expected NAME:PORT such as tasks.backend:80")
    if text.startswith("_"):
        if ":" in text:
            raise ValueError(f"an SRV service carries its ports in DNS; drop ':PORT' from {text!r}")
        if not _HOSTNAME.match(text) or text.count(".") < 2:
            raise ValueError(f"expected an SRV name such as _http._tcp.backend, got {text!r}")
        return ServiceSpec(text.rstrip("."), 0, srv=True)
    name, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"expected NAME:PORT such as tasks.backend:80, got {text!r}")
    if not _HOSTNAME.match(name):
        raise ValueError(f"invalid DNS name {name!r}")
    return ServiceSpec(name.rstrip("."), parse_port(port_text))


def parse_sticky_key(text: str) -> tuple[KeySource, ...]:
    """`cookie:SWARMID,header:X-User,param:uid,src`: first present element wins.

    The SPOE message carries one slot per kind besides the agent's own cookie, so the chain holds
    at most one `header:`, one `param:` and one `cookie:` other than the sticky cookie.
    """
    chain: list[KeySource] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise ValueError(f"empty element in {text!r}")
        kind, _, name = item.partition(":")
        kind = kind.strip().lower()
        name = name.strip()
        if kind not in KEY_KINDS:
            raise ValueError(f"unknown key kind {kind!r} in {item!r}; expected one of {', '.join(KEY_KINDS)}")
        if kind == "src":
            if name:
                raise ValueError(f"'src' takes no name, got {item!r}")
        elif not _TOKEN.match(name):
            raise ValueError(f"{kind!r} needs a name made of token characters, got {item!r}")
        source = KeySource(kind, name)
        if source in chain:
            raise ValueError(f"{item!r} appears twice")
        chain.append(source)
    return tuple(chain)


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if not 0 < value <= 86400:
        raise ValueError(f"must be > 0 and <= 86400 seconds, got {text!r}")
    return value


def parse_non_negative_int(text: str) -> int:
    if not text.strip().isdigit():
        raise ValueError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def parse_positive_int(text: str) -> int:
    value = parse_non_negative_int(text)
    if value == 0:
        raise ValueError(f"expected a whole number > 0, got {text!r}")
    return value


def parse_choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}")
        return value

    return parse


def parse_path_or_empty(text: str) -> str:
    if text and not text.startswith("/"):
        raise ValueError(f"expected an absolute path starting with '/', got {text!r}")
    if any(c.isspace() for c in text):
        raise ValueError(f"must not contain white space, got {text!r}")
    return text


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 1 or 0 (true/false, yes/no, on/off), got {text!r}")


def parse_networks(text: str) -> tuple[str, ...]:
    """`10.0.0.0/8, 192.168.1.7 fd00::/8` (commas or spaces) → the networks in CIDR form. A host
    address stands for itself; a network with host bits set is refused (`10.0.0.1/8` is ambiguous)."""
    out: list[str] = []
    for word in text.replace(",", " ").split():
        try:
            out.append(str(ipaddress.ip_network(word, strict=True)))
        except ValueError as e:
            why = f"expected IP networks in CIDR form (10.0.0.0/8) or addresses, got {word!r}: {e}"
            raise ValueError(why) from None
    return tuple(out)


CLIENT_ADDRESS_SOURCES = ("proxy-protocol", "x-forwarded-for")


def parse_client_address_from(text: str) -> tuple[str, ...]:
    """`proxy-protocol,x-forwarded-for`: where a trusted proxy puts the client's address."""
    words = tuple(w for w in text.replace(",", " ").split())
    if not words or any(w not in CLIENT_ADDRESS_SOURCES for w in words) or len(set(words)) != len(words):
        raise ValueError(f"expected one or both of {', '.join(CLIENT_ADDRESS_SOURCES)}, got {text!r}")
    return words


def parse_balance(text: str) -> str:
    """How HAProxy places a first visit by load: `leastconn`, or `random` with its number of draws."""
    if text == "leastconn" or re.fullmatch(r"random\([1-9]\)", text):
        return text
    raise ValueError(f"expected leastconn or random(N) with N from 1 to 9, got {text!r}")


def parse_tls_cert(text: str) -> str:
    """A PEM file holding the certificate (chain) and its private key, as HAProxy's `crt` takes it;
    "" = no HTTPS. Checked here, before HAProxy starts, so a missing or bad file stops the start
    with a message that names the setting (HAProxy's own error names only its config line)."""
    text = text.strip()
    if not text:
        return ""
    if not text.startswith("/") or any(c.isspace() or c == '"' for c in text):
        raise ValueError(f"expected an absolute path without spaces or quotes, got {text!r}")
    try:
        with open(text, "rb") as f:
            pem = f.read(1 << 20)
    except OSError as e:
        raise ValueError(f"cannot read it: {e.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError("no PEM certificate in it (expected '-----BEGIN CERTIFICATE-----')")
    if b"PRIVATE KEY-----" not in pem:
        raise ValueError("no private key in it: HAProxy needs the certificate and its key in one PEM file")
    if b"ENCRYPTED" in pem:  # `-----BEGIN ENCRYPTED PRIVATE KEY-----`, or `Proc-Type: 4,ENCRYPTED`
        raise ValueError("the private key is encrypted: HAProxy starts unattended and needs it unencrypted")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # The password callback answers an encrypted key with a failure instead of a prompt.
        context.load_cert_chain(text, password=lambda: b"")
    except ssl.SSLError as e:
        raise ValueError(f"not a usable certificate and key: {e.reason or e}") from None
    return text


# An ACME name: a DNS name of two labels or more (HTTP-01 cannot prove a wildcard or an address).
_ACME_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")
_EMAIL = re.compile(r"^[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}@"
                    r"([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$")
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
LETS_ENCRYPT_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"


def parse_acme_name(text: str) -> str:
    name = text.strip().lower().rstrip(".")
    if name.startswith("*."):
        raise ValueError(f"{text!r} is a wildcard: HTTP-01 (the challenge HAProxy answers) cannot prove one")
    if not _ACME_NAME.match(name):
        raise ValueError(f"{text!r} is not a DNS name (labels of a-z, 0-9 and '-', two labels or more, no address)")
    return name


def parse_acme_names(text: str) -> tuple[str, ...]:
    names: list[str] = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        name = parse_acme_name(raw)
        if name in names:
            raise ValueError(f"{name!r} appears twice")
        names.append(name)
    return tuple(names)


def parse_email(text: str) -> str:
    text = text.strip()
    if text and not _EMAIL.match(text):
        raise ValueError(f"{text!r} is not an e-mail address (local@domain.tld)")
    return text


def parse_https_url(text: str) -> str:
    text = text.strip()
    match = re.match(r"^https://([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?"
                     r"(/[A-Za-z0-9._~!$&'()*+,;=:@/%-]*)?$", text)
    if not match:
        raise ValueError(f"expected an https:// URL (host, optional port and path, no spaces or quotes), got {text!r}")
    return text


def parse_file_or_empty(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    if not text.startswith("/") or any(c.isspace() or c == '"' for c in text):
        raise ValueError(f"expected an absolute path without spaces or quotes, got {text!r}")
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise ValueError(f"{text} is not a readable file")
    return text


def nameserver_from_resolv_conf(path: str = "/etc/resolv.conf") -> HostPort:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    ipaddress.ip_address(parts[1].split("%")[0])
                    return HostPort(parts[1], 53)
    except (OSError, ValueError):
        pass
    return HostPort("127.0.0.1", 53)


# --------------------------------------------------------------------------- settings


def _fetch(source: KeySource) -> str:
    """HAProxy's sample fetch of a key of the chain (the same spoe.conf sends the agent)."""
    if source.kind == "src":
        return "var(txn.client)"  # the client's address (TRUSTED_PROXIES), set in fe_main
    return {"cookie": "req.cook", "header": "req.hdr", "param": "url_param"}[source.kind] + f"({source.name})"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the agent and `run` need, validated."""

    service: ServiceSpec
    config_file: str = "/my-config"
    nameserver: HostPort = field(default_factory=nameserver_from_resolv_conf)
    refresh: float = 2.0
    dns_timeout: float = 1.0
    member_grace: float = 10.0
    sticky_key: tuple[KeySource, ...] = (KeySource("cookie", "SWARMID"),)
    sticky_cookie: str = "SWARMID"
    cookie_secret: str = ""
    cookie_max_age: int = 0
    listen: HostPort = HostPort("127.0.0.1", 12345)
    metrics_listen: HostPort = HostPort("0.0.0.0", 9101)
    run_dir: str = DEFAULT_RUN_DIR
    haproxy_socket: str = ""  # "" → <run_dir>/admin.sock
    haproxy_backend: str = "be_app"
    haproxy_config: str = ""  # "" → the haproxy.cfg shipped beside the package
    haproxy_bin: str = ""  # "" → `haproxy` on PATH
    check_path: str = ""  # "" → TCP connect checks
    drain_timeout: float = 30.0
    max_connections: int = 1000
    log_level: str = "info"
    log_format: str = "text"
    decide: str = "table"
    ondemand_miss_ttl: float = 30.0
    ondemand_lookups: float = 5.0
    ondemand_forget: float = 300.0
    tls_cert: str = ""  # "" → no HTTPS bind
    https_bind: HostPort = HostPort("0.0.0.0", 8443)
    https_redirect: bool = False
    https_redirect_port: int = 443
    trusted_proxies: tuple[str, ...] = ()
    client_address_from: tuple[str, ...] = ("x-forwarded-for",)
    balance: str = "leastconn"
    http_timeout: float = 30.0
    tunnel_timeout: float = 3600.0
    hard_stop_after: float = 60.0
    hsts_max_age: int = 0  # 0 → no Strict-Transport-Security
    acme_domains: tuple[str, ...] = ()
    acme_directory: str = LETS_ENCRYPT
    acme_email: str = ""
    acme_dir: str = "/var/lib/haproxy-swarm/acme"
    acme_ca_file: str = ""  # "" → the system's CAs
    acme_retry: float = 60.0
    # Not settings of their own: several services in SWARM_CONFIG_FILE (load_settings), and what
    # service_settings derives for each of them.
    services: tuple[ServiceLine, ...] = ()
    service_name: str = ""  # "" for the one service of the seed's set-up (be_app, maps without prefix)
    service_path: str = ""  # the route's path prefix: the sticky cookie's Path

    @property
    def acme_names(self) -> tuple[str, ...]:
        """Every name that gets a certificate from ACME: ACME_DOMAINS, then the Hosts of the
        service lines marked `tls=acme`, each once."""
        names = list(self.acme_domains)
        for line in self.services:
            if line.tls_acme and line.route is not None and line.route.host not in names:
                names.append(line.route.host)
        return tuple(names)

    @property
    def https(self) -> bool:
        """fe_main serves HTTPS: a certificate from TLS_CERT, from ACME, or both."""
        return bool(self.tls_cert or self.acme_names)

    @property
    def admin_socket(self) -> str:
        return self.haproxy_socket or os.path.join(self.run_dir, "admin.sock")

    @property
    def cookie_map(self) -> str:
        """The HAProxy map file (cookie value → server name) the agent keeps current."""
        return self._map_file("cookies.map")

    @property
    def slot_map(self) -> str:
        """The HAProxy map file (table slot → server name) the agent publishes (DECIDE=table)."""
        return self._map_file("slots.map")

    @property
    def server_cookie_map(self) -> str:
        """The HAProxy map file (server name → sticky cookie value) the agent publishes (DECIDE=table)."""
        return self._map_file("server-cookies.map")

    def _map_file(self, name: str) -> str:
        return os.path.join(self.run_dir, f"{self.service_name}.{name}" if self.service_name else name)

    @property
    def trusted_proxies_file(self) -> str:
        """The list of TRUSTED_PROXIES that `run` writes for HAProxy (`src -f`), one network a line."""
        return os.path.join(self.run_dir, "trusted-proxies.lst")

    @property
    def cookie_attributes(self) -> str:
        """What follows `NAME=value` in the sticky cookie's Set-Cookie (`; Secure` is added over TLS)."""
        attrs = f"; Path={self.service_path or '/'}; HttpOnly; SameSite=Lax"
        if self.cookie_max_age:
            attrs += f"; Max-Age={self.cookie_max_age}"
        return attrs

    @property
    def cookie_map_used(self) -> bool:
        """True when HAProxy routes by the cookie map: the sticky cookie heads the chain, or HAProxy
        walks the whole chain from the table (DECIDE=table) and the chain names the cookie."""
        return self.cookie_first or (self.decide == "table" and self.issues_cookie)

    def chain_env(self) -> dict[str, str]:
        """The key chain as haproxy.cfg walks it with DECIDE=table: STICKY_AT is the position of the
        sticky cookie (decided by the cookie map); KEY_<n> is the sample expression of the key, whose slot is
        `<expr>,crc32,div(65536)` (spoa.ring.slot_of); SOURCE_<n> names it for metrics and logs.
        `-`: unused. (A decision after the sticky cookie's place issues the cookie: haproxy.cfg.)"""
        env = {f"{name}_{n}": "-" for n in range(1, MAX_CHAIN + 1) for name in ("KEY", "SOURCE")}
        env["STICKY_AT"] = "-"
        for n, source in enumerate(self.sticky_key, start=1):
            if source.kind == "cookie" and source.name == self.sticky_cookie:
                env[f"KEY_{n}"], env[f"SOURCE_{n}"], env["STICKY_AT"] = "sticky", "cookie", str(n)
                continue
            # The same fetches spoe.conf sends the agent; strings hashed over their first KEY_LIMIT bytes.
            fetch = _fetch(source)
            env[f"KEY_{n}"] = fetch if source.kind == "src" else f"{fetch},bytes(0,{KEY_LIMIT})"
            env[f"SOURCE_{n}"] = source.kind
        return env

    @property
    def first_key_fetch(self) -> str:
        """The sample expression of the chain's first key, which the DNS fallback hashes."""
        return _fetch(self.sticky_key[0])

    @property
    def slots_used(self) -> bool:
        """True when HAProxy decides keys from the slot map: DECIDE=table and the chain names a key
        besides the sticky cookie (the map is not even loaded otherwise)."""
        return self.decide == "table" and any(
            not (s.kind == "cookie" and s.name == self.sticky_cookie) for s in self.sticky_key)

    @property
    def issues_cookie(self) -> bool:
        """True when the chain names the sticky cookie: the agent then issues it."""
        return KeySource("cookie", self.sticky_cookie) in self.sticky_key

    @property
    def cookie_first(self) -> bool:
        """True when the sticky cookie heads the chain: only then does a valid cookie decide whatever
        else the request carries, so HAProxy may route by it alone (the cookie map)."""
        return bool(self.sticky_key) and self.sticky_key[0] == KeySource("cookie", self.sticky_cookie)

    def haproxy_env(self) -> dict[str, str]:
        """The environment variables the shipped haproxy.cfg and spoe.conf read."""
        env = {
            "RUN_DIR": self.run_dir,
            "HAPROXY_SOCKET": self.admin_socket,
            "AGENT_ADDR": str(self.listen),
            "DNS_NAMESERVER": str(self.nameserver),
            "SWARM_DNS_TARGET": str(self.service),
            "CHECK_PATH": self.check_path,
            "STICKY_COOKIE": self.sticky_cookie,
            "COOKIE_MAP": self.cookie_map,
            "DECIDE": self.decide,
            "SLOT_MAP": self.slot_map,
            "SERVER_COOKIE_MAP": self.server_cookie_map,
            "COOKIE_ATTRS": self.cookie_attributes,
            "TLS_CERT": self.tls_cert,
            "HTTPS_BIND": str(self.https_bind),
            "HTTPS_REDIRECT": "1" if self.https_redirect else "0",
            "HTTPS_REDIRECT_PORT": str(self.https_redirect_port),
            "BALANCE": self.balance,
            "FALLBACK_KEY": self.first_key_fetch,
            "PROXY_PROTOCOL": "1" if self.trusted_proxies and "proxy-protocol" in self.client_address_from else "0",
            "FORWARDED_FOR": "1" if self.trusted_proxies and "x-forwarded-for" in self.client_address_from else "0",
            # Not the settings' own names: those hold seconds, HAProxy takes a time with its unit.
            "HAPROXY_HTTP_TIMEOUT": _ms(self.http_timeout),
            "HAPROXY_TUNNEL_TIMEOUT": _ms(self.tunnel_timeout),
            "HAPROXY_HARD_STOP_AFTER": _ms(self.hard_stop_after),
            "HSTS_MAX_AGE": str(self.hsts_max_age),
            **self.chain_env(),
        }
        if self.trusted_proxies:
            env["TRUSTED_PROXIES_FILE"] = self.trusted_proxies_file
        # The SPOE message has one slot per key kind; unused slots fetch a name nobody sends.
        unused = "X-Haproxy-Swarm-Unused"
        env["KEY_COOKIE"] = env["KEY_HEADER"] = env["KEY_PARAM"] = unused
        for source in self.sticky_key:
            if source.kind == "cookie" and source.name != self.sticky_cookie:
                env["KEY_COOKIE"] = source.name
            elif source.kind == "header":
                env["KEY_HEADER"] = source.name
            elif source.kind == "param":
                env["KEY_PARAM"] = source.name
        return env


def _ms(seconds: float) -> str:
    """Seconds as an HAProxy time (`timeout`, `hard-stop-after`): whole milliseconds."""
    return f"{max(1, round(seconds * 1000))}ms"


@dataclass(frozen=True, slots=True)
class Option:
    """One row of the settings table: env var = flag, default and meaning (for --help and docs)."""

    attr: str
    env: str
    flag: str
    parse: Callable[[str], Any]
    help: str
    default_text: str


def _host_port(default_port: int | None = None) -> Callable[[str], HostPort]:
    return lambda text: parse_host_port(text, default_port)


def _ip_port(default_port: int) -> Callable[[str], HostPort]:
    def parse(text: str) -> HostPort:
        hp = parse_host_port(text, default_port)
        try:
            ipaddress.ip_address(hp.host)
        except ValueError:
            raise ValueError(f"expected an IP address (a DNS server is not looked up by name), got {text!r}") from None
        return hp

    return parse


def _sticky_cookie(text: str) -> str:
    if not _TOKEN.match(text):
        raise ValueError(f"expected a cookie name made of token characters, got {text!r}")
    return text


def _backend_name(text: str) -> str:
    if not re.match(r"^[A-Za-z0-9_.:-]{1,64}$", text):
        raise ValueError(f"expected an HAProxy backend name ([A-Za-z0-9_.:-]), got {text!r}")
    return text


OPTIONS: tuple[Option, ...] = (
    Option("service", "SWARM_SERVICE", "--service", parse_service,
           "service to route to: NAME:PORT (A/AAAA) or _svc._proto.NAME (SRV)",
           "content of SWARM_CONFIG_FILE"),
    Option("config_file", "SWARM_CONFIG_FILE", "--config-file", str,
           "file holding the service (the seed's Swarm config)", "/my-config"),
    Option("nameserver", "DNS_NAMESERVER", "--nameserver", _ip_port(53),
           "DNS server IP[:PORT] (an address, not a name)", "first nameserver of /etc/resolv.conf"),
    Option("refresh", "DNS_REFRESH", "--refresh", parse_seconds,
           "seconds between DNS polls (record TTLs are ignored)", "2"),
    Option("dns_timeout", "DNS_TIMEOUT", "--dns-timeout", parse_seconds,
           "seconds before one DNS query counts as failed", "1"),
    Option("member_grace", "MEMBER_GRACE", "--member-grace", parse_seconds,
           "seconds a member may be missing from DNS before it is removed", "10"),
    Option("sticky_key", "STICKY_KEY", "--sticky-key", parse_sticky_key,
           "sticky key chain, first present wins: cookie:NAME, header:NAME, param:NAME, src (the client "
           "address: behind Swarm's routing mesh or a NAT every client has the same one; see TRUSTED_PROXIES); "
           "a request with none of them is a first visit, placed by HAProxy by load (BALANCE)",
           "cookie:SWARMID"),
    Option("sticky_cookie", "STICKY_COOKIE", "--sticky-cookie", _sticky_cookie,
           "name of the cookie the agent issues (when the chain names it)", "SWARMID"),
    Option("cookie_secret", "COOKIE_SECRET", "--cookie-secret", str,
           "secret mixed into sticky cookie values; the same on every replica", "(empty)"),
    Option("cookie_max_age", "COOKIE_MAX_AGE", "--cookie-max-age", parse_non_negative_int,
           "Max-Age of the sticky cookie in seconds; 0 = a browser-session cookie", "0"),
    Option("listen", "AGENT_LISTEN", "--listen", _host_port(),
           "SPOP listen address (no authentication: keep it on loopback)", "127.0.0.1:12345"),
    Option("metrics_listen", "METRICS_LISTEN", "--metrics-listen", _host_port(),
           "address of /metrics, /healthz, /readyz", "0.0.0.0:9101"),
    Option("run_dir", "RUN_DIR", "--run-dir", parse_path_or_empty,
           "directory for sockets, pid and map files", DEFAULT_RUN_DIR),
    Option("haproxy_socket", "HAPROXY_SOCKET", "--haproxy-socket", parse_path_or_empty,
           "HAProxy admin socket", "$RUN_DIR/admin.sock"),
    Option("haproxy_backend", "HAPROXY_BACKEND", "--backend", _backend_name,
           "HAProxy backend that holds the service's servers", "be_app"),
    Option("haproxy_config", "HAPROXY_CONFIG", "--haproxy-config", parse_path_or_empty,
           "haproxy.cfg for `run` (the shipped one by default)", "the shipped haproxy.cfg"),
    Option("haproxy_bin", "HAPROXY_BIN", "--haproxy-bin", parse_path_or_empty,
           "the haproxy binary `run` starts (and the tests use)", "`haproxy` on PATH"),
    Option("check_path", "CHECK_PATH", "--check-path", parse_path_or_empty,
           "HTTP health-check path for members; empty = TCP connect check", "(empty)"),
    Option("drain_timeout", "DRAIN_TIMEOUT", "--drain-timeout", parse_seconds,
           "seconds a removed member drains; then its sessions are cut and it is deleted", "30"),
    Option("max_connections", "MAX_CONNECTIONS", "--max-connections", parse_positive_int,
           "SPOP connections at most; the oldest idle one is closed first", "1000"),
    Option("log_level", "LOG_LEVEL", "--log-level", parse_choice("debug", "info", "warning", "error"),
           "log level", "info"),
    Option("log_format", "LOG_FORMAT", "--log-format", parse_choice("text", "json"),
           "log format", "text"),
    Option("decide", "DECIDE", "--decide", parse_choice("table", "agent"),
           "who decides: table = HAProxy from the table the agent publishes, the agent over SPOE only "
           "where the table cannot; agent = every request the cookie map does not decide asks the agent",
           "table"),
    Option("ondemand_miss_ttl", "ONDEMAND_MISS_TTL", "--ondemand-miss-ttl", parse_seconds,
           "seconds a Host a pattern matches but whose service does not resolve gets a 404 without a new "
           "look-up", "30"),
    Option("ondemand_lookups", "ONDEMAND_LOOKUPS", "--ondemand-lookups", parse_seconds,
           "DNS look-ups per second at most for Hosts a pattern matches (a burst of as many)", "5"),
    Option("ondemand_forget", "ONDEMAND_FORGET", "--ondemand-forget", parse_seconds,
           "seconds a service found on demand may have no members before it is forgotten", "300"),
    Option("tls_cert", "TLS_CERT", "--tls-cert", parse_tls_cert,
           "PEM file with the certificate (chain) and its private key, e.g. a Swarm secret at "
           "/run/secrets/NAME; set: fe_main also serves HTTPS (HTTP/2 and HTTP/1.1) on HTTPS_BIND",
           "(empty: no HTTPS)"),
    Option("https_bind", "HTTPS_BIND", "--https-bind", _host_port(),
           "HTTPS bind of fe_main (used only with TLS_CERT)", "*:8443"),
    Option("https_redirect", "HTTPS_REDIRECT", "--https-redirect", parse_bool,
           "1: fe_main answers plain HTTP with a redirect to HTTPS (301 for GET/HEAD, 308 otherwise); "
           "needs TLS_CERT", "0"),
    Option("https_redirect_port", "HTTPS_REDIRECT_PORT", "--https-redirect-port", parse_port,
           "the HTTPS port clients reach (the published port, not HTTPS_BIND's) that redirects name; "
           "443 is left out of the Location", "443"),
    Option("trusted_proxies", "TRUSTED_PROXIES", "--trusted-proxies", parse_networks,
           "proxies (CIDR list) whose word on the client's address is believed (CLIENT_ADDRESS_FROM); "
           "that address is `src` in STICKY_KEY, the log's client and the task's X-Real-IP",
           "(empty: nobody; the client is the connection's peer)"),
    Option("client_address_from", "CLIENT_ADDRESS_FROM", "--client-address-from", parse_client_address_from,
           "where a trusted proxy gives the client's address: x-forwarded-for (its right-most address "
           "that is not itself trusted), proxy-protocol (v1 or v2; required from trusted peers), or both",
           "x-forwarded-for"),
    Option("balance", "BALANCE", "--balance", parse_balance,
           "how HAProxy places a first visit by load over the UP members: leastconn or random(2)",
           "leastconn"),
    Option("http_timeout", "HTTP_TIMEOUT", "--http-timeout", parse_seconds,
           "seconds a client or a task may stay silent within an HTTP request or response (HAProxy's "
           "timeout client and server; a server-sent events stream needs a keep-alive more often)", "30"),
    Option("tunnel_timeout", "TUNNEL_TIMEOUT", "--tunnel-timeout", parse_seconds,
           "seconds an upgraded connection (WebSocket) may stay silent in both directions before HAProxy "
           "closes it (timeout tunnel)", "3600"),
    Option("hard_stop_after", "HARD_STOP_AFTER", "--hard-stop-after", parse_seconds,
           "seconds the old HAProxy process of a reload keeps its open connections (WebSockets, streams) "
           "before it closes them; clients reconnect to the same task by their cookie", "60"),
    Option("hsts_max_age", "HSTS_MAX_AGE", "--hsts-max-age", parse_non_negative_int,
           "seconds of Strict-Transport-Security sent on HTTPS answers; 0 = no header", "0"),
    Option("acme_domains", "ACME_DOMAINS", "--acme-domains", parse_acme_names,
           "DNS names that get a certificate from ACME (one each), comma-separated; with the Hosts of "
           "service lines marked tls=acme. Needs HAProxy with its ACME client (3.4)", "(empty: none)"),
    Option("acme_directory", "ACME_DIRECTORY", "--acme-directory", parse_https_url,
           f"the ACME CA's directory URL; Let's Encrypt's staging CA: {LETS_ENCRYPT_STAGING}", LETS_ENCRYPT),
    Option("acme_email", "ACME_EMAIL", "--acme-email", parse_email,
           "contact e-mail of the ACME account", "(empty: none)"),
    Option("acme_dir", "ACME_DIR", "--acme-dir", parse_path_or_empty,
           "directory (a volume, shared by the replicas) of the account key, the certificates and the "
           "ordering lease", "/var/lib/haproxy-swarm/acme"),
    Option("acme_ca_file", "ACME_CA_FILE", "--acme-ca-file", parse_file_or_empty,
           "CA bundle that verifies the ACME directory's HTTPS (a private CA)", "(empty: the system's CAs)"),
    Option("acme_retry", "ACME_RETRY", "--acme-retry", parse_seconds,
           "seconds before the first retry of a failed order; doubled on each failure, at most 1 hour",
           "60"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per setting; values stay strings until `load_settings` validates them."""
    for opt in OPTIONS:
        parser.add_argument(opt.flag, dest=opt.attr, default=None, metavar=opt.env,
                            help=f"{opt.help} [env {opt.env}, default {opt.default_text}]")


_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_ROUTE_HOST = re.compile(r"^(\*\.)?[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))*$")
# No `%` (HAProxy's log-format, in the cookie's Path) and no `$` (its environment expansion).
_ROUTE_PATH = re.compile(r"^(/[A-Za-z0-9._~!&'()*+,;=:@-]+)+$")
LINE_OPTIONS = ("name", "key", "cookie", "check", "max", "tls")
# In a pattern's service name, the Host's label in the wildcard's place; what it may be (one DNS label).
PATTERN_LABEL = "{1}"
LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
DEFAULT_ON_DEMAND = 8  # services a pattern finds at most, unless its line says max=
MAX_ON_DEMAND = 64


def _read_service_file(path: str) -> list[tuple[int, str]]:
    """The file's service lines (number, text), comments and blank lines left out."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise ConfigError(f"SWARM_SERVICE is not set and SWARM_CONFIG_FILE ({path}) cannot be read: {why}") from None
    lines = []
    for n, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append((n, line))
    if not lines:
        raise ConfigError(f"SWARM_CONFIG_FILE ({path}) names no service; expected a line such as tasks.backend:80")
    return lines


def _looks_like_target(word: str) -> bool:
    return word.startswith("_") or (":" in word and "/" not in word)


def parse_route(text: str) -> Route:
    """`shop.example.com`, `*.example.com`, `example.com/api`, `/api` (any Host)."""
    host, slash, path = text.partition("/")
    host = host.lower().rstrip(".")
    path = (slash + path).rstrip("/")
    if host == "*":
        host = ""
    if host and not _ROUTE_HOST.match(host):
        raise ValueError(f"{text!r} is not a host name (or *.domain) with an optional /path")
    if path and not _ROUTE_PATH.match(path):
        raise ValueError(f"invalid path {path!r} in {text!r}")
    if not host and not path:
        raise ValueError(f"{text!r} matches everything; leave the route out for the default service")
    return Route(host, path)


def default_service_name(service: ServiceSpec) -> str:
    """`tasks.shop:8080` -> `shop`, `_http._tcp.api` -> `api`, `web.ns.svc.cluster.local` -> `web`."""
    labels = [label for label in service.name.lower().split(".") if label and not label.startswith("_")]
    if len(labels) > 1 and labels[0] == "tasks":
        labels = labels[1:]
    name = re.sub(r"[^a-z0-9_-]", "-", labels[0] if labels else "service")[:32]
    return name if _NAME.match(name) else "service"


def parse_service_line(number: int, text: str) -> ServiceLine:
    """One line of SWARM_CONFIG_FILE; ValueError says what is wrong with it."""
    words = text.split()
    route: Route | None = None
    if not _looks_like_target(words[0]) and "=" not in words[0]:
        if len(words) < 2:
            raise ValueError(f"{words[0]!r} is not a service (NAME:PORT or _svc._proto.NAME) and no service follows it")
        route = parse_route(words[0])
        words = words[1:]
    pattern = PATTERN_LABEL in words[0]
    if pattern:
        if route is None or not route.host.startswith("*.") or route.path:
            raise ValueError(f"{PATTERN_LABEL} in {words[0]!r} needs a route such as *.apps.example.com (a "
                             "wildcard Host, no path): it is the Host's label in the wildcard's place")
        if words[0].count(PATTERN_LABEL) != 1:
            raise ValueError(f"{PATTERN_LABEL} may appear once in {words[0]!r}")
        spec = parse_service(words[0].replace(PATTERN_LABEL, "x"))
        service = replace(spec, name=(words[0] if spec.srv else words[0].rpartition(":")[0]).rstrip("."))
    else:
        service = parse_service(words[0])
    options: dict[str, str] = {}
    for word in words[1:]:
        key, sep, value = word.partition("=")
        if not sep or key not in LINE_OPTIONS:
            raise ValueError(f"unknown option {word!r}; expected {', '.join(o + '=' for o in LINE_OPTIONS)}")
        if key in options:
            raise ValueError(f"option {key}= given twice")
        options[key] = value
    if "max" in options and not pattern:
        raise ValueError(f"max= is for a pattern (a target with {PATTERN_LABEL}), not {words[0]!r}")
    on_demand = 0
    if pattern:
        raw = options.get("max", str(DEFAULT_ON_DEMAND))
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_ON_DEMAND:
            raise ValueError(f"max={raw}: expected 1-{MAX_ON_DEMAND} services found on demand")
        on_demand = int(raw)
    if pattern and route is not None:
        derived = default_service_name(ServiceSpec(route.host[2:], 1))
    else:
        derived = default_service_name(service)
    name = options.get("name") or derived
    if not _NAME.match(name):
        raise ValueError(f"name={name!r}: expected 1-32 of a-z, 0-9, '_' and '-', starting with a letter or digit")
    try:
        chain = parse_sticky_key(options["key"]) if "key" in options else None
    except ValueError as e:
        raise ValueError(f"key={options['key']}: {e}") from None
    cookie = options.get("cookie")
    if cookie is not None and not _TOKEN.match(cookie):
        raise ValueError(f"cookie={cookie}: expected a cookie name made of token characters")
    check = options.get("check")
    if check is not None:
        try:
            parse_path_or_empty(check)
        except ValueError as e:
            raise ValueError(f"check={check}: {e}") from None
    tls = options.get("tls")
    if tls is not None:
        if tls != "acme":
            raise ValueError(f"tls={tls}: expected tls=acme")
        if route is None or not route.host or route.host.startswith("*."):
            raise ValueError("tls=acme needs a route with one exact Host (the name the certificate is for)")
        try:
            parse_acme_name(route.host)
        except ValueError as e:
            raise ValueError(f"tls=acme: {e}") from None
    return ServiceLine(number, route, service, name, chain, cookie, check, on_demand, tls_acme=tls is not None)


def parse_service_lines(lines: Sequence[tuple[int, str]], path: str) -> tuple[ServiceLine, ...]:
    """Every line of the file, checked together: names and routes unique, one default at most."""
    services: list[ServiceLine] = []
    for number, text in lines:
        try:
            services.append(parse_service_line(number, text))
        except ValueError as e:
            raise ConfigError(f"SWARM_CONFIG_FILE ({path}) line {number}: {text!r}: {e}") from None
    seen: dict[object, ServiceLine] = {}
    for line in services:
        for what, key in (("name", ("name", line.name)), ("route", ("route", line.route)),
                          ("service", ("service", str(line.service)))):
            other = seen.get(key)
            if other is not None:
                shown = "default service (no route)" if what == "route" and line.route is None else f"{what} {key[1]}"
                hint = {"name": "; give one of them name=...",
                        "service": " (one service, one line: its metrics and status are by service)"}.get(what, "")
                raise ConfigError(f"SWARM_CONFIG_FILE ({path}) line {line.line}: the {shown} is already "
                                  f"line {other.line}'s{hint}")
            seen[key] = line
    return tuple(services)


def load_settings(flags: Mapping[str, str | None] | argparse.Namespace | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Build and validate the settings from flags (by attribute name) and the environment."""
    if isinstance(flags, argparse.Namespace):
        flags = vars(flags)
    flags = flags or {}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = flags.get(opt.attr)
        if raw is None:
            raw = environ.get(opt.env)
        if raw is None:
            continue
        try:
            values[opt.attr] = opt.parse(raw)
        except ValueError as e:
            raise ConfigError(f"{opt.env} ({opt.flag}): invalid value {raw!r}: {e}") from None
    if "service" not in values:
        path = values.get("config_file", "/my-config")
        lines = _read_service_file(path)
        if len(lines) == 1 and len(lines[0][1].split()) == 1:
            # The seed's file: one service, every request, the settings' own options.
            raw = lines[0][1]
            try:
                values["service"] = parse_service(raw)
            except ValueError as e:
                raise ConfigError(f"SWARM_CONFIG_FILE ({path}): invalid service {raw!r}: {e}") from None
        else:
            services = parse_service_lines(lines, path)
            values["service"] = services[0].service
            values["services"] = services
    settings = Settings(**values)
    _check_consistency(settings)
    for one in service_settings(settings) if settings.services else ():
        try:
            _check_consistency(one)
        except ConfigError as e:
            line = next(s for s in settings.services if s.name == one.service_name)
            raise ConfigError(f"SWARM_CONFIG_FILE ({settings.config_file}) line {line.line} "
                              f"(service {one.service_name}): {e}") from None
    _check_services(settings)
    return settings


def service_settings(settings: Settings) -> tuple[Settings, ...]:
    """The settings of each service: `(settings,)` for one service (the seed's file, SWARM_SERVICE);
    with several services in SWARM_CONFIG_FILE, one `Settings` per line, each with its own name,
    backend (`be_<name>`), map files, sticky key chain, cookie (`<STICKY_COOKIE>_<name>` unless the
    line names one; its Path is the route's path) and check path, and its own SPOP port: the n-th
    service (from 0) listens on AGENT_LISTEN's port + 1 + n (AGENT_LISTEN itself answers the look-ups
    of patterns: ondemand_listen)."""
    if not settings.services:
        return (settings,)
    return tuple(_derive(settings, line, line.name, 1 + n)
                 for n, line in enumerate(line for line in settings.services if not line.on_demand))


def pattern_backends(settings: Settings) -> tuple[tuple[ServiceLine, tuple[Settings, ...]], ...]:
    """Each pattern line with the settings of its `max` backends: `<name>_<n>` (n from 1), HAProxy
    backend `be_<name>_<n>`, their SPOP ports after the services of their own. A pattern backend's
    `service` is the pattern's (with {1}) until the agent gives it a service it found
    (`ServiceLine.service_for`)."""
    out = []
    port = 1 + len(service_settings(settings)) if settings.services else 0
    for line in settings.services:
        if line.on_demand:
            backends = tuple(_derive(settings, line, f"{line.name}_{n}", port + n - 1)
                             for n in range(1, line.on_demand + 1))
            port += line.on_demand
            out.append((line, backends))
    return tuple(out)


def ondemand_listen(settings: Settings) -> HostPort:
    """Where the agent answers fe_main's look-ups of Hosts a pattern matches: AGENT_LISTEN itself, a
    port that no change of the file moves (HAProxy keeps the address it started with across the
    reload a change causes); the services and the patterns' backends take the ports after it."""
    return settings.listen


def last_agent_port(settings: Settings) -> int:
    return settings.listen.port + len(service_settings(settings)) + sum(line.on_demand for line in settings.services)


def _derive(settings: Settings, line: ServiceLine, name: str, n: int) -> Settings:
    """The settings of one service (or pattern backend) `name` of `line`, on AGENT_LISTEN's port + n."""
    cookie = line.sticky_cookie or f"{settings.sticky_cookie}_{line.name}"
    return (replace(
            settings,
            service=line.service,
            services=(),
            service_name=name,
            service_path=line.route.path if line.route is not None else "",
            sticky_key=_own_cookie(line.sticky_key if line.sticky_key is not None else settings.sticky_key,
                                   settings.sticky_cookie, cookie),
            sticky_cookie=cookie,
            check_path=line.check_path if line.check_path is not None else settings.check_path,
            haproxy_backend=f"be_{name}",
            haproxy_socket=settings.admin_socket,
            listen=HostPort(settings.listen.host, settings.listen.port + n),
        ))


def _own_cookie(chain: tuple[KeySource, ...], shared: str, own: str) -> tuple[KeySource, ...]:
    """The chain with `cookie:<STICKY_COOKIE>` (the sticky cookie, as STICKY_KEY names it) read as
    the service's own sticky cookie."""
    return tuple(KeySource("cookie", own) if s == KeySource("cookie", shared) else s for s in chain)


def _check_services(settings: Settings) -> None:
    """Several services: their SPOP ports fit and stay clear of METRICS_LISTEN; every sticky chain
    that names the default cookie name (STICKY_KEY's cookie:SWARMID) is rewritten to the service's
    own cookie, so no two services share one."""
    if not settings.services:
        return
    last = last_agent_port(settings)
    if last > 65535:
        raise ConfigError(f"AGENT_LISTEN ({settings.listen}): the services need ports {settings.listen.port}-{last}")
    if settings.listen.port <= settings.metrics_listen.port <= last:
        raise ConfigError(f"METRICS_LISTEN ({settings.metrics_listen}) is inside the SPOP ports "
                          f"{settings.listen.port}-{last} of the services (one per service, one per service "
                          "a pattern may find, one for look-ups)")
    cookies: dict[str, str] = {}
    for one in service_settings(settings) + tuple(backends[0] for _, backends in pattern_backends(settings)):
        other = cookies.get(one.sticky_cookie)
        if other is not None:
            raise ConfigError(f"SWARM_CONFIG_FILE ({settings.config_file}): services {other} and "
                              f"{one.service_name} both use the sticky cookie {one.sticky_cookie!r}; "
                              "give one of them cookie=...")
        cookies[one.sticky_cookie] = one.service_name


def _check_consistency(s: Settings) -> None:
    counts: dict[str, int] = {}
    for source in s.sticky_key:
        if source.kind == "cookie" and source.name == s.sticky_cookie:
            continue
        counts[source.kind] = counts.get(source.kind, 0) + 1
    for kind, n in counts.items():
        if kind != "src" and n > 1:
            raise ConfigError(
                f"STICKY_KEY (--sticky-key): invalid value {','.join(map(str, s.sticky_key))!r}: at most one "
                f"'{kind}:' element besides the sticky cookie {s.sticky_cookie!r} (the SPOE message has one slot)"
            )
    if s.decide == "table":
        for source in s.sticky_key:
            if source.name and not _CONFIG_WORD.match(source.name):
                raise ConfigError(
                    f"STICKY_KEY (--sticky-key): invalid value {','.join(map(str, s.sticky_key))!r}: with DECIDE=table "
                    f"HAProxy reads {source.name!r} in its config, where only letters, digits, '_', '.' and '-' "
                    "are safe; rename it or set DECIDE=agent")
    if s.https_redirect and not s.https and not s.service_name:  # (a service's own: the top level checked)
        raise ConfigError("HTTPS_REDIRECT (--https-redirect) is on but TLS_CERT (--tls-cert) and ACME_DOMAINS "
                          "(--acme-domains) are empty: nothing would answer the HTTPS the redirects point to")
    if s.hsts_max_age and not s.https and not s.service_name:
        raise ConfigError("HSTS_MAX_AGE (--hsts-max-age) is set but TLS_CERT (--tls-cert) and ACME_DOMAINS "
                          "(--acme-domains) are empty: the header is sent on HTTPS answers only")
    if s.listen == s.metrics_listen:
        raise ConfigError(f"AGENT_LISTEN and METRICS_LISTEN are both {s.listen}")


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as environment variables, so a child process (`run` → agent) gets the same ones."""
    env: dict[str, str] = {}
    for opt in OPTIONS:
        if opt.attr == "service" and settings.services:
            continue  # several services: the child reads them from SWARM_CONFIG_FILE as we did
        value = getattr(settings, opt.attr)
        if isinstance(value, tuple):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, float):
            text = repr(value)
        else:
            text = str(value)
        env[opt.env] = text
    return env


def settings_table() -> Sequence[tuple[str, str, str, str]]:
    """(env, flag, default, meaning) rows, for docs and `--help`."""
    return [(o.env, o.flag, o.default_text, o.help) for o in OPTIONS]


__all__ = [
    "OPTIONS",
    "ConfigError",
    "HostPort",
    "KeySource",
    "Route",
    "ServiceLine",
    "ServiceSpec",
    "Settings",
    "add_arguments",
    "load_settings",
    "ondemand_listen",
    "parse_host_port",
    "parse_service",
    "parse_sticky_key",
    "pattern_backends",
    "service_settings",
    "settings_env",
    "settings_table",
]
DERIVED = frozenset({"services", "service_name", "service_path"})
assert {f.name for f in fields(Settings)} == {o.attr for o in OPTIONS} | DERIVED
