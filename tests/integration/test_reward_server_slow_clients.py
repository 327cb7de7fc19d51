"""The reward server under slow and hostile clients, on 127.0.0.1: the eviction rule of its connection
slots (alone, then over sockets), every error answered as JSON, and a slowloris of twice the slot count
that cannot lock out a client with the token. Deadlines of the request line, headers and body:
test_reward_server.py::test_slow_senders_are_cut_off_at_their_deadlines."""

import argparse
import contextlib
import json
import socket
import threading
import time

import pytest
import torch

from fastvideo_grpo.rewards.serving.remote import RewardClient, encode_tensor
from fastvideo_grpo.rewards.serving.server import RewardService, limits_from, serve_in_thread
from fastvideo_grpo.rewards.serving.server_guard import ConnectionSlots, ServerLimits
from support.scripts import load_script

TOKEN = "test-token-0123456789abcdef"
PARTIAL = b"POST /score HTTP/1.1\r\nHost: x\r\nX-Slow: a"  # a header that never ends


def _mean_reward(images, prompts, **metadata):
    x = images.reshape(images.shape[0], -1).mean(-1)
    return x * torch.tensor([1.0 + len(p) for p in prompts]), {}


def _imgs(b, seed):
    return torch.rand(b, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _server(monkeypatch, **limits):
    monkeypatch.delenv("FVG_REWARD_TOKEN", raising=False)
    service = RewardService({"mean": _mean_reward}, max_batch=4, num_threads=torch.get_num_threads())
    srv, thread = serve_in_thread(service, "127.0.0.1", 0, token=TOKEN, limits=ServerLimits(**limits))
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def _until(cond, what: str, limit: float = 20.0):
    """Wait (polling) until ``cond()``; the limit only guards a hang, it decides nothing."""
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def _read_all(sock) -> str:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data.decode("latin-1")


def _json_error(answer: str) -> str:
    """The ``error`` text of a JSON error answer (fails on anything else, e.g. the stdlib's HTML page)."""
    head, _, body = answer.partition("\r\n\r\n")
    assert "\r\nContent-Type: application/json\r\n" in head + "\r\n", answer[:300]
    error = json.loads(body)["error"]
    assert isinstance(error, str) and error
    return error


def _score_request(x, prompts, token=TOKEN):
    body = json.dumps({"reward": "mean", "images": encode_tensor(x), "prompts": prompts}).encode()
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    head = f"{auth}Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    return head, body


class _FakeSock:
    def __init__(self, fail=False):
        self.shut, self.fail = [], fail

    def shutdown(self, how):
        self.shut.append(how)
        if self.fail:
            raise OSError("already gone")


def test_connection_slots_evict_the_connection_waiting_longest():
    slots = ConnectionSlots(max_total=3, max_per_peer=2)
    b1, _ = slots.open("b", _FakeSock())
    a1, _ = slots.open("a", _FakeSock(fail=True))  # an eviction goes through even if shutdown fails
    a2, _ = slots.open("a", _FakeSock())
    assert len(slots) == 3 and slots.waiting() == 3
    # peer "a" is at its cap: its own longest-waiting connection goes, not b1 (older, another peer)
    a3, why = slots.open("a", _FakeSock())
    assert a3 is not None and why == ""
    assert a1.evicted and a1.sock.shut == [socket.SHUT_RD] and not b1.evicted and len(slots) == 3
    assert not slots.authenticate(a1)  # too late: it lost its slot
    # the server is full: the longest-waiting connection of anyone goes; authenticated ones never do
    assert slots.authenticate(a2)
    c1, _ = slots.open("c", _FakeSock())
    assert b1.evicted and b1.sock.shut == [socket.SHUT_RD] and not a2.evicted and not a3.evicted
    assert slots.authenticate(a3) and slots.authenticate(c1) and slots.waiting() == 0
    # nothing waits: refused, naming the cap that was hit
    conn, why = slots.open("d", _FakeSock())
    assert conn is None and "--max-connections)" in why
    conn, why = slots.open("a", _FakeSock())
    assert conn is None and "--max-connections-per-peer" in why and "from a " in why
    # a kept-alive connection waiting for its next request is evictable again, as the newest waiter
    slots.wait_again(a2)
    e1, _ = slots.open("e", _FakeSock())
    assert a2.evicted and e1 is not None and slots.evictions == 3
    slots.wait_again(a2)  # no effect on an evicted connection
    assert a2.evicted and not a2.authenticated
    # closing gives the slot back once, also for evicted connections (their slot is already free)
    for conn in (a1, a2, a3, c1, e1, e1):
        slots.close(conn)
    assert len(slots) == 0 and slots.waiting() == 0
    assert not slots.authenticate(e1)
    with pytest.raises(ValueError, match="max_connections_per_peer must be an integer > 0"):
        ServerLimits(max_connections_per_peer=0)
    with pytest.raises(ValueError, match="header_timeout must be a number > 0"):
        ServerLimits(header_timeout=0)
    # the CLI's flags win over the config file's keys, which win over the defaults
    flags = dict.fromkeys(["max_body_mb", "header_timeout", "read_timeout", "max_connections", "max_queue",
                           "queue_timeout"])
    limits = limits_from(argparse.Namespace(**flags, max_connections_per_peer=3),
                         {"header_timeout": 2.5, "max_connections_per_peer": 7})
    assert (limits.header_timeout, limits.max_connections_per_peer) == (2.5, 3)
    assert limits.read_timeout == ServerLimits().read_timeout


def test_every_error_answer_is_json(monkeypatch):
    """The standard library's own refusals (431, 414, 400, 505, 501) included, not only the server's."""
    with _server(monkeypatch, max_body_bytes=1024, header_timeout=1.0, read_timeout=1.0) as srv:
        port = srv.server_address[1]

        def ask(raw: bytes) -> str:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(raw)
                return _read_all(s)

        auth = f"Authorization: Bearer {TOKEN}\r\n".encode()
        cases = {
            431: b"POST /score HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n",  # one 200 kB line
            401: b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(20)) + b"\r\n",
            414: b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n",
            400: b"garbage\r\n\r\n",
            505: b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n",
            501: b"PUT /score HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 0\r\n\r\n",
            404: b"GET /nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth + b"\r\n",
            411: b"POST /score HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
            413: b"POST /score HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 5000\r\n\r\n",
            408: b"POST /score HTTP/1.1\r\nHost: x\r\n",  # the header never ends: --header-timeout
        }
        many = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(120)) + b"\r\n"
        for code, raw in [*cases.items(), (431, many)]:
            answer = ask(raw)
            assert answer.startswith(f"HTTP/1.1 {code} "), (code, answer[:200])
            error = _json_error(answer)
            assert {431: "header", 408: "--header-timeout", 413: "--max-body-mb", 401: "token"}.get(code, "") in error
        ok = ask(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth + b"\r\n")
        assert ok.startswith("HTTP/1.1 200 ") and json.loads(ok.partition("\r\n\r\n")[2])["auth"] is True


