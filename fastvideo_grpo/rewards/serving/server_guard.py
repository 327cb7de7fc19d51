"""What keeps the reward server safe to expose: the shared-secret token, the request limits, the
loopback check for the bind address, and a socket reader with a per-request deadline.

* Token: read from a file (``--token-file``) or the ``FVG_REWARD_TOKEN`` environment variable, never
  from a command line (other users see command lines in ``ps``). Clients send
  ``Authorization: Bearer <token>``; the server compares in constant time (:func:`token_matches`).
* :class:`ServerLimits`: request body cap (413 before the body is read), the time one request may
  take to arrive (headers + body; a slow or stalled sender is cut off, 408), the number of open
  connections (beyond it: 503 and close), the number of scoring requests admitted at once (beyond
  it: 429) and how long an admitted request waits for the models (beyond it: 503).
* :class:`DeadlineReader`: the connection's read side; every ``recv`` gets the time left until the
  request's deadline as its timeout, so a sender dripping one byte at a time cannot outlast it (a
  plain socket timeout restarts at every byte).
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import os
import socket
import time
from dataclasses import dataclass
from typing import Optional

TOKEN_ENV = "FVG_REWARD_TOKEN"
MIN_TOKEN_CHARS = 16
TOKEN_HINT = "generate one with `python -c \"import secrets; print(secrets.token_urlsafe(32))\"`"


def check_token(token: str, source: str) -> str:
    """The token without surrounding white space; ValueError when it is unusable."""
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"the reward server token from {source} has {len(token)} characters; use at least "
                         f"{MIN_TOKEN_CHARS}: {TOKEN_HINT}")
    if not all(33 <= ord(c) < 127 for c in token):
        raise ValueError(f"the reward server token from {source} must be printable ASCII without spaces "
                         f"(it travels in an HTTP header): {TOKEN_HINT}")
    return token


def load_token(token_file: Optional[str] = None, environ=None) -> Optional[str]:
    """The shared secret: ``token_file``'s content if given, else ``$FVG_REWARD_TOKEN``, else None."""
    if token_file:
        if not os.path.isfile(token_file):
            raise FileNotFoundError(f"token file {token_file!r} does not exist; write the shared token into it "
                                    f"({TOKEN_HINT}) or set {TOKEN_ENV} instead")
        with open(token_file) as f:
            return check_token(f.read(), f"token file {token_file!r}")
    value = (os.environ if environ is None else environ).get(TOKEN_ENV)
    if value is None or not value.strip():
        return None
    return check_token(value, f"${TOKEN_ENV}")


def token_matches(header: Optional[str], token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>``, compared in constant time."""
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].strip().encode(), token.encode())


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is a loopback address ("" and 0.0.0.0 are not)."""
    if host in ("", "0.0.0.0", "::"):
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def check_bind(host: str, token: Optional[str], insecure: bool) -> bool:
    """Whether ``host`` is reachable from other machines; ValueError when it is and there is no token
    and no explicit ``insecure``."""
    if is_loopback(host):
        return False
    if token is None and not insecure:
        raise ValueError(f"refusing to bind {host!r} without a token: anyone who can reach the port could use the "
                         f"models behind it. Set ${TOKEN_ENV} or --token-file ({TOKEN_HINT}), or pass --insecure "
                         "on a network you trust (docs/rewards.md, 'Across machines')")
    return True


def _positive(name: str, value, integer: bool):
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int))
    if bad or value <= 0:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"reward server {name} must be {kind} > 0, got {value!r}")


@dataclass(frozen=True)
class ServerLimits:
    """Request limits (CLI flags in brackets). Defaults fit one video sample of 53 x 480 x 848 float32
    per request (~345 MB as base64) and a few trainer ranks per server."""

    max_body_bytes: int = 512 * 2 ** 20  # [--max-body-mb] request body cap -> 413
    read_timeout: float = 120.0          # [--read-timeout] seconds for one request's headers + body -> 408
    max_connections: int = 64            # [--max-connections] open connections -> 503 + close
    max_queue: int = 16                  # [--max-queue] scoring requests admitted at once -> 429
    queue_timeout: float = 300.0         # [--queue-timeout] seconds an admitted request waits for the models -> 503

    def __post_init__(self):
        for name in ("max_body_bytes", "max_connections", "max_queue"):
            _positive(name, getattr(self, name), integer=True)
        for name in ("read_timeout", "queue_timeout"):
            _positive(name, getattr(self, name), integer=False)


class DeadlineReader(io.RawIOBase):
    """A socket's read side whose every ``recv`` times out at :attr:`deadline` (``time.monotonic()``)."""

    def __init__(self, sock: socket.socket):
        super().__init__()
        self.sock, self.deadline = sock, float("inf")

    def readable(self):
        return True

    def readinto(self, b):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(min(left, 3600.0))
        return self.sock.recv_into(b)
