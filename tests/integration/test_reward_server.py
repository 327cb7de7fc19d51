"""The reward server end to end on 127.0.0.1: remote scores equal in-process scores (threaded server
and the real CLI in a subprocess with a tiny CLIP), handler threads scoring with the service's thread
count, chunking, error mapping, down server, timeout; the token, each limit's refusal (401, 411, 413,
408, 429, 503), the CLI's refusals, a bounded load test with faults (no lost or mismatched answer),
the client's errors for answers that are not the reward API's, and https."""

import json
import os
import queue
import select
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time

import pytest
import torch

from fastvideo_grpo.rewards import REWARDS
from fastvideo_grpo.rewards.serving.remote import RewardClient, decode_tensor, encode_tensor
from fastvideo_grpo.rewards.serving.server import RewardService, serve_in_thread
from fastvideo_grpo.utils.threads import thread_count

PROMPTS = ["a red cat", "a blue dog", "green tree", "the sun", "a cat"]
PATCH = 16  # the tiny CLIP's patch size: its longest reduction is the 3 * 16 * 16 patch embedding
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _mean_reward(images, prompts, **metadata):
    """Deterministic, per-sample and prompt-dependent; echoes per-sample metadata. Each sample is
    reduced on its own (one (C, H, W) tensor at a time), so its score goes through the same kernel
    with the same shape whatever batch or chunk it arrives in: remote == local bit for bit by
    construction (a batched ``mean(-1)`` would leave the summation order to the kernel's choice for
    the batch shape)."""
    x = torch.stack([im.mean() for im in images]) if images.shape[0] else images.new_zeros(0)
    s = x * torch.tensor([1.0 + len(p) for p in prompts])
    return s, {"per_sample": s.tolist(), "mean": float(s.mean()), "seed": metadata.get("seed", [])}


_RELEASE_SLOW = threading.Event()


def _slow_reward(images, prompts, **metadata):
    """Answers only once the test releases it (at most 60 s): no client timeout can race its answer."""
    _RELEASE_SLOW.wait(60)
    return torch.zeros(images.shape[0]), {}


def _failing_reward(images, prompts, **metadata):
    raise RuntimeError("model exploded")


