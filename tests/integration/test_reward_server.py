"""The reward server end to end on 127.0.0.1: remote scores equal in-process scores (threaded server
and the real CLI in a subprocess with a tiny CLIP), handler threads scoring with the service's thread
count, chunking, error mapping, down server, timeout."""

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from fastvideo_grpo.rewards import REWARDS
from fastvideo_grpo.rewards.remote import RewardClient, decode_tensor, encode_tensor
from fastvideo_grpo.rewards.server import RewardService, serve_in_thread
from fastvideo_grpo.threads import thread_count

PROMPTS = ["a red cat", "a blue dog", "green tree", "the sun", "a cat"]
PATCH = 16  # the tiny CLIP's patch size: its longest reduction is the 3 * 16 * 16 patch embedding
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models on a shared 2-core machine: intra-op threads only add contention (70x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _mean_reward(images, prompts, **metadata):
    """Deterministic, per-sample and prompt-dependent; echoes per-sample metadata."""
    x = images.reshape(images.shape[0], -1).mean(-1)
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


def test_remote_equals_in_process_with_chunking(server):
    port, _ = server
    x, seeds = _imgs(), [10, 11, 12, 13, 14]
    local, linfo = _mean_reward(x, PROMPTS, seed=seeds)
    fn = REWARDS.build("remote", reward="mean", port=port, chunk_size=3)  # 2 requests, 2+1 / 2 server chunks
    s, info = fn(x, PROMPTS, seed=seeds)
    assert torch.equal(s, local)
    assert info["per_sample"] == pytest.approx(linfo["per_sample"])
    assert info["seed"] == seeds  # per-sample metadata split and re-joined in order
    assert info["mean"] == pytest.approx(linfo["mean"])
    assert RewardClient(port=port).health()["rewards"] == ["clip", "fail", "mean", "slow"]


def test_remote_clip_identical_and_uint8_close(server):
    port, clip = server
    x = _imgs()
    local, _ = clip(x, PROMPTS)
    remote, _ = REWARDS.build("remote", reward="clip", port=port)(x, PROMPTS)
    assert torch.equal(remote, local)
    q, _ = REWARDS.build("remote", reward="clip", port=port, wire_dtype="uint8")(x, PROMPTS)
    torch.testing.assert_close(q, local, atol=2e-3, rtol=0)


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
        with pytest.raises(ConnectionError, match=rf"127\.0\.0\.1:{port}.*fastvideo_grpo\.rewards\.server"):
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


def test_cli_server_subprocess_matches_in_process(clip_dir, tmp_path):
    cfg = tmp_path / "rewards.json"
    cfg.write_text(json.dumps({"rewards": {"clip": {"type": "clip_score", "model_path": clip_dir, "device": "cpu"}},
                               "max_batch": 2}))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    threads = torch.get_num_threads()  # the server scores with this test's count (--threads, not the env)
    proc = subprocess.Popen([sys.executable, "-m", "fastvideo_grpo.rewards.server", "--config", str(cfg),
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
        # Another process: same inputs (float32 wire is lossless), same weights, same thread count, but
        # nothing makes its math libraries pick the same kernels (alignment, process state), so a float32
        # reduction may be summed in another order. Two orders of a K-term dot product differ by at most
        # about K * eps * sum|a_i b_i|; K = 3 * 16 * 16 = 768 is the model's longest reduction and the
        # scores are cosines (|s| <= 1), so K * eps (9e-5) bounds a reordering. The uint8 wire's error
        # (up to 2e-3, test above) or one wrong prompt (~0.1) are far outside it.
        tol = 3 * PATCH * PATCH * torch.finfo(torch.float32).eps
        torch.testing.assert_close(remote, local, rtol=0, atol=tol)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
