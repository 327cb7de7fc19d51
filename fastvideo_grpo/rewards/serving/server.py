"""Reward server: run reward models in a separate process behind a small HTTP/JSON API.

Start it (binds 127.0.0.1 by default; ``--port 0`` picks a free port and prints it)::

    python -m fastvideo_grpo.rewards.serving.server --config rewards.yaml --port 8765
    python -m fastvideo_grpo.rewards.serving.server --reward hps --set model_path=ckpts/hps_v2.1_hf --port 8765

``rewards.yaml`` maps served names to reward configs (``type`` = registry name, default the name)::

    rewards:
      hps: {model_path: ckpts/hps_v2.1_hf}
      clip: {type: clip_score, model_path: ckpts/clip-vit-h-14}
    max_batch: 16
    num_threads: 0   # torch intra-op threads per scoring call; 0 = torch's default (as train.num_threads)

API: ``GET /health`` -> ``{"rewards": [...], "max_batch": N, "num_threads": T}``; ``POST /score`` with
``{"reward": name, "images": {"dtype", "shape", "data": base64 of the raw little-endian bytes},
"prompts": [...], "metadata": {...}}`` -> ``{"scores": [...], "info": {...}}``. The server splits a
request into chunks of ``max_batch`` samples (per-sample metadata lists are split alongside) and
runs one request at a time (models are not thread-safe). Input errors answer 400 (the client raises
ValueError), unknown rewards 404 (ValueError), failures 500 (RuntimeError).

Across machines (docs/rewards.md, "Across machines"): with a token (``$FVG_REWARD_TOKEN`` or
``--token-file``, never on the command line) every request needs ``Authorization: Bearer <token>``
or gets 401, loopback included; a non-loopback ``--host`` without a token is refused unless
``--insecure``. Limits (server_guard.ServerLimits): ``--max-body-mb`` (413 from the headers, before
the body is read), ``--header-timeout`` (a request's line and headers; 408 and close),
``--read-timeout`` (its body, after the headers; 408 and close), ``--max-connections`` and
``--max-connections-per-peer`` (beyond either, the connection that has waited longest without a
complete header carrying the token is closed with 503 to make room; when none waits, the new one
gets 503), ``--max-queue`` (scoring requests admitted at once; 429) and ``--queue-timeout`` (an
admitted request's wait for the models; 503). Every error answer is JSON ``{"error": "..."}``, the
standard library's own refusals (431, 414, 400, 501, 505) included. The standard library's threaded
server is kept: these limits are small additions to it, and one model call at a time, not HTTP,
bounds throughput. docs/reliability.md says what the server does under slow and hostile clients.

Every request is handled on its own thread, and torch's intra-op thread count is a per-thread
setting (see fastvideo_grpo/utils/threads.py), so each scoring call sets ``num_threads`` (``--threads``)
in the thread that runs it: a different count may split float reductions differently. A service in
the caller's process with the caller's count gives bit-identical scores; a server process (or
another machine) gives scores equal up to float32 rounding, since its math libraries may choose
other kernels or blockings even for the same count.

The client side (RewardClient and the ``remote`` reward) is in remote.py.
"""

from __future__ import annotations

import argparse
import importlib
import io
import json
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional, Sequence

import torch

from ...utils.threads import resolve_num_threads, thread_count
from ..base import REWARDS, RewardFn, check_scores, validate_reward_inputs
from .remote import DEFAULT_HOST, DEFAULT_PORT, _jsonable, _merge_infos, decode_tensor
from .server_guard import (TOKEN_ENV, ConnectionEvicted, ConnectionSlots, DeadlineReader, ServerLimits, check_bind,
                           check_token, load_token, token_matches)

# ---------------------------------------------------------------- server

class ServiceBusy(RuntimeError):
    """The models stayed busy for longer than the caller was willing to wait."""