def _sum_reward(images, prompts, **metadata):
    """One long float32 reduction per sample: how torch splits it, hence its last bits, depends on
    the calling thread's intra-op thread count. Reports that count."""
    return images.reshape(images.shape[0], -1).sum(-1), {"threads": torch.get_num_threads()}


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    d = str(tmp_path_factory.mktemp("srv_clip"))
    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 26 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = 52, 53
    with open(os.path.join(d, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(d, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    CLIPTokenizer(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")).save_pretrained(d)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=54, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=12, eos_token_id=53,
                                      bos_token_id=52, pad_token_id=53),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=PATCH),
                     projection_dim=8)
    CLIPModel(cfg).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def server(clip_dir):
    clip = REWARDS.build("clip_score", model_path=clip_dir, device="cpu")
    # the handler threads score with this process's count, so remote clip == local clip bit for bit
    service = RewardService({"mean": _mean_reward, "clip": clip, "slow": _slow_reward, "fail": _failing_reward},
                            max_batch=2, num_threads=torch.get_num_threads())
    srv, thread = serve_in_thread(service, "127.0.0.1", 0)
    yield srv.server_address[1], clip
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _imgs(b=5, seed=0):
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_tensor_wire_format_round_trip():
    x = _imgs(2)
    assert torch.equal(decode_tensor(encode_tensor(x, "float32")), x)
    q = decode_tensor(encode_tensor(x, "uint8"))
    assert (q - x).abs().max() <= 0.5 / 255 + 1e-6
    with pytest.raises(ValueError, match="bytes"):
        decode_tensor({**encode_tensor(x), "shape": [3, 3, 32, 32]})


@pytest.mark.numerics
def test_remote_equals_in_process_with_chunking(server):
    port, _ = server
    x, seeds = _imgs(), [10, 11, 12, 13, 14]
    local, linfo = _mean_reward(x, PROMPTS, seed=seeds)
    fn = REWARDS.build("remote", reward="mean", port=port, chunk_size=3)  # 2 requests, 2+1 / 2 server chunks
    s, info = fn(x, PROMPTS, seed=seeds)
    assert torch.equal(s, local)  # by construction: _mean_reward reduces each sample on its own
    assert info["per_sample"] == pytest.approx(linfo["per_sample"])
    assert info["seed"] == seeds  # per-sample metadata split and re-joined in order
    assert info["mean"] == pytest.approx(linfo["mean"])
    assert RewardClient(port=port).health()["rewards"] == ["clip", "fail", "mean", "slow"]


# Two summation orders of a K-term float32 dot product differ by at most about K * eps * sum|a_i b_i|.
# K = 3 * 16 * 16 = 768 is the tiny CLIP's longest reduction (the patch embedding) and the scores are
# cosines (|s| <= 1), so K * eps (9e-5) bounds a reordering: other batch shapes (the server's chunks),
# another process or another CPU's kernels. The uint8 wire's error (up to 2e-3) or one wrong prompt
# (~0.1) are far outside it.
CLIP_REORDER_TOL = 3 * PATCH * PATCH * torch.finfo(torch.float32).eps


@pytest.mark.numerics
def test_remote_clip_identical_and_uint8_close(server):
    """The server (max_batch=2) scores the 5 images in chunks of 2, 2, 1: bit for bit what this process
    computes for those chunks (same shapes, same kernels, same thread count: the service applies this
    process's count), and the whole-batch in-process scores up to a reordering of the sums (a BLAS
    kernel's rounding depends on the batch shape: on AVX-512 CPUs the 5-row and 2-row GEMMs differ)."""
    port, clip = server
    x = _imgs()
    local, _ = clip(x, PROMPTS)
    local_chunked = torch.cat([clip(x[i:i + 2], PROMPTS[i:i + 2])[0] for i in range(0, 5, 2)])
    remote, _ = REWARDS.build("remote", reward="clip", port=port)(x, PROMPTS)
    assert torch.equal(remote, local_chunked)
    torch.testing.assert_close(remote, local, rtol=0, atol=CLIP_REORDER_TOL)
    q, _ = REWARDS.build("remote", reward="clip", port=port, wire_dtype="uint8")(x, PROMPTS)
    torch.testing.assert_close(q, local, atol=2e-3, rtol=0)


@pytest.mark.numerics
@pytest.mark.parametrize("threads", [1, 2])
def test_handler_threads_score_with_the_service_thread_count(threads):
    """Each request runs on a new thread; the service sets its own count there (and restores the
    caller's on a direct call), so remote == local computed with that count, whatever the caller uses."""
    x = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(3))
    with thread_count(threads):
        local, _ = _sum_reward(x, PROMPTS[:1])
    caller = torch.get_num_threads()
    service = RewardService({"sum": _sum_reward}, max_batch=1, num_threads=threads)
    direct, dinfo = service.score("sum", x, PROMPTS[:1])
    assert dinfo["threads"] == threads and torch.get_num_threads() == caller
    srv, thread = serve_in_thread(service, "127.0.0.1", 0)
    try:
        client = RewardClient(port=srv.server_address[1])
        assert client.health()["num_threads"] == threads
        remote, info = REWARDS.build("remote", reward="sum", port=srv.server_address[1])(x, PROMPTS[:1])
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=30)
    assert info["threads"] == threads
    assert torch.equal(remote, local) and torch.equal(direct, local)
    assert torch.get_num_threads() == caller
    with pytest.raises(ValueError, match="num_threads"):
        RewardService({"sum": _sum_reward}, num_threads=-1)