def test_full_slots_evict_the_longest_waiting_and_refuse_only_when_all_are_served(monkeypatch):
    """Over sockets: beyond the per-peer cap the peer's longest-waiting connection is closed with a
    JSON 503 (a later one keeps its slot and is served once it finishes its header); a client with the
    token gets in the same way; with every slot authenticated a new connection gets 503 from the
    accepting thread, naming the cap that was hit (per peer, then in all)."""
    x, prompts = _imgs(2, 0), ["a cat", "a dog"]
    expected = _mean_reward(x, prompts)[0]
    with _server(monkeypatch, max_connections=3, max_connections_per_peer=2, header_timeout=60, read_timeout=60,
                 max_queue=4) as srv, contextlib.ExitStack() as stack:
        port = srv.server_address[1]

        def connect(first: bytes = PARTIAL):
            s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30))
            s.sendall(first)
            return s

        a = connect()
        _until(lambda: len(srv.slots) == 1, "the first connection")
        b = connect()
        _until(lambda: len(srv.slots) == 2, "the second connection")
        c = connect()  # the peer is at its cap of 2: a (waiting longest) goes, though the server has a 3rd slot
        answer = _read_all(a)
        assert answer.startswith("HTTP/1.1 503 ") and "--max-connections-per-peer" in _json_error(answer)
        _until(lambda: len(srv.slots) == 2 and srv.slots.evictions == 1, "c in a's slot")
        scores, _ = RewardClient(port=port, token=TOKEN, retries=0, timeout=30).score("mean", x, prompts)
        assert torch.equal(scores, expected)  # it took b's slot
        assert _read_all(b).startswith("HTTP/1.1 503 ")
        head, body = _score_request(x, prompts)
        c.sendall(b"\r\n" + head + body)  # c kept its slot all along: it finishes its header and is served
        answer = _read_all(c)
        assert answer.startswith("HTTP/1.1 200 ")
        assert torch.equal(torch.tensor(json.loads(answer.partition("\r\n\r\n")[2])["scores"]), expected)
        assert srv.slots.evictions == 2
        # two authenticated requests whose bodies have not come yet fill the peer's cap: nobody to evict
        _until(lambda: len(srv.slots) == 0, "the slots to empty")
        busy = [connect(b"POST /score HTTP/1.1\r\nHost: x\r\n" + head) for _ in range(2)]
        _until(lambda: len(srv.slots) == 2 and srv.slots.waiting() == 0, "two authenticated connections")
        answer = _read_all(connect(b""))
        assert answer.startswith("HTTP/1.1 503 ") and "--max-connections-per-peer)" in _json_error(answer)
        for s in busy:
            s.close()
        _until(lambda: len(srv.slots) == 0, "the slots to empty")
    # the cap in all: one peer may hold every slot here; authenticated, none can be evicted
    with _server(monkeypatch, max_connections=2, max_connections_per_peer=8, header_timeout=60,
                 read_timeout=60) as srv, contextlib.ExitStack() as stack:
        port = srv.server_address[1]
        for _ in range(2):
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=30)).sendall(
                b"POST /score HTTP/1.1\r\nHost: x\r\n" + head)
        _until(lambda: len(srv.slots) == 2 and srv.slots.waiting() == 0, "two authenticated connections")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            answer = _read_all(s)
        assert answer.startswith("HTTP/1.1 503 ") and "--max-connections)" in _json_error(answer)
        assert srv.slots.evictions == 0