class RewardService:
    """Named reward functions scored in chunks of ``max_batch``, one request at a time, each with
    ``num_threads`` torch intra-op threads in whichever thread calls :meth:`score`.

    ``num_threads=0`` (the default) fixes the count of the constructing thread at construction:
    torch's default in a fresh server process, the caller's own count in process.
    """

    def __init__(self, rewards: Dict[str, RewardFn], max_batch: int = 16, num_threads: int = 0):
        if not rewards:
            raise ValueError("the reward server needs at least one reward")
        if int(max_batch) < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.rewards, self.max_batch = dict(rewards), int(max_batch)
        self.num_threads = resolve_num_threads(num_threads, "the reward server's num_threads (--threads)")
        self._lock = threading.Lock()

    def score(self, name: str, images: torch.Tensor, prompts: Sequence[str], metadata: Optional[dict] = None,
              wait: Optional[float] = None):
        """Scores and merged info; ``wait``: seconds to wait for the models (ServiceBusy after), None = no limit."""
        if name not in self.rewards:
            raise KeyError(name)
        validate_reward_inputs(images, prompts)
        metadata = metadata or {}
        if not self._lock.acquire(timeout=-1 if wait is None else max(float(wait), 0.0)):
            raise ServiceBusy(f"reward server busy: the models stayed busy for {wait:g} s (--queue-timeout); "
                              "retry later, add a server, or raise --queue-timeout")
        try:
            return self._score_locked(name, images, prompts, metadata)
        finally:
            self._lock.release()

    def _score_locked(self, name, images, prompts, metadata):
        b = images.shape[0]
        scores, infos, sizes = [], [], []
        with thread_count(self.num_threads):
            for s in range(0, b, self.max_batch):
                e = min(b, s + self.max_batch)
                md = {k: (v[s:e] if isinstance(v, list) and len(v) == b else v) for k, v in metadata.items()}
                sc, info = self.rewards[name](images[s:e], list(prompts[s:e]), **md)
                scores.append(check_scores(name, sc, e - s))
                infos.append(_jsonable(info or {}))
                sizes.append(e - s)
        return torch.cat(scores), _merge_infos(infos, sizes)


def _reason(code: int) -> str:
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "Error"


class RewardHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer whose open connections are held in server_guard.ConnectionSlots (capped in
    all and per peer address; beyond a cap the connection that has waited longest for a complete
    authenticated header is evicted, or, when none waits, the new one gets 503 from the accepting
    thread, no worker started) and the shared state of the handlers: the token, the limits and the
    admission semaphore (at most ``max_queue`` scoring requests past the header checks)."""

    daemon_threads = True
    request_queue_size = 64  # listen backlog
    EVICTION_NOTE_S = 60.0   # at most one log line a minute about evictions

    def __init__(self, address, handler, limits: ServerLimits, token: Optional[str]):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.limits, self.token = limits, token
        self.admitted = threading.BoundedSemaphore(limits.max_queue)
        self.slots = ConnectionSlots(limits.max_connections, limits.max_connections_per_peer)
        self._evictions_noted, self._next_note = 0, 0.0
        super().__init__(address, handler)

    @property
    def open_connections(self) -> int:
        return len(self.slots)

    def process_request(self, request, client_address):
        conn, refusal = self.slots.open(client_address[0], request)
        self._note_evictions()
        if conn is None:
            self._refuse_at_accept(request, refusal)
            self.shutdown_request(request)
            return
        t = threading.Thread(target=self._serve_connection, args=(request, client_address, conn), daemon=True)
        try:
            t.start()
        except BaseException:
            self.slots.close(conn)  # the caller closes the socket
            raise

    def _serve_connection(self, request, client_address, conn):
        try:
            self.RequestHandlerClass(request, client_address, self, conn)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.slots.close(conn)  # before the socket closes: an eviction never shuts down a closed socket
            self.shutdown_request(request)

    @staticmethod
    def _refuse_at_accept(request, message: str):
        body = json.dumps({"error": message}).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.settimeout(1.0)  # a few hundred bytes: fit any send buffer, never block the accept loop long
            request.sendall(head + body)
            request.shutdown(socket.SHUT_WR)
            request.setblocking(False)
            request.recv(1 << 16)  # what already arrived: closing on unread data resets the connection
        except OSError:
            pass

    def _note_evictions(self):
        n, now = self.slots.evictions, time.monotonic()
        if n > self._evictions_noted and now >= self._next_note:
            print(f"[reward server] {n - self._evictions_noted} connection(s) closed to make room for new ones: they "
                  f"had not sent a complete request header with the token (slow or idle clients; "
                  f"{self.slots.max_total} slots, --max-connections)", file=sys.stderr, flush=True)
            self._evictions_noted, self._next_note = n, now + self.EVICTION_NOTE_S

    def handle_error(self, request, client_address):  # one line, not a traceback; keep serving
        e = sys.exc_info()[1]
        print(f"[reward server] connection {client_address}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)


def _handler(service: RewardService):
    class Handler(BaseHTTPRequestHandler):
        """One connection. Each request has two deadlines: ``header_timeout`` for the request line and
        headers (counted from when the server starts waiting for the request, so an idle kept-alive
        connection is closed then too) and ``read_timeout`` for the body (counted from the end of the
        headers). Until its header is complete and carries the token the connection may be evicted
        from its slot (server_guard.ConnectionSlots). Every error is answered as JSON."""

        protocol_version = "HTTP/1.1"

        def __init__(self, request, client_address, server, conn):
            self._conn, self._authenticated = conn, False
            super().__init__(request, client_address, server)

        def log_message(self, fmt, *args):  # quiet: one line per error only
            pass

        def log_request(self, code="-", size="-"):
            pass

        def setup(self):
            super().setup()
            self.rfile.close()  # replaced by a reader with deadlines that notices an eviction
            self._reader = DeadlineReader(self.connection, evicted=lambda: self._conn.evicted)
            self.rfile = io.BufferedReader(self._reader, 65536)

        def handle_one_request(self):
            limits = self.server.limits
            if self._authenticated:  # the next request on a kept-alive connection: evictable again
                self.server.slots.wait_again(self._conn)
            self._authenticated, self.raw_requestline, self.command = False, b"", None
            self.requestline, self.request_version = "", self.protocol_version  # for an answer before parsing
            received = self._reader.received
            self._reader.deadline = time.monotonic() + limits.header_timeout
            try:
                self.raw_requestline = self.rfile.readline(65537)
                if len(self.raw_requestline) > 65536:
                    self.requestline = self.request_version = self.command = ""
                    self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
                    return
                if not self.raw_requestline:  # the client closed an idle connection
                    self.close_connection = True
                    return
                if not self.parse_request():  # malformed: answered by send_error
                    return
                if self.request_version == "HTTP/0.9":  # no headers, no status line: not this API
                    self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 requests are not served; send HTTP/1.1")
                    return
                if not self._authenticate():
                    return
            except ConnectionEvicted:
                self._answer_evicted()
                return
            except TimeoutError:
                self.close_connection = True
                if self.raw_requestline or self._reader.received > received:  # an idle connection: close silently
                    self._refuse(408, f"the request line and headers did not arrive within {limits.header_timeout:g} s "
                                      "(--header-timeout); send the whole header at once", timeout=1.0)
                return
            except OSError:  # reset by the client: nothing to answer
                self.close_connection = True
                return
            self._reader.deadline = time.monotonic() + limits.read_timeout  # the body's own deadline
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"method {self.command} is not supported; use GET /health "
                                                            "or POST /score")
                return
            try:
                method()
                self.wfile.flush()
            except OSError:  # reset by the client, or a write timed out
                self.close_connection = True

        def _authenticate(self) -> bool:
            """Whether the complete header carries the token (else 401) and the connection still holds
            its slot (else 503); from here on it cannot be evicted."""
            if self._authenticated:
                return True
            token = self.server.token
            if token is not None and not token_matches(self.headers.get("Authorization"), token):
                what = "a wrong token" if self.headers.get("Authorization") else "no token"
                unread = self._content_length() if self.command == "POST" else 0
                self._refuse(401, f"this reward server needs its token and got {what}: send 'Authorization: Bearer "
                                  f"<token>' (the remote reward reads ${TOKEN_ENV} or token_file)", unread=unread,
                             headers=[("WWW-Authenticate", "Bearer")])
                return False
            if not self.server.slots.authenticate(self._conn):
                self._answer_evicted()
                return False
            self._authenticated = True
            return True

        def _answer_evicted(self):
            self._send(503, {"error": "reward server full: this connection was closed to make room for a new one "
                                      "because it had not sent a complete request header with the token (the one "
                                      "waiting longest goes first; --max-connections, --max-connections-per-peer); "
                                      "send the whole header at once, and retry"},
                       close=True, headers=[("Retry-After", "1")], timeout=1.0, quiet=True)

        def send_error(self, code, message=None, explain=None):
            """The standard library's refusals (malformed request line, 414, 431, 501, 505) as JSON, like
            every other answer, instead of its HTML page."""
            text = message or _reason(int(code))
            if explain:
                text = f"{text}: {explain}"
            if self.request_version == "HTTP/0.9":  # a malformed request line: answer with a status line anyway
                self.request_version = self.protocol_version
            # the rest of an oversized or malformed header may still be on the way: drain a little of it
            self._refuse(int(code), text, unread=1 << 20, timeout=1.0)

        def _send(self, code: int, obj: dict, close: bool = False, headers: Sequence = (),
                  timeout: Optional[float] = None, quiet: bool = False):
            body = json.dumps(obj).encode()
            limits = self.server.limits
            if timeout is None:  # bounds a client that does not read
                timeout = limits.read_timeout if self._authenticated else limits.header_timeout
            try:
                self.connection.settimeout(timeout)
                self.send_response(code, _reason(code))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers:
                    self.send_header(k, v)
                if close:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(body)
            except OSError:  # the client gave up (its timeout) or vanished: one line
                self.close_connection = True
                if not quiet:
                    print(f"[reward server] client {self.client_address[0]}:{self.client_address[1]} left before "
                          f"the answer to {self.command} {getattr(self, 'path', '')} (client timeout?)",
                          file=sys.stderr, flush=True)

        def _refuse(self, code: int, msg: str, unread: int = 0, headers: Sequence = (),
                    timeout: Optional[float] = None):
            """Answer ``code`` and close. A body left unread (up to ``unread`` bytes) is drained for a
            short while first ("lingering close"): closing a socket with unread data sends a reset, which
            can destroy the answer before the client reads it."""
            self._send(code, {"error": msg}, close=True, headers=headers, timeout=timeout,
                       quiet=not self._authenticated)
            if unread <= 0:
                return
            limits = self.server.limits
            try:
                self.connection.shutdown(socket.SHUT_WR)
                wait = limits.read_timeout if self._authenticated else limits.header_timeout
                self._reader.deadline = time.monotonic() + min(5.0, wait)
                while unread > 0:
                    chunk = self.rfile.read1(min(unread, 1 << 20))
                    if not chunk:
                        break
                    unread -= len(chunk)
            except OSError:
                pass

        def _check_headers(self):
            """(code, message, headers) refusing an authenticated request from its headers alone, or None."""
            if self.command != "POST":
                return None
            if self.headers.get("Transfer-Encoding"):
                return 411, "send the body with a Content-Length (chunked transfer is not accepted)", []
            length = self.headers.get("Content-Length")
            if length is None or not length.strip().isdigit():
                return 411, f"send a Content-Length header (got {length!r})", []
            n, cap = int(length), self.server.limits.max_body_bytes
            if n > cap:
                return (413, f"request body of {n} bytes is over this server's limit of {cap} bytes "
                             f"(--max-body-mb {cap / 2 ** 20:g}): send fewer samples per request (chunk_size), "
                             f"use wire_dtype uint8, or raise the server's --max-body-mb", [])
            return None

        def _content_length(self) -> int:
            value = self.headers.get("Content-Length", "0").strip()
            return int(value) if value.isdigit() else 0

        def handle_expect_100(self):  # refuse from the headers before the client sends the body
            if not self._authenticate():
                return False
            refusal = self._check_headers()
            if refusal:
                self._refuse(refusal[0], refusal[1], headers=refusal[2])
                return False
            return super().handle_expect_100()

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                limits = self.server.limits
                self._send(200, {"rewards": sorted(service.rewards), "max_batch": service.max_batch,
                                 "num_threads": service.num_threads, "max_body_bytes": limits.max_body_bytes,
                                 "max_queue": limits.max_queue, "auth": self.server.token is not None})
            else:
                self._send(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

        def do_POST(self):
            refusal = self._check_headers()
            if refusal:
                self._refuse(refusal[0], refusal[1], unread=self._content_length(), headers=refusal[2])
                return
            n = self._content_length()
            if self.path.rstrip("/") != "/score":
                self._refuse(404, f"unknown path {self.path}; use POST /score", unread=n)
                return
            limits = self.server.limits
            if not self.server.admitted.acquire(blocking=False):
                self._refuse(429, f"reward server busy: {limits.max_queue} requests already admitted "
                                  "(--max-queue); retry later", unread=n, headers=[("Retry-After", "1")])
                return
            try:
                self._score(n)
            finally:
                self.server.admitted.release()

        def _score(self, n: int):
            try:
                raw = self.rfile.read(n)
            except TimeoutError:
                self._refuse(408, f"the request body did not arrive within {self.server.limits.read_timeout:g} s "
                                  "(--read-timeout): send fewer samples per request or raise --read-timeout")
                return
            except OSError:  # the client vanished mid-body
                self.close_connection = True
                return
            if len(raw) < n:  # the client closed the connection mid-body: nobody to answer
                self.close_connection = True
                print(f"[reward server] client {self.client_address[0]}:{self.client_address[1]} closed after "
                      f"{len(raw)} of {n} body bytes", file=sys.stderr, flush=True)
                return
            try:
                req = json.loads(raw)
                del raw
                if not isinstance(req, dict):
                    raise ValueError("the request must be a JSON object")
                name = req.get("reward")
                images = decode_tensor(req.get("images") or {})
                prompts = req.get("prompts")
                if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
                    raise ValueError("prompts must be a JSON list of strings")
                scores, info = service.score(name, images, prompts, req.get("metadata") or {},
                                             wait=self.server.limits.queue_timeout)
            except ServiceBusy as e:
                self._send(503, {"error": str(e)}, headers=[("Retry-After", "1")])
            except KeyError as e:
                self._send(404, {"error": f"reward {e.args[0]!r} is not served here; served: {sorted(service.rewards)}"})
            except (ValueError, json.JSONDecodeError) as e:
                self._send(400, {"error": str(e)})
            except Exception as e:  # noqa: BLE001 - report, keep serving
                print(f"[reward server] {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                self._send(500, {"error": f"{type(e).__name__}: {e}"})
            else:
                self._send(200, {"scores": scores.tolist(), "info": info})

    return Handler


def make_server(service: RewardService, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                token: Optional[str] = None, limits: Optional[ServerLimits] = None,
                insecure: bool = False) -> RewardHTTPServer:
    """Bind the server (not yet serving). ``token``: the shared secret every request must carry
    (see server_guard.load_token). A non-loopback ``host`` without a token is refused unless
    ``insecure``."""
    if token is not None:
        token = check_token(token, "the token argument")
    if check_bind(host, token, insecure):
        if token is None:
            print(f"[reward server] WARNING: binding {host} without a token (--insecure)", file=sys.stderr)
        else:
            print(f"[reward server] note: binding {host}: the token and images travel unencrypted; on untrusted "
                  "networks put a TLS-terminating proxy in front (docs/rewards.md)", file=sys.stderr)
    return RewardHTTPServer((host, int(port)), _handler(service), limits or ServerLimits(), token)


def serve_in_thread(service: RewardService, host: str = DEFAULT_HOST, port: int = 0, **kwargs):
    """Start a server on a background thread; returns (server, thread). Stop: server.shutdown().
    ``kwargs``: make_server's (token, limits, insecure)."""
    server = make_server(service, host, port, **kwargs)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    t.start()
    return server, t


