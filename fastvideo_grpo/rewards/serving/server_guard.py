"""What keeps the reward server safe to expose: the shared-secret token, the request limits, the
loopback check for the bind address, the table of open connections with its eviction rule, and a
socket reader with a deadline.

* Token: read from a file (``--token-file``) or the ``FVG_REWARD_TOKEN`` environment variable, never
  from a command line (other users see command lines in ``ps``). Clients send
  ``Authorization: Bearer <token>``; the server compares in constant time (:func:`token_matches`).
* :class:`ServerLimits`: request body cap (413 before the body is read), the time the request line
  and headers may take to arrive (408, or a silent close when nothing came), the time the body may
  take after them (408), the number of open connections in all and per peer address, the number of
  scoring requests admitted at once (beyond it: 429) and how long an admitted request waits for the
  models (beyond it: 503).
* :class:`ConnectionSlots`: the open connections. A connection *waits* until it has sent a complete
  request header with the token; a new connection beyond a cap takes the place of the one that has
  waited longest (its peer's own when the peer is at its cap, anyone's when the server is full), so
  slow or idle senders cannot lock out a client that sends its header at once. Only when every
  connection in the way is authenticated is the new one refused (503).
* :class:`DeadlineReader`: the connection's read side; every ``recv`` gets the time left until the
  current deadline as its timeout, so a sender dripping one byte at a time cannot outlast it (a
  plain socket timeout restarts at every byte); on a connection evicted from its slot it raises
  :class:`ConnectionEvicted`.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

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
    read_timeout: float = 120.0          # [--read-timeout] seconds for the body, from the end of the headers -> 408
    max_connections: int = 64            # [--max-connections] open connections; full: evict a waiting one, else 503
    max_queue: int = 16                  # [--max-queue] scoring requests admitted at once -> 429
    queue_timeout: float = 300.0         # [--queue-timeout] seconds an admitted request waits for the models -> 503
    header_timeout: float = 10.0         # [--header-timeout] seconds for the request line + headers -> 408 / close
    max_connections_per_peer: int = 16   # [--max-connections-per-peer] open connections of one peer address

    def __post_init__(self):
        for name in ("max_body_bytes", "max_connections", "max_queue", "max_connections_per_peer"):
            _positive(name, getattr(self, name), integer=True)
        for name in ("read_timeout", "queue_timeout", "header_timeout"):
            _positive(name, getattr(self, name), integer=False)


class Connection:
    """One open connection's entry in :class:`ConnectionSlots`. ``sock`` only needs ``shutdown``."""

    __slots__ = ("peer", "sock", "waiting_since", "authenticated", "evicted", "closed")

    def __init__(self, peer: str, sock, waiting_since: int):
        self.peer, self.sock, self.waiting_since = peer, sock, waiting_since
        self.authenticated = self.evicted = self.closed = False


class ConnectionSlots:
    """The open connections: at most ``max_total``, at most ``max_per_peer`` of one peer address.

    A connection is *waiting* from when it opens, and again after each answer on a kept-alive
    connection, until it has sent a complete request header carrying the token (or any complete
    header on a server without a token): then it is *authenticated* until its answer is sent.
    :meth:`open` admits a new connection beyond a cap by evicting the connection that has waited
    longest (its peer's own when that peer is at its cap, anyone's when the server is full): the
    entry is removed at once and its socket's read side shut down, which wakes its handler (its
    reader raises :class:`ConnectionEvicted`). Authenticated connections are never evicted; when
    only they stand in the way, the new connection is refused.

    Thread-safe. The socket is shut down under the lock, and :meth:`close` (called before the
    server closes the socket) takes the same lock, so an evicted socket is never one already closed.
    """

    def __init__(self, max_total: int, max_per_peer: int):
        self.max_total, self.max_per_peer = int(max_total), int(max_per_peer)
        self._lock = threading.Lock()
        self._open: Dict[Connection, None] = {}  # insertion-ordered set
        self._per_peer: Dict[str, int] = {}
        self._ticket = itertools.count()  # orders the waits: lower = waiting longer
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._open)

    def waiting(self) -> int:
        """How many open connections have not yet sent a complete authenticated header."""
        with self._lock:
            return sum(not c.authenticated for c in self._open)

    def open(self, peer: str, sock) -> Tuple[Optional[Connection], str]:
        """(the new connection's entry, "") or (None, why it is refused)."""
        with self._lock:
            victim = None
            if self._per_peer.get(peer, 0) >= self.max_per_peer:
                victim = self._longest_waiting(peer)
                if victim is None:
                    return None, (f"reward server busy: {self.max_per_peer} connections from {peer} are open and "
                                  "all are being served (--max-connections-per-peer); retry later")
            elif len(self._open) >= self.max_total:
                victim = self._longest_waiting(None)
                if victim is None:
                    return None, (f"reward server busy: {self.max_total} connections are open and all are being "
                                  "served (--max-connections); retry later")
            if victim is not None:
                self._evict(victim)
            conn = Connection(peer, sock, next(self._ticket))
            self._open[conn] = None
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            return conn, ""

    def authenticate(self, conn: Connection) -> bool:
        """Mark ``conn`` authenticated (no longer evictable); False when it was evicted already."""
        with self._lock:
            if conn.evicted or conn.closed:
                return False
            conn.authenticated = True
            return True

    def wait_again(self, conn: Connection) -> None:
        """``conn`` waits for its next request (kept alive after an answer): evictable again, as the newest."""
        with self._lock:
            if not (conn.evicted or conn.closed):
                conn.authenticated = False
                conn.waiting_since = next(self._ticket)

    def close(self, conn: Connection) -> None:
        """Give the slot back; call before closing the socket. Idempotent."""
        with self._lock:
            if not (conn.evicted or conn.closed):
                self._remove(conn)
            conn.closed = True

    def _longest_waiting(self, peer: Optional[str]) -> Optional[Connection]:
        candidates = [c for c in self._open if not c.authenticated and (peer is None or c.peer == peer)]
        return min(candidates, key=lambda c: c.waiting_since, default=None)

    def _remove(self, conn: Connection) -> None:
        del self._open[conn]
        left = self._per_peer[conn.peer] - 1
        if left:
            self._per_peer[conn.peer] = left
        else:
            del self._per_peer[conn.peer]

    def _evict(self, conn: Connection) -> None:
        self._remove(conn)
        conn.evicted = True
        self.evictions += 1
        try:
            conn.sock.shutdown(socket.SHUT_RD)  # its blocked recv returns: the handler answers 503 and closes
        except OSError:
            pass


class ConnectionEvicted(ConnectionAbortedError):
    """The connection lost its slot to a newer one before it sent a complete authenticated header."""


class DeadlineReader(io.RawIOBase):
    """A socket's read side whose every ``recv`` times out at :attr:`deadline` (``time.monotonic()``).
    :attr:`received` counts the bytes read; ``evicted()`` says whether an end of stream means the
    server took the slot away (then :class:`ConnectionEvicted` is raised instead of returning it)."""

    def __init__(self, sock: socket.socket, evicted: Callable[[], bool] = lambda: False):
        super().__init__()
        self.sock, self.deadline, self.received, self.evicted = sock, float("inf"), 0, evicted

    def readable(self):
        return True

    def readinto(self, b):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request deadline passed")
        self.sock.settimeout(min(left, 3600.0))
        n = self.sock.recv_into(b)
        if n == 0 and self.evicted():
            raise ConnectionEvicted("the connection was evicted from its slot")
        self.received += n
        return n