def test_slowloris_of_twice_the_slots_does_not_lock_out_a_client_with_the_token(monkeypatch):
    """8 slots, 16 slow connections (a request line, then a header byte every 0.2 s; reopened when
    closed) from the same address as the client, and a header deadline longer than the test, so only
    the eviction rule can make room. Before the rule, the slow connections held every slot and the
    client got 503 until its retries ran out."""
    slots, slow = 8, 16
    requests = 4
    t0 = time.monotonic()
    Slowloris = load_script("bench", "reward_server_load").Slowloris
    with _server(monkeypatch, max_connections=slots, max_connections_per_peer=2 * slow, header_timeout=120,
                 read_timeout=10, max_queue=4) as srv:
        port = srv.server_address[1]
        with Slowloris("127.0.0.1", port, slow, every=0.2) as attack:
            client = RewardClient(port=port, token=TOKEN, timeout=10, retries=3, backoff=0.1)
            for r in range(requests):
                # every slot held by a slow connection (they refill the slot a request left within a tick)
                _until(lambda: len(srv.slots) == slots and srv.slots.waiting() == slots, "the slowloris")
                before = srv.slots.evictions
                x, prompts = _imgs(3, 100 + r), [f"request {r} sample {i}" for i in range(3)]
                scores, _ = client.score("mean", x, prompts)
                assert torch.equal(scores, _mean_reward(x, prompts)[0])  # its own answer
                assert srv.slots.evictions > before  # it could only get in by taking a slow one's slot
            assert attack.alive() == slow and attack.opened >= slow  # the slowloris ran all along
        # every slow connection the server closed was told why, as JSON 503 (None: the 503 lost to a
        # reset); none timed out (120 s) or got another answer; "stopped": held when the attack stopped
        assert set(attack.answers) <= {503, None, "stopped"} and attack.answers[503] >= 1, attack.answers
        _until(lambda: len(srv.slots) == 0, "the slots to empty after the slowloris")
    assert time.monotonic() - t0 < 30
