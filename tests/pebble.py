"""Pebble, Let's Encrypt's ACME test server (Debian's `pebble`), as a child process on loopback.

Its own HTTPS (the directory) uses a certificate made here by the `openssl` command for `CA_NAME`,
signed by a CA made here too (what ACME_CA_FILE names); the test's dnsmasq answers CA_NAME and the
ACME names with 127.0.0.1, both for HAProxy (its httpclient resolves through DNS_NAMESERVER) and for
Pebble's validation (`-dnsserver`). Pebble validates HTTP-01 on `http_port` (HAProxy's plain-HTTP
port): every request it makes goes to 127.0.0.1. PEBBLE_VA_NOSLEEP: no random sleep before a
validation; PEBBLE_WFE_NONCEREJECT=0: no nonce refused at random; PEBBLE_AUTHZREUSE=0: every order
is validated again (a renewal proves the challenge anew). Pebble keeps nothing across a restart.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from spoa.config import HostPort
from spoa.local.ports import free_port

CA_NAME = "ca.acme.test"
BINARY = "/usr/bin/pebble"


def make_ca(directory: Path) -> tuple[str, str, str]:
    """(CA certificate, Pebble's certificate, its key): a CA and a server certificate for CA_NAME."""
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert, ext = (directory / n for n in ("pebble.key", "pebble.csr", "pebble.pem", "pebble.ext"))

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/CN=haproxy-swarm test CA")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={CA_NAME}")
    ext.write_text(f"subjectAltName=DNS:{CA_NAME}\n")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
            "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return str(ca), str(cert), str(key)


class Pebble:
    def __init__(self, workdir: str, dns: HostPort, http_port: int) -> None:
        self.workdir = Path(workdir)
        self.dns = dns
        self.http_port = http_port
        self.port = free_port()
        self.management_port = free_port()
        self.ca, self.cert, self.key = make_ca(self.workdir)
        self.log_path = self.workdir / "pebble.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def directory(self) -> str:
        return f"https://{CA_NAME}:{self.port}/dir"

    def start(self, http_port: int | None = None, timeout: float = 15.0) -> Pebble:
        """Start it (validating on `http_port`, by default the one given at creation)."""
        config = self.workdir / "pebble.json"
        config.write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": self.cert, "privateKey": self.key,
            "httpPort": http_port or self.http_port, "tlsPort": free_port(),
            "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
        env = dict(os.environ) | {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self.proc = subprocess.Popen([BINARY, "-config", str(config), "-dnsserver", str(self.dns)], env=env,
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            os.close(log)
        deadline = time.monotonic() + timeout
        context = ssl.create_default_context(cafile=self.ca)
        context.check_hostname = False  # reached by address here; HAProxy checks the name
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pebble exited at start: {self.log()[-2000:]}")
            try:
                with urllib.request.urlopen(f"https://127.0.0.1:{self.port}/dir", context=context, timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"pebble did not answer within {timeout}s: {self.log()[-2000:]}")

    def root(self) -> str:
        """The root Pebble issues under (a file): what a client trusts to verify its certificates."""
        context = ssl.create_default_context(cafile=self.ca)
        context.check_hostname = False
        with urllib.request.urlopen(f"https://127.0.0.1:{self.management_port}/roots/0", context=context,
                                    timeout=5) as r:
            pem = r.read()
        path = self.workdir / f"root-{self.management_port}.pem"
        path.write_bytes(pem)
        return str(path)

    def issued(self) -> int:
        """Certificates issued since this object first started it (Pebble's log, across restarts)."""
        return self.log().count("Issued certificate serial")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)

    def __enter__(self) -> Pebble:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
