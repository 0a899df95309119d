"""Shared access signatures, signed and verified the way the SDK and edgeHub do.

Signing follows the SDK (`common/auth/sastoken.py`): `sr` is `quote(uri, safe="")` (upper-case escapes) and
the signature is HMAC-SHA256 over `sr + "\\n" + se`. Verification follows edgeHub
(`edge-util/.../SharedAccessSignature.cs`): keep `sr` exactly as received (the escape casing is part of what
was signed), URL-decode only `sig` and `se`, try each key, compare in constant time, allow five minutes of
clock skew.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import urllib.parse
from dataclasses import dataclass

PREFIX = "SharedAccessSignature "
CLOCK_SKEW_S = 300  # SharedAccessSignatureConstants.MaxClockSkew in edgeHub


class SasError(Exception):
    """The token is malformed, expired, signed with another key or meant for another audience."""


@dataclass(frozen=True, slots=True)
class SasToken:
    resource_raw: str
    """`sr` exactly as sent (still URL-encoded)."""
    signature: bytes
    expiry_raw: str
    """`se` as sent: it, not a re-formatted integer, is what was signed."""

    @property
    def expiry(self) -> int:
        return int(self.expiry_raw)

    @property
    def resource(self) -> str:
        return urllib.parse.unquote(self.resource_raw)


def sign(key_b64: str, message: str) -> str:
    """Base64 HMAC-SHA256 of `message` with a base64 symmetric key (what the workload API's sign returns)."""
    digest = hmac.digest(base64.b64decode(key_b64), message.encode("utf-8"), hashlib.sha256)
    return base64.b64encode(digest).decode()


def generate(uri: str, key_b64: str, ttl_s: int = 3600, now: float | None = None) -> str:
    """A device/module token as the SDK builds it, for raw-MQTT tests and the control API."""
    expiry = int((time.time() if now is None else now) + ttl_s)
    sr = urllib.parse.quote(uri, safe="")
    sig = urllib.parse.quote(sign(key_b64, f"{sr}\n{expiry}"), safe="")
    return f"{PREFIX}sr={sr}&sig={sig}&se={expiry}"


def parse(token: str) -> SasToken:
    if not token.startswith(PREFIX):
        raise SasError("not a SharedAccessSignature")
    fields: dict[str, str] = {}
    for part in token[len(PREFIX) :].split("&"):
        key, sep, value = part.partition("=")
        if not sep or key in fields:
            raise SasError(f"malformed field {part!r}")
        fields[key] = value
    try:
        sr, sig, se = fields["sr"], fields["sig"], fields["se"]
    except KeyError as exc:
        raise SasError(f"missing field {exc.args[0]}") from exc
    if not se.isdigit():
        raise SasError("se is not a number of seconds")
    try:
        signature = base64.b64decode(urllib.parse.unquote(sig), validate=True)
    except ValueError as exc:
        raise SasError("sig is not base64") from exc
    return SasToken(sr, signature, se)


def verify(token: SasToken, keys: list[str], now: float | None = None) -> None:
    """Raise SasError unless the token is unexpired and signed with one of `keys` (base64)."""
    if token.expiry + CLOCK_SKEW_S < (time.time() if now is None else now):
        raise SasError("token expired")
    message = f"{token.resource_raw}\n{token.expiry_raw}".encode()
    for key in keys:
        expected = hmac.digest(base64.b64decode(key), message, hashlib.sha256)
        if hmac.compare_digest(expected, token.signature):
            return
    raise SasError("signature does not match any key")