# ---------------------------------------------------------------- CLI

def _parse_value(s: str):
    try:
        return json.loads(s)
    except json.JSONDecodeError:
        return s


def load_server_config(path: str) -> dict:
    with open(path) as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        import yaml

        cfg = yaml.safe_load(text)
    else:
        cfg = json.loads(text)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping with a 'rewards' section")
    return cfg


def build_rewards(reward_cfgs: Dict[str, dict]) -> Dict[str, RewardFn]:
    out = {}
    for name, cfg in reward_cfgs.items():
        cfg = dict(cfg or {})
        kind = cfg.pop("type", name)
        if kind == "remote":
            raise ValueError(f"reward {name!r}: a server cannot serve a 'remote' reward")
        out[name] = REWARDS.build(kind, **cfg)
    return out


CONFIG_KEYS = {"rewards", "host", "port", "max_batch", "num_threads", "token_file", "max_body_mb", "header_timeout",
               "read_timeout", "max_connections", "max_connections_per_peer", "max_queue", "queue_timeout"}


def _int_arg(lo: int, hi: Optional[int] = None, note: str = ""):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"must be {rng}{note}, got {v}")
        return v
    return parse


def _positive_arg(unit: str):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of {unit}, got {text!r}") from None
        if not v > 0 or v == float("inf"):
            raise argparse.ArgumentTypeError(f"must be a number of {unit} > 0, got {text}")
        return v
    return parse