def test_remote_errors_are_clear(server):
    port, _ = server
    fn = REWARDS.build("remote", reward="mean", port=port)
    bad = _imgs(2)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(bad, PROMPTS[:2])  # caught client-side
    client = RewardClient(port=port)
    body = {"reward": "mean", "images": encode_tensor(_imgs(2)), "prompts": PROMPTS[:3]}
    with pytest.raises(ValueError, match="rejected.*prompts"):  # server-side validation -> 400 -> ValueError
        client._request("POST", "/score", body)
    with pytest.raises(ValueError, match="does not serve"):
        REWARDS.build("remote", reward="nope", port=port)
    with pytest.raises(RuntimeError, match="model exploded"):
        REWARDS.build("remote", reward="fail", port=port)(_imgs(2), PROMPTS[:2])
    with pytest.raises(ValueError, match="reward="):
        REWARDS.build("remote", port=port)


def test_down_server_is_a_connection_error_naming_the_address():
    # A port bound but not listening refuses connections, and holding it for the whole test keeps any
    # other process from taking it (a port picked free and released could be reused by then).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match=rf"127\.0\.0\.1:{port}.*fastvideo_grpo\.rewards\.serving\.server"):
            REWARDS.build("remote", reward="hps", port=port, retries=2, backoff=0.01)
        assert time.monotonic() - t0 < 10  # 3 refused connects + 0.03 s back-off; no hang


def test_timeout_is_bounded(server):
    port, _ = server
    # check_on_build=False: the build-time health check would run under the same 0.3 s limit, which a
    # loaded machine can miss; the limit under test is the scoring request's.
    fn = REWARDS.build("remote", reward="slow", port=port, timeout=0.3, retries=1, backoff=0.01, check_on_build=False)
    _RELEASE_SLOW.clear()
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match=rf"127\.0\.0\.1:{port}.*2 tries"):
            fn(_imgs(1), PROMPTS[:1])
        # 2 tries x 0.3 s + 0.01 s back-off, while the server would hold the answer for 60 s
        assert time.monotonic() - t0 < 5
    finally:
        _RELEASE_SLOW.set()  # the abandoned requests finish now and free the service
    # answering clients that left costs the server one log line each, and it keeps serving
    local, _ = _mean_reward(_imgs(1), PROMPTS[:1])
    assert torch.equal(REWARDS.build("remote", reward="mean", port=port)(_imgs(1), PROMPTS[:1])[0], local)


