"""The ACME account key's JWK thumbprint (RFC 7638), from its PEM file, without a crypto library.

Owns: reading the public half of an EC (P-256, P-384, P-521) or RSA private key in PEM (PKCS#8,
SEC1 `EC PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`) and its thumbprint. HAProxy writes the account
key (PKCS#8, EC P-384 by default) the first time it parses an `acme` section; every replica that
shares the key's directory has the same thumbprint, so every replica can answer any HTTP-01 token
with `<token>.<thumbprint>` (the "stateless" answer, RFC 8555 section 8.1: the key authorization of
a token is the token and the account's thumbprint) whichever replica ordered the certificate.
Must not: hold or log the private key.
"""

from __future__ import annotations

import base64
import hashlib
import json

# OIDs (DER content bytes) of the key algorithms and curves we read.
_EC_PUBLIC_KEY = bytes.fromhex("2a8648ce3d0201")  # 1.2.840.10045.2.1
_RSA_ENCRYPTION = bytes.fromhex("2a864886f70d010101")  # 1.2.840.113549.1.1.1
_CURVES = {
    bytes.fromhex("2a8648ce3d030107"): ("P-256", 32),  # prime256v1
    bytes.fromhex("2b81040022"): ("P-384", 48),  # secp384r1
    bytes.fromhex("2b81040023"): ("P-521", 66),  # secp521r1
}


class AccountKeyError(ValueError):
    """The file is not a private key we can read; the message says why."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _tlv(data: bytes, pos: int) -> tuple[int, bytes, int]:
    """One DER element at `pos`: (tag, content, position after it)."""
    if pos + 2 > len(data):
        raise AccountKeyError("truncated DER")
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 4 or pos + n > len(data):
            raise AccountKeyError("bad DER length")
        length = int.from_bytes(data[pos:pos + n], "big")
        pos += n
    if pos + length > len(data):
        raise AccountKeyError("truncated DER")
    return tag, data[pos:pos + length], pos + length


def _children(content: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(content):
        tag, value, pos = _tlv(content, pos)
        out.append((tag, value))
    return out


def _pem_body(pem: bytes) -> tuple[str, bytes]:
    text = pem.decode("ascii", errors="replace")
    begin = text.find("-----BEGIN ")
    if begin < 0:
        raise AccountKeyError("no PEM block")
    label_end = text.find("-----", begin + 11)
    label = text[begin + 11:label_end]
    end = text.find(f"-----END {label}-----", label_end)
    if end < 0:
        raise AccountKeyError(f"no END line for {label}")
    body = "".join(text[label_end + 5:end].split())
    try:
        return label, base64.b64decode(body, validate=True)
    except ValueError:
        raise AccountKeyError("bad base64 in the PEM block") from None


def _uint(value: bytes) -> bytes:
    return value.lstrip(b"\0") or b"\0"


def _ec_jwk(ec_private_key: bytes, curve_oid: bytes | None) -> dict[str, str]:
    """SEC1 ECPrivateKey: SEQUENCE { version, privateKey, [0] curve OPTIONAL, [1] publicKey OPTIONAL }."""
    tag, content, _ = _tlv(ec_private_key, 0)
    fields = _children(content)
    public: bytes | None = None
    for tag, value in fields[2:]:
        if tag == 0xA0:
            _, curve_oid, _ = _tlv(value, 0)
        elif tag == 0xA1:
            _, bits, _ = _tlv(value, 0)
            public = bits[1:]  # skip the unused-bits byte
    if curve_oid not in _CURVES:
        raise AccountKeyError("an EC key on a curve other than P-256, P-384 or P-521")
    crv, size = _CURVES[curve_oid]
    if public is None or len(public) != 1 + 2 * size or public[0] != 4:
        raise AccountKeyError("the EC key holds no uncompressed public point")
    return {"crv": crv, "kty": "EC", "x": _b64url(public[1:1 + size]), "y": _b64url(public[1 + size:])}


def _rsa_jwk(rsa_private_key: bytes) -> dict[str, str]:
    """PKCS#1 RSAPrivateKey: SEQUENCE { version, n, e, ... }."""
    _, content, _ = _tlv(rsa_private_key, 0)
    fields = _children(content)
    if len(fields) < 3:
        raise AccountKeyError("an RSA key without modulus and exponent")
    return {"e": _b64url(_uint(fields[2][1])), "kty": "RSA", "n": _b64url(_uint(fields[1][1]))}


def public_jwk(pem: bytes) -> dict[str, str]:
    """The public JWK of a private key in PEM."""
    label, der = _pem_body(pem)
    if "ENCRYPTED" in label:
        raise AccountKeyError("the key is encrypted")
    if label == "EC PRIVATE KEY":
        return _ec_jwk(der, None)
    if label == "RSA PRIVATE KEY":
        return _rsa_jwk(der)
    if label != "PRIVATE KEY":
        raise AccountKeyError(f"a PEM {label!r}, not a private key")
    # PKCS#8: SEQUENCE { version, AlgorithmIdentifier { algorithm, parameters }, OCTET STRING key }
    _, content, _ = _tlv(der, 0)
    fields = _children(content)
    if len(fields) < 3:
        raise AccountKeyError("not a PKCS#8 private key")
    algorithm = _children(fields[1][1])
    oid = algorithm[0][1]
    if oid == _EC_PUBLIC_KEY:
        return _ec_jwk(fields[2][1], algorithm[1][1] if len(algorithm) > 1 else None)
    if oid == _RSA_ENCRYPTION:
        return _rsa_jwk(fields[2][1])
    raise AccountKeyError("neither an EC nor an RSA key")


def thumbprint(pem: bytes) -> str:
    """RFC 7638: base64url(SHA-256(the public JWK's required members, sorted, no white space))."""
    jwk = public_jwk(pem)
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()
    return _b64url(hashlib.sha256(canonical).digest())