def _pick(cli, cfg: dict, key: str, default):
    return cli if cli is not None else cfg.get(key, default)


def limits_from(a, cfg: dict) -> ServerLimits:
    d = ServerLimits()
    mb = _pick(a.max_body_mb, cfg, "max_body_mb", d.max_body_bytes / 2 ** 20)
    if isinstance(mb, bool) or not isinstance(mb, (int, float)) or not mb > 0:
        raise ValueError(f"max_body_mb must be a number > 0, got {mb!r}")
    return ServerLimits(max_body_bytes=int(mb * 2 ** 20),
                        header_timeout=_pick(a.header_timeout, cfg, "header_timeout", d.header_timeout),
                        read_timeout=_pick(a.read_timeout, cfg, "read_timeout", d.read_timeout),
                        max_connections=_pick(a.max_connections, cfg, "max_connections", d.max_connections),
                        max_connections_per_peer=_pick(a.max_connections_per_peer, cfg, "max_connections_per_peer",
                                                       d.max_connections_per_peer),
                        max_queue=_pick(a.max_queue, cfg, "max_queue", d.max_queue),
                        queue_timeout=_pick(a.queue_timeout, cfg, "queue_timeout", d.queue_timeout))


def main(argv=None):
    p = argparse.ArgumentParser(description="Serve reward models over HTTP (see the module docstring)")
    p.add_argument("--config", help="YAML/JSON file: {rewards: {name: {type: ..., ...}}, and optionally host, port, "
                                     "max_batch, num_threads, token_file and the limits below}")
    p.add_argument("--reward", help="serve one registered reward (instead of --config)")
    p.add_argument("--name", help="name to serve --reward under (default: the registry name)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config field for --reward (JSON values parsed), repeatable")
    p.add_argument("--import", dest="imports", action="append", default=[],
                   help="extra module to import first (registers custom rewards), repeatable")
    p.add_argument("--host", default=None, help=f"bind address (default {DEFAULT_HOST}; any other address needs a "
                                                f"token, or --insecure)")
    p.add_argument("--port", type=_int_arg(0, 65535), default=None,
                   help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--max-batch", type=_int_arg(1, note=" (samples per model call)"), default=None,
                   help="samples per model call (default 16)")
    p.add_argument("--threads", type=_int_arg(0, note=" (0 = torch's default)"), default=None,
                   help="torch intra-op threads per scoring call (default 0 = torch's default, as train.num_threads)")
    p.add_argument("--token-file", default=None,
                   help=f"file holding the shared token (default: ${TOKEN_ENV}); every request must carry it")
    p.add_argument("--token", dest="token_on_cli", default=None, help=argparse.SUPPRESS)
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback bind without a token (trusted networks only)")
    d = ServerLimits()
    p.add_argument("--max-body-mb", type=_positive_arg("MiB"), default=None,
                   help=f"largest request body in MiB (default {d.max_body_bytes / 2 ** 20:g}); larger: HTTP 413")
    p.add_argument("--header-timeout", type=_positive_arg("seconds"), default=None,
                   help=f"seconds a request's line and headers may take to arrive, counted from when the server "
                        f"starts waiting for them (default {d.header_timeout:g}); slower: HTTP 408 and the "
                        "connection closed (an idle connection is closed without an answer)")
    p.add_argument("--read-timeout", type=_positive_arg("seconds"), default=None,
                   help=f"seconds a request's body may take to arrive after its headers (default {d.read_timeout:g}); "
                        "slower: HTTP 408 and the connection closed")
    p.add_argument("--max-connections", type=_int_arg(1), default=None,
                   help=f"open connections at once (default {d.max_connections}); when full, the connection that has "
                        "waited longest without sending a complete header with the token is closed to make room "
                        "(HTTP 503 to it), and when none is waiting the new one gets HTTP 503")
    p.add_argument("--max-connections-per-peer", type=_int_arg(1), default=None,
                   help=f"open connections from one client address (default {d.max_connections_per_peer}); beyond it "
                        "the same rule within that address's connections. Raise it to --max-connections behind a "
                        "proxy (every connection then comes from the proxy's address)")
    p.add_argument("--max-queue", type=_int_arg(1), default=None,
                   help=f"scoring requests admitted at once, the one scoring included (default {d.max_queue}); "
                        "more: HTTP 429")
    p.add_argument("--queue-timeout", type=_positive_arg("seconds"), default=None,
                   help=f"seconds an admitted request waits for the models (default {d.queue_timeout:g}); "
                        "longer: HTTP 503")
    a = p.parse_args(argv)
    if a.token_on_cli is not None:
        p.error(f"--token is not accepted: command lines are visible to every user of the machine (ps). Put the "
                f"token in ${TOKEN_ENV} or in a file given with --token-file")

    def fail(msg):
        p.exit(2, f"{p.prog}: error: {msg}\n")

    # everything that can be checked is checked before any model is loaded
    try:
        cfg = load_server_config(a.config) if a.config else {}
        unknown = sorted(set(cfg) - CONFIG_KEYS)
        if "token" in cfg:
            raise ValueError(f"{a.config}: do not put the token in the config; use ${TOKEN_ENV} or token_file")
        if unknown:
            raise ValueError(f"{a.config}: unknown keys {unknown}; known: {sorted(CONFIG_KEYS)}")
        limits = limits_from(a, cfg)
        token = load_token(a.token_file or cfg.get("token_file"))
        host = a.host or cfg.get("host", DEFAULT_HOST)
        port = _int_arg(0, 65535)(str(_pick(a.port, cfg, "port", DEFAULT_PORT)))
        max_batch = _pick(a.max_batch, cfg, "max_batch", 16)
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1 (samples per model call), got {max_batch!r}")
        threads = _pick(a.threads, cfg, "num_threads", 0)
        resolve_num_threads(threads, "num_threads (--threads)")
        check_bind(host, token, a.insecure)  # make_server checks again; here before the models load
    except (ValueError, FileNotFoundError, argparse.ArgumentTypeError) as e:
        fail(str(e))

    importlib.import_module("fastvideo_grpo.rewards")  # registers the built-in rewards
    for mod in a.imports:
        importlib.import_module(mod)
    rewards_cfg = dict(cfg.get("rewards", {}))
    if a.reward:
        fields = {}
        for kv in a.set:
            if "=" not in kv:
                p.error(f"--set expects KEY=VALUE, got {kv!r}")
            k, v = kv.split("=", 1)
            fields[k] = _parse_value(v)
        rewards_cfg[a.name or a.reward] = {"type": a.reward, **fields}
    if not rewards_cfg:
        p.error("nothing to serve: give --config with a 'rewards' section or --reward NAME")
    service = RewardService(build_rewards(rewards_cfg), max_batch=max_batch, num_threads=threads)
    try:
        server = make_server(service, host, port, token=token, limits=limits, insecure=a.insecure)
    except (ValueError, OSError) as e:
        fail(f"cannot serve on {host}:{port}: {e}")
    print(f"reward server ready on http://{host}:{server.server_address[1]} rewards={sorted(service.rewards)} "
          f"auth={'token' if token else 'none'} threads={service.num_threads}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