@pytest.mark.numerics
def test_cli_server_subprocess_matches_in_process(clip_dir, tmp_path):
    cfg = tmp_path / "rewards.json"
    cfg.write_text(json.dumps({"rewards": {"clip": {"type": "clip_score", "model_path": clip_dir, "device": "cpu"}},
                               "max_batch": 2}))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    threads = torch.get_num_threads()  # the server scores with this test's count (--threads, not the env)
    proc = subprocess.Popen([sys.executable, "-m", "fastvideo_grpo.rewards.serving.server", "--config", str(cfg),
                             "--host", "127.0.0.1", "--port", "0", "--threads", str(threads)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines: "queue.Queue[str]" = queue.Queue()

    def pump():  # a reader thread: the wait below stays bounded even if the server stalls mid-line
        for out_line in proc.stdout:
            lines.put(out_line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        # start-up (imports, model load) took ~20 s on a loaded 2-core machine; 300 s only guards a hang
        port, seen, deadline = None, [], time.monotonic() + 300
        while port is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                if proc.poll() is not None and lines.empty():
                    break  # exited without the ready line
                continue
            seen.append(line)
            if line.startswith("reward server ready on http://127.0.0.1:"):
                port = int(line.split(":")[2].split()[0])
        assert port is not None, "server did not start:\n" + "".join(seen)
        assert seen[-1].rstrip().endswith(f"threads={threads}")
        assert RewardClient(port=port).health()["num_threads"] == threads
        x = _imgs()
        remote, _ = REWARDS.build("remote", reward="clip", port=port, timeout=300)(x, PROMPTS)
        local, _ = REWARDS.build("clip_score", model_path=clip_dir, device="cpu")(x, PROMPTS)
        # Another process, scoring in chunks of 2 (max_batch): same inputs (float32 wire is lossless), same
        # weights, same thread count, but other batch shapes than the whole-batch call here, so a float32
        # reduction may be summed in another order: within CLIP_REORDER_TOL (derived above).
        torch.testing.assert_close(remote, local, rtol=0, atol=CLIP_REORDER_TOL)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# ---------------------------------------------------------------- authentication, limits, load

TOKEN = "test-token-0123456789abcdef"
SMALL = 8  # images of 3 x 8 x 8: the load test measures the server, not the reward


def _raw(port, head: bytes, body: bytes = b"", timeout=10.0):
    """Send ``head`` (+ ``body``) on a fresh connection; (status, headers+body text) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    text = data.decode("latin-1")
    return (int(text.split()[1]) if text.startswith("HTTP/") else None), text


def _post_head(length, token=TOKEN, path="/score"):
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


@pytest.fixture
def guarded(monkeypatch):
    """A token-protected server with small limits; yields (port, server)."""
    monkeypatch.delenv("FVG_REWARD_TOKEN", raising=False)
    from fastvideo_grpo.rewards.serving.server_guard import ServerLimits

    limits = ServerLimits(max_body_bytes=256 * 1024, header_timeout=1.0, read_timeout=1.5, max_connections=32,
                          max_queue=16, queue_timeout=30.0)
    service = RewardService({"mean": _mean_reward}, max_batch=2, num_threads=torch.get_num_threads())
    srv, thread = serve_in_thread(service, "127.0.0.1", 0, token=TOKEN, limits=limits)
    yield srv.server_address[1], srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)


def test_token_is_required_on_loopback_and_errors_say_what_to_do(guarded, tmp_path, monkeypatch):
    port, _ = guarded
    with pytest.raises(ValueError, match="needs a token.*FVG_REWARD_TOKEN"):
        RewardClient(port=port).health()
    with pytest.raises(ValueError, match="refused the token"):
        RewardClient(port=port, token="wrong-token-0123456789").health()
    x, prompts = _imgs(3), PROMPTS[:3]
    local, _ = _mean_reward(x, prompts)
    monkeypatch.setenv("FVG_REWARD_TOKEN", TOKEN)  # the environment ...
    assert torch.equal(REWARDS.build("remote", reward="mean", port=port)(x, prompts)[0], local)
    monkeypatch.delenv("FVG_REWARD_TOKEN")
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")  # ... or a file (trailing newline stripped)
    assert torch.equal(REWARDS.build("remote", reward="mean", port=port, token_file=str(f))(x, prompts)[0], local)
    with pytest.raises(ValueError, match="do not put the token in the config"):
        REWARDS.build("remote", reward="mean", port=port, token=TOKEN)
    # refused from the headers: a claimed 1 GB body is never sent, the 401 comes anyway
    code, text = _raw(port, _post_head(10 ** 9, token="wrong-token-0123456789"))
    assert code == 401 and "WWW-Authenticate: Bearer" in text
    code, _ = _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert code == 401  # every path, loopback included


def test_token_helpers():
    from fastvideo_grpo.rewards.serving.server_guard import load_token, token_matches

    assert token_matches(f"Bearer {TOKEN}", TOKEN)
    assert not token_matches(f"Bearer {TOKEN}x", TOKEN) and not token_matches(TOKEN, TOKEN)
    assert not token_matches(None, TOKEN) and not token_matches("Basic abc", TOKEN)
    assert load_token(environ={}) is None
    assert load_token(environ={"FVG_REWARD_TOKEN": f" {TOKEN}\n"}) == TOKEN
    with pytest.raises(ValueError, match="at least 16.*secrets"):
        load_token(environ={"FVG_REWARD_TOKEN": "short"})
    with pytest.raises(FileNotFoundError, match="token file"):
        load_token("/nonexistent/token")


def test_non_loopback_bind_needs_a_token_or_insecure(monkeypatch, capsys):
    from fastvideo_grpo.rewards.serving.server import main, make_server

    monkeypatch.delenv("FVG_REWARD_TOKEN", raising=False)
    service = RewardService({"mean": _mean_reward})
    with pytest.raises(ValueError, match="refusing to bind '0.0.0.0' without a token.*--insecure"):
        make_server(service, "0.0.0.0", 0)
    for kwargs in ({"token": TOKEN}, {"insecure": True}):
        make_server(service, "0.0.0.0", 0, **kwargs).server_close()
    # the CLI refuses before loading any model (the model path does not exist)
    with pytest.raises(SystemExit):
        main(["--reward", "clip_score", "--set", "model_path=/nonexistent", "--host", "0.0.0.0", "--port", "0"])
    assert "refusing to bind '0.0.0.0' without a token" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--max-batch", "0"], "--max-batch: must be >= 1"),
    (["--max-batch", "two"], "--max-batch: expected an integer"),
    (["--port", "70000"], "--port: must be in [0, 65535]"),
    (["--threads", "-1"], "--threads: must be >= 0"),
    (["--read-timeout", "0"], "--read-timeout: must be a number of seconds > 0"),
    (["--header-timeout", "-1"], "--header-timeout: must be a number of seconds > 0"),
    (["--max-connections-per-peer", "0"], "--max-connections-per-peer: must be >= 1"),
    (["--max-queue", "0"], "--max-queue: must be >= 1"),
    (["--max-body-mb", "-5"], "--max-body-mb: must be a number of MiB > 0"),
    (["--token", TOKEN], "command lines are visible"),
    (["--token-file", "/nonexistent/token"], "token file '/nonexistent/token' does not exist"),
])
def test_cli_refuses_nonsense_values(args, message, capsys, monkeypatch):
    from fastvideo_grpo.rewards.serving.server import main

    monkeypatch.delenv("FVG_REWARD_TOKEN", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["--reward", "clip_score", "--set", "model_path=/nonexistent", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    ({"max_batch": 0}, "max_batch must be an integer >= 1"),
    ({"max_queue": 0}, "max_queue must be an integer > 0"),
    ({"read_timeout": "soon"}, "read_timeout must be a number > 0"),
    ({"header_timeout": 0}, "header_timeout must be a number > 0"),
    ({"max_connections_per_peer": 2.5}, "max_connections_per_peer must be an integer > 0"),
    ({"maxbatch": 4}, "unknown keys ['maxbatch']"),
    ({"token": TOKEN}, "do not put the token in the config"),
])
def test_cli_refuses_nonsense_config_values(extra, message, tmp_path, capsys, monkeypatch):
    from fastvideo_grpo.rewards.serving.server import main

    monkeypatch.delenv("FVG_REWARD_TOKEN", raising=False)
    cfg = tmp_path / "rewards.json"
    cfg.write_text(json.dumps({"rewards": {"clip": {"type": "clip_score", "model_path": "/nonexistent"}}, **extra}))
    with pytest.raises(SystemExit):
        main(["--config", str(cfg)])
    assert message in capsys.readouterr().err


def test_oversized_body_is_refused_before_it_is_read(guarded):
    port, srv = guarded
    cap = srv.limits.max_body_bytes
    t0 = time.monotonic()
    code, text = _raw(port, _post_head(cap + 1))  # no body sent at all: the answer comes from the headers
    assert code == 413 and "--max-body-mb" in text and time.monotonic() - t0 < 5
    # a client asking first (Expect: 100-continue) gets the 413 instead of the go-ahead
    code, text = _raw(port, _post_head(cap + 1).replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\n\r\n"))
    assert code == 413 and "100 Continue" not in text
    code, text = _raw(port, _post_head(1).replace(b"\r\n\r\n", b"\r\nExpect: 100-continue\r\nConnection: close"
                                                              b"\r\n\r\n"), b"{")
    assert code == 100 and "HTTP/1.1 400" in text  # within the limit: go ahead, then the answer
    code, text = _raw(port, _post_head(5).replace(b"Content-Length: 5", b"Transfer-Encoding: chunked"))
    assert code == 411
    x = torch.rand(1, 3, 700, 700)  # ~8 MB as base64 JSON: more than the socket buffers hold
    client = RewardClient(port=port, token=TOKEN, retries=0)
    with pytest.raises(ValueError, match="HTTP 413.*chunk_size.*uint8"):  # sent in full, drained, answered
        client.score("mean", x, PROMPTS[:1])
    client.health()  # learns the limit: refused before sending
    with pytest.raises(ValueError, match="over the limit.*GET /health.*chunk_size"):
        client.score("mean", x, PROMPTS[:1])


def _drip(port, head: bytes, dripped: bytes = b" ", every=0.1, limit=10.0):
    """Send ``head``, then ``dripped`` (repeated) one byte per ``every`` s -- each byte well within any
    per-recv timeout -- until the server answers or closes; (seconds, answer)."""
    t0 = time.monotonic()
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        s.sendall(head)
        i = 0
        while time.monotonic() - t0 < limit:
            try:
                s.sendall(dripped[i % len(dripped):i % len(dripped) + 1])
            except OSError:
                break
            i += 1
            if select.select([s], [], [], every)[0]:
                try:
                    while chunk := s.recv(65536):
                        data += chunk
                except (ConnectionResetError, TimeoutError):
                    pass
                break
    return time.monotonic() - t0, data.decode("latin-1")


def _json_answer(answer: str) -> dict:
    head, _, body = answer.partition("\r\n\r\n")
    assert "Content-Type: application/json" in head, answer
    return json.loads(body)


def test_slow_senders_are_cut_off_at_their_deadlines(guarded):
    """The request line and headers have their own deadline (--header-timeout, from when the server
    starts waiting), the body another (--read-timeout, from the end of the headers); a byte every 0.1 s
    outlasts neither, and both answer 408 as JSON. A connection that sends nothing is closed silently."""
    port, srv = guarded
    ht, rt = srv.limits.header_timeout, srv.limits.read_timeout
    out = {}

    def idle():
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            out["idle"] = (s.recv(100), time.monotonic() - t0)  # b"" when the server closes

    jobs = [threading.Thread(target=lambda: out.__setitem__("body", _drip(port, _post_head(1000)))),
            threading.Thread(target=idle)]
    for j in jobs:
        j.start()
    head_secs, head_answer = _drip(port, b"", b"POST /score HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200)
    for j in jobs:
        j.join(timeout=30)
    body_secs, body_answer = out["body"]
    assert body_answer.startswith("HTTP/1.1 408") and "--read-timeout" in _json_answer(body_answer)["error"]
    assert head_answer.startswith("HTTP/1.1 408") and "--header-timeout" in _json_answer(head_answer)["error"]
    idle_answer, idle_secs = out["idle"]
    assert idle_answer == b""  # nothing was asked, so nothing is answered
    for secs, limit in ((head_secs, ht), (body_secs, rt), (idle_secs, ht)):
        assert limit - 0.2 < secs < limit + 4  # cut at the deadline, though a byte came every 0.1 s


def _half_body_client(port, n=100_000):
    """A subprocess that sends the headers and half the body of a request, then waits to be killed."""
    code = ("import socket, sys\n"
            f"s = socket.create_connection(('127.0.0.1', {port}))\n"
            f"s.sendall({_post_head(n)!r} + b'{{' + b' ' * {n // 2})\n"
            "print('sent', flush=True)\n"
            "sys.stdin.read()\n")
    return subprocess.Popen([sys.executable, "-S", "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)


def test_load_and_faults_lose_no_response(guarded):
    """N concurrent clients score distinct batches while a client is killed mid-body, another resets
    mid-body, one sends an oversized body, one drips and one has the wrong token: every answer belongs
    to its own request, and the server serves afterwards with all its slots released."""
    port, srv = guarded
    n_clients, per_client, b = 6, 5, 3  # 30 requests of 3 samples, split 2 + 1 by the server
    results, errors = {}, []

    def client(c):
        try:
            cl = RewardClient(port=port, token=TOKEN, timeout=60, retries=3, backoff=0.05)
            for r in range(per_client):
                x = torch.rand(b, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(1000 * c + r))
                prompts = [f"client {c} request {r} sample {i}" + "!" * (c + r + i) for i in range(b)]
                ids = [[c, r, i] for i in range(b)]
                scores, info = cl.score("mean", x, prompts, seed=ids)
                results[(c, r)] = (x, prompts, ids, scores, info)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    faults = {}

    def killed():
        proc = _half_body_client(port)
        guard = threading.Timer(30, proc.kill)  # bounds the readline below should the child hang
        guard.start()
        try:
            faults["killed_sent"] = proc.stdout.readline().strip()
        finally:
            guard.cancel()
            proc.kill()
            proc.wait(timeout=10)

    def reset():
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(_post_head(50_000) + b"{" + b" " * 20_000)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST

    jobs = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    jobs += [threading.Thread(target=killed), threading.Thread(target=reset),
             threading.Thread(target=lambda: faults.__setitem__("big", _raw(port, _post_head(10 ** 9))[0])),
             threading.Thread(target=lambda: faults.__setitem__("token", _raw(port, _post_head(10, "x" * 20))[0])),
             threading.Thread(target=lambda: faults.__setitem__("drip", _drip(port, _post_head(500))[1][:12]))]
    t0 = time.monotonic()
    for j in jobs:
        j.start()
    for j in jobs:
        j.join(timeout=max(1.0, 60 - (time.monotonic() - t0)))
    assert not any(j.is_alive() for j in jobs), "load test did not finish within 60 s"
    assert not errors, errors
    assert faults == {"killed_sent": "sent", "big": 413, "token": 401, "drip": "HTTP/1.1 408"}
    assert len(results) == n_clients * per_client
    for (c, r), (x, prompts, ids, scores, info) in results.items():
        expected, einfo = _mean_reward(x, prompts)
        assert torch.equal(scores, expected), (c, r)  # its own images and prompts, nobody else's
        assert info["seed"] == ids and info["per_sample"] == pytest.approx(einfo["per_sample"])
    # still serving, and every admission slot and connection was given back
    x = _imgs(2)
    assert torch.equal(RewardClient(port=port, token=TOKEN).score("mean", x, PROMPTS[:2])[0],
                       _mean_reward(x, PROMPTS[:2])[0])
    deadline = time.monotonic() + 10
    while srv.open_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.open_connections == 0
    taken = [srv.admitted.acquire(blocking=False) for _ in range(srv.limits.max_queue)]
    assert all(taken)
    for _ in taken:
        srv.admitted.release()


def test_busy_server_answers_429_503_and_caps_connections(monkeypatch):
    from fastvideo_grpo.rewards.serving.server_guard import ServerLimits

    monkeypatch.delenv("FVG_REWARD_TOKEN", raising=False)
    release = threading.Event()

    def blocking(images, prompts, **metadata):
        release.wait(30)
        return _mean_reward(images, prompts)

    service = RewardService({"block": blocking, "mean": _mean_reward}, num_threads=torch.get_num_threads())
    # two servers on one service (one model lock): one admits a single request, the other waits 0.3 s
    one, t1 = serve_in_thread(service, "127.0.0.1", 0, limits=ServerLimits(max_queue=1, max_connections=2))
    two, t2 = serve_in_thread(service, "127.0.0.1", 0, limits=ServerLimits(queue_timeout=0.3))
    p1, p2 = one.server_address[1], two.server_address[1]
    held = {}
    x = _imgs(2)
    first = threading.Thread(target=lambda: held.__setitem__(
        "scores", RewardClient(port=p1, timeout=60).score("block", x, PROMPTS[:2])[0]))
    first.start()
    try:
        deadline = time.monotonic() + 20
        while not service._lock.locked() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert service._lock.locked()
        with pytest.raises(ConnectionError, match=r"HTTP 429.*2 tries.*--max-queue"):
            RewardClient(port=p1, retries=1, backoff=0.01).score("mean", x, PROMPTS[:2])
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match=r"HTTP 503.*--queue-timeout"):
            RewardClient(port=p2, retries=1, backoff=0.01).score("mean", x, PROMPTS[:2])
        assert time.monotonic() - t0 < 10  # two 0.3 s waits, not the 30 s the models stay busy
        with socket.create_connection(("127.0.0.1", p1), timeout=10) as idle:  # the 2nd connection of 2
            deadline = time.monotonic() + 10
            while one.open_connections < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert one.open_connections == 2
            # a 3rd takes the slot of the idle one (no complete header yet), which is told why; the
            # scoring one keeps its slot. (All slots authenticated: test_reward_server_slow_clients.py)
            with socket.create_connection(("127.0.0.1", p1), timeout=10):
                answer = b""
                while chunk := idle.recv(65536):
                    answer += chunk
                answer = answer.decode()
                assert answer.startswith("HTTP/1.1 503") and "--max-connections" in _json_answer(answer)["error"]
                assert service._lock.locked() and one.open_connections == 2
    finally:
        release.set()
        first.join(timeout=30)
    assert torch.equal(held["scores"], _mean_reward(x, PROMPTS[:2])[0])
    assert torch.equal(RewardClient(port=p1).score("mean", x, PROMPTS[:2])[0], _mean_reward(x, PROMPTS[:2])[0])
    for srv, t in ((one, t1), (two, t2)):
        srv.shutdown()
        srv.server_close()
        t.join(timeout=10)


class _CannedHandler(socketserver.StreamRequestHandler):
    """Reads one HTTP request and answers the server's canned bytes: a stand-in for a wrong service,
    a proxy's error page or a server that dies mid-answer."""

    def handle(self):
        length = 0
        while (line := self.rfile.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        self.rfile.read(length)
        self.wfile.write(self.server.canned)


@pytest.mark.parametrize("canned, exc, message", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\n\r\n<html>hi</ht>", ValueError, "not the reward API's JSON"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"a\":1}", ValueError, "without a 'scores' list"),
    (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 9\r\n\r\n<h1>x</h1", ConnectionError, "proxy.*HTTP 502.*start"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"scores\"", ConnectionError, "broke off.*server log"),
    (b"garbage\r\n\r\n", ConnectionError, "broke off or garbled"),
    (b"HTTP/1.1 418 I'm a teapot\r\nContent-Length: 2\r\n\r\n{}", RuntimeError, "HTTP 418"),
])
def test_client_turns_bad_answers_into_clear_errors(canned, exc, message, monkeypatch):
    monkeypatch.delenv("FVG_REWARD_TOKEN", raising=False)
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _CannedHandler) as stub:
        stub.daemon_threads, stub.canned = True, canned
        threading.Thread(target=stub.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        try:
            client = RewardClient(port=stub.server_address[1], retries=1, backoff=0.01, timeout=10)
            with pytest.raises(exc, match=message):
                client.score("mean", _imgs(1), PROMPTS[:1])
        finally:
            stub.shutdown()


def test_https_client_through_tls(tmp_path, monkeypatch):
    """The client's https path against the server behind TLS (standing in for a TLS-terminating proxy)."""
    import shutil
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    monkeypatch.delenv("FVG_REWARD_TOKEN", raising=False)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    service = RewardService({"mean": _mean_reward}, num_threads=torch.get_num_threads())
    srv, thread = serve_in_thread(service, "127.0.0.1", 0, token=TOKEN)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    try:
        port, x = srv.server_address[1], _imgs(2)
        scores, _ = RewardClient(port=port, token=TOKEN, https=True, ca_file=str(cert)).score("mean", x, PROMPTS[:2])
        assert torch.equal(scores, _mean_reward(x, PROMPTS[:2])[0])
        with pytest.raises(ConnectionError, match="TLS.*ca_file"):  # an untrusted certificate
            RewardClient(port=port, token=TOKEN, https=True, retries=0).health()
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)
