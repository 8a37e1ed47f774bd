"""ACME's parts that need no server: the account key's thumbprint against openssl's own reading of
the key, the settings (names, e-mail, directory, tls=acme on a service line), and what `run` writes
for HAProxy (the acme section and crt-store)."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from spoa.acme import render
from spoa.acme_key import AccountKeyError, public_jwk, thumbprint
from spoa.config import LETS_ENCRYPT, ConfigError, load_settings


def openssl(*args: str, data: bytes | None = None) -> bytes:
    return subprocess.run(["openssl", *args], input=data, capture_output=True, check=True, timeout=30).stdout


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize(("kind", "args"), [
    ("P-256 PKCS#8", ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]),
    ("P-384 PKCS#8", ["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-384"]),
    ("P-384 SEC1", ["ecparam", "-name", "secp384r1", "-genkey", "-noout"]),
    ("RSA PKCS#8", ["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]),
    ("RSA PKCS#1", ["genrsa", "-traditional", "2048"]),
])
def test_thumbprint_matches_the_public_key_openssl_reads(kind: str, args: list[str]) -> None:
    pem = openssl(*args)
    jwk = public_jwk(pem)
    if jwk["kty"] == "EC":
        # The uncompressed point ends the DER public key: 04 || x || y.
        der = openssl("pkey", "-pubout", "-outform", "DER", data=pem)
        size = {"P-256": 32, "P-384": 48}[jwk["crv"]]
        point = der[-(2 * size + 1):]
        assert point[0] == 4 and (jwk["x"], jwk["y"]) == (b64url(point[1:1 + size]), b64url(point[1 + size:]))
    else:
        modulus = openssl("rsa", "-noout", "-modulus", data=pem).decode().strip().removeprefix("Modulus=")
        assert jwk["n"] == b64url(bytes.fromhex(modulus)) and jwk["e"] == "AQAB"
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()
    assert thumbprint(pem) == b64url(hashlib.sha256(canonical).digest()), kind


def test_a_key_we_cannot_read_is_said_so() -> None:
    with pytest.raises(AccountKeyError, match="not a private key"):
        thumbprint(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(AccountKeyError, match="no PEM"):
        thumbprint(b"garbage")


def test_acme_settings_and_their_errors() -> None:
    base = {"SWARM_SERVICE": "tasks.x:80"}
    s = load_settings({}, base | {"ACME_DOMAINS": "Shop.Example.com., api.example.com"})
    assert s.acme_names == ("shop.example.com", "api.example.com") and s.https
    assert s.acme_directory == LETS_ENCRYPT
    assert not load_settings({}, base).https
    for env, message in [
        ({"ACME_DOMAINS": "a.example.com,a.example.com"}, "ACME_DOMAINS .* twice"),
        ({"ACME_DOMAINS": "localhost"}, "ACME_DOMAINS .* not a DNS name"),
        ({"ACME_DOMAINS": "a b.example.com"}, "ACME_DOMAINS .* not a DNS name"),
        ({"ACME_EMAIL": "ops@"}, "ACME_EMAIL .* not an e-mail address"),
        ({"ACME_DIRECTORY": "https://x y/dir"}, "ACME_DIRECTORY .* an https:// URL"),
        ({"ACME_CA_FILE": "/nonexistent/ca.pem"}, "ACME_CA_FILE .* not a readable file"),
        ({"HTTPS_REDIRECT": "1"}, "HTTPS_REDIRECT .* TLS_CERT .* ACME_DOMAINS"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_settings({}, base | env)


def test_tls_acme_on_a_service_line(tmp_path: Path) -> None:
    config = tmp_path / "services"
    config.write_text("shop.example.com tasks.shop:80 tls=acme\napi.example.com/v1 tasks.api:80 tls=acme\n"
                      "tasks.default:80\n")
    s = load_settings({}, {"SWARM_CONFIG_FILE": str(config), "ACME_DOMAINS": "www.example.com",
                           "HTTPS_REDIRECT": "1"})
    assert s.acme_names == ("www.example.com", "shop.example.com", "api.example.com")
    for line, message in [("*.example.com tasks.x:80 tls=acme", "one exact Host"),
                          ("/api tasks.x:80 tls=acme", "one exact Host"),
                          ("shop.example.com tasks.x:80 tls=yes", "expected tls=acme")]:
        config.write_text(line + "\n")
        with pytest.raises(ConfigError, match=f"line 1: .*{message}"):
            load_settings({}, {"SWARM_CONFIG_FILE": str(config)})


def test_what_haproxy_reads_first() -> None:
    s = load_settings({}, {"SWARM_SERVICE": "tasks.x:80", "ACME_DOMAINS": "a.example.com,b.example.com",
                           "ACME_EMAIL": "ops@example.com", "ACME_DIR": "/data/acme"})
    text = render(s)
    assert "acme.scheduler off" in text and "expose-experimental-directives" in text
    assert f'directory "{LETS_ENCRYPT}"' in text and 'contact "ops@example.com"' in text
    assert 'account-key "/data/acme/account.key"' in text and 'crt-base "/data/acme/certs"' in text
    assert 'load crt "b.example.com.pem" acme haproxy_swarm domains "b.example.com"' in text
    assert "httpclient.ssl.ca-file" not in text  # the system's CAs
