"""The VLM-judge reward against a stub OpenAI-compatible server on 127.0.0.1 (port 0).

The stub decodes the image it receives and answers with top logprobs whose yes-mass, after
normalising over yes/no variants, is the image's mean pixel value: the reference score is computed
independently from the pixels. It also checks the request (model, one token, logprobs, data URL,
the question built from the sample's own prompt, the API key) and can fail, stall or answer badly
on demand.
"""

import base64
import io
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from fastvideo_grpo.rewards import REWARDS
from fastvideo_grpo.rewards import vlm_judge as vj

MODEL = "judge-model"
QUESTION = "Is this {prompt}? Answer yes or no."


def _decode(url):
    from PIL import Image

    assert url.startswith("data:image/png;base64,"), url[:40]
    import numpy as np

    img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    return torch.from_numpy(np.array(img.convert("RGB"))).to(torch.float64)


def _logprobs_answer(p_yes, other=0.1):
    """Yes-mass p_yes * (1 - other) split over two yes spellings, no-mass over two no spellings, and
    an unrelated token holding ``other``: the normalised P(yes) is p_yes."""
    keep = 1.0 - other
    top = [{"token": "Yes", "logprob": math.log(0.7 * p_yes * keep)},
           {"token": " yes", "logprob": math.log(0.3 * p_yes * keep)},
           {"token": "No", "logprob": math.log(0.9 * (1 - p_yes) * keep)},
           {"token": "NO.", "logprob": math.log(0.1 * (1 - p_yes) * keep)},
           {"token": "Maybe", "logprob": math.log(other)}]
    return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes"},
                         "logprobs": {"content": [{"token": "Yes", "logprob": top[0]["logprob"],
                                                   "top_logprobs": top}]}}]}


class Stub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.lock = threading.Lock()
        self.hits, self.inflight, self.max_inflight = 0, 0, 0
        self.seen = []            # (question text, mean pixel, (h, w)) per well-formed request
        self.headers_seen = []
        self.script = []          # per hit: None (answer) or ("status", code, headers) / ("sleep", s) / ("raw", bytes)
        self.delay = 0.0
        self.answer = None        # optional fn(body) -> response dict

    def handle_error(self, request, client_address):
        pass  # a client that timed out closed the socket before the stalled answer: expected here

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, code, payload, headers=()):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        s = self.server
        with s.lock:
            i, s.hits = s.hits, s.hits + 1
            s.inflight += 1
            s.max_inflight = max(s.max_inflight, s.inflight)
            s.headers_seen.append(dict(self.headers))
        try:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            action = s.script[i] if i < len(s.script) else None
            if s.delay:
                time.sleep(s.delay)
            if action is not None:
                if action[0] == "sleep":
                    time.sleep(action[1])
                elif action[0] == "status":
                    return self._send(action[1], {"error": {"message": f"scripted {action[1]}"}}, action[2])
                elif action[0] == "raw":
                    return self._send(200, action[1])
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": "no route"}})
            ok = (body.get("model") == MODEL and body.get("max_tokens") == 1 and body.get("logprobs") is True
                  and body.get("top_logprobs") == 20 and body.get("temperature") == 0)
            content = body["messages"][-1]["content"]
            kinds = [c["type"] for c in content]
            if not ok or kinds != ["image_url", "text"]:
                return self._send(400, {"error": {"message": f"bad request {body.get('model')} {kinds}"}})
            px = _decode(content[0]["image_url"]["url"])
            m = float(px.mean() / 255.0)
            with s.lock:
                s.seen.append((content[1]["text"], m, tuple(px.shape[:2])))
            return self._send(200, s.answer(body) if s.answer else _logprobs_answer(m))
        finally:
            with s.lock:
                s.inflight -= 1


@pytest.fixture
def stub():
    s = Stub()
    t = threading.Thread(target=s.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield s
    deadline = time.monotonic() + 5
    while s.inflight and time.monotonic() < deadline:  # let stalled handlers finish before the next test
        time.sleep(0.02)
    s.shutdown()
    s.server_close()


def build(stub, **kw):
    args = dict(base_url=stub.base_url, model=MODEL, question=QUESTION, backoff=0.0, timeout=10.0)
    args.update(kw)
    return REWARDS.build("vlm_judge", **args)


def flat_images(values, h=20, w=20):
    """One constant-colour image per value (exact through PNG once rounded to 1/255)."""
    return torch.stack([torch.full((3, h, w), v) for v in values])


def q255(v):
    return round(v * 255) / 255


# ------------------------------------------------------------------ scoring


def test_yes_probability_closed_form():
    top = [{"token": " Yes", "logprob": math.log(0.3)}, {"token": "yes.", "logprob": math.log(0.1)},
           {"token": "no", "logprob": math.log(0.2)}, {"token": "The", "logprob": math.log(0.4)}]
    assert vj.yes_probability(top) == pytest.approx(0.4 / 0.6)
    assert vj.yes_probability([{"token": "The", "logprob": -0.1}]) is None
    assert vj.yes_probability([{"token": "No", "logprob": 0.0}, {"token": "yes", "logprob": -math.inf}]) == 0.0
    with pytest.raises(ValueError, match="logprob"):
        vj.yes_probability([{"token": "yes", "logprob": "high"}])


def test_scores_are_normalised_p_yes_for_each_own_prompt(stub, monkeypatch):
    monkeypatch.setenv("FVG_TEST_JUDGE_KEY", "sk-test-123")
    fn = build(stub, api_key_env="FVG_TEST_JUDGE_KEY")
    values = [51 / 255, 140 / 255, 229 / 255]
    prompts = ["a red cat", "a blue dog", "the sun"]
    scores, info = fn(flat_images(values), prompts)
    expected = torch.tensor([q255(v) for v in values])
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert sorted((t, round(m, 6)) for t, m, _ in stub.seen) == sorted(
        (QUESTION.format(prompt=p), round(q255(v), 6)) for p, v in zip(prompts, values))
    assert all(h.get("Authorization") == "Bearer sk-test-123" for h in stub.headers_seen)
    assert info["vlm_judge_mean"] == pytest.approx(float(expected.mean()), abs=1e-6) and info["fallbacks"] == 0


def test_videos_average_the_sampled_frames_and_large_images_are_downscaled(stub):
    fn = build(stub, video_frames=3, max_side=16)
    vals = torch.tensor([[20, 50, 80, 110, 140], [230, 200, 170, 140, 110]]) / 255.0  # exact in 8 bits
    video = vals[:, :, None, None, None].expand(2, 5, 3, 24, 32).clone()
    scores, info = fn(video, ["a", "b"])
    torch.testing.assert_close(scores, vals[:, [0, 2, 4]].mean(1), atol=1e-6, rtol=0)
    assert len(stub.seen) == 6 and {hw for _, _, hw in stub.seen} == {(12, 16)}
    assert len(info["p_yes"]) == 2 and len(info["p_yes"][0]) == 3


def test_concurrency_is_limited(stub):
    stub.delay = 0.15
    fn = build(stub, max_concurrency=2)
    scores, _ = fn(flat_images([0.5] * 6), ["x"] * 6)
    assert stub.hits == 6 and stub.max_inflight == 2
    torch.testing.assert_close(scores, torch.full((6,), q255(0.5)), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ transport: retries, timeouts, errors


def test_429_and_5xx_are_retried_with_retry_after(stub):
    stub.script = [("status", 503, ()), ("status", 429, (("Retry-After", "0"),)), None]
    fn = build(stub, retries=2, max_concurrency=1)
    scores, _ = fn(flat_images([0.4]), ["x"])
    assert stub.hits == 3 and fn.judge.requests_sent == 3
    assert scores.item() == pytest.approx(q255(0.4), abs=1e-6)


def test_persistent_server_error_gives_up_after_the_retries(stub):
    stub.script = [("status", 500, ())] * 5
    fn = build(stub, retries=2)
    with pytest.raises(RuntimeError, match="HTTP 500 after 3 tries"):
        fn(flat_images([0.4]), ["x"])
    assert stub.hits == 3


def test_backoff_grows_exponentially(stub):
    stub.script = [("status", 502, ()), ("status", 502, ()), None]
    fn = build(stub, retries=2, backoff=0.1, max_concurrency=1)
    t0 = time.perf_counter()
    fn(flat_images([0.4]), ["x"])
    assert time.perf_counter() - t0 >= 0.1 + 0.2  # waits backoff * 2**attempt between tries


def test_timeout_is_retried_then_a_timeout_error(stub):
    stub.script = [("sleep", 1.5), ("sleep", 1.5)]
    fn = build(stub, timeout=0.2, retries=1)
    with pytest.raises(TimeoutError, match="did not answer within 0.2s"):
        fn(flat_images([0.4]), ["x"])
    assert stub.hits == 2


def test_unreachable_server_is_a_connection_error():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    fn = REWARDS.build("vlm_judge", base_url=f"http://127.0.0.1:{port}/v1", model=MODEL, retries=1, backoff=0.0)
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}.*after 2 tries"):
        fn(flat_images([0.4]), ["x"])


def test_client_errors_are_not_retried(stub):
    fn = build(stub, model="wrong-model", retries=3)
    with pytest.raises(ValueError, match="HTTP 400.*bad request wrong-model"):
        fn(flat_images([0.4]), ["x"])
    assert stub.hits == 1
    stub.script = [None, ("status", 401, ())]
    with pytest.raises(PermissionError, match="API key"):
        build(stub, retries=3)(flat_images([0.4]), ["x"])
    assert stub.hits == 2


@pytest.mark.parametrize("case", ["non_json", "no_logprobs", "no_yes_no"])
def test_bad_responses_are_clear_errors(stub, case):
    if case == "non_json":
        stub.script = [("raw", b"<html>gateway</html>")]
        err, match = ValueError, "non-JSON"
    elif case == "no_logprobs":
        stub.answer = lambda body: {"choices": [{"message": {"content": "Yes"}, "logprobs": None}]}
        err, match = ValueError, "did not return logprobs"
    else:
        stub.answer = lambda body: {"choices": [{"logprobs": {"content": [
            {"token": "The", "top_logprobs": [{"token": "The", "logprob": -0.1}, {"token": "A", "logprob": -2.0}]}]}}]}
        err, match = RuntimeError, r"neither 'yes' nor 'no'.*\['The', 'A'\]"
    with pytest.raises(err, match=match):
        build(stub)(flat_images([0.4]), ["x"])


def test_fallback_score_when_the_answer_is_neither(stub):
    stub.answer = lambda body: {"choices": [{"logprobs": {"content": [
        {"token": "The", "top_logprobs": [{"token": "The", "logprob": -0.1}]}]}}]}
    scores, info = build(stub, fallback_score=0.5)(flat_images([0.4, 0.6]), ["x", "y"])
    assert scores.tolist() == [0.5, 0.5] and info["fallbacks"] == 2


# ------------------------------------------------------------------ input contract and configuration


@pytest.mark.parametrize("case", ["minus_one", "uint8_range", "too_small", "mismatch", "nan"])
def test_bad_inputs_are_value_errors(stub, case):
    fn = build(stub)
    x, p = flat_images([0.4, 0.6]), ["x", "y"]
    if case == "minus_one":
        x = x * 2 - 1
    elif case == "uint8_range":
        x = x * 255
    elif case == "too_small":
        x = flat_images([0.4, 0.6], h=8, w=64)
    elif case == "mismatch":
        p = ["x"]
    else:
        x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        fn(x, p)
    assert stub.hits == 0  # refused before any request


def test_configuration_errors(stub, monkeypatch):
    monkeypatch.delenv("FVG_TEST_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="do not put the API key in the config"):
        build(stub, api_key="sk-123")
    with pytest.raises(ValueError, match="FVG_TEST_UNSET_KEY"):
        build(stub, api_key_env="FVG_TEST_UNSET_KEY")
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        build(stub, question="Is it good?")
    with pytest.raises(ValueError, match="base_url"):
        build(stub, base_url="127.0.0.1:8000")
    with pytest.raises(ValueError, match="model="):
        build(stub, model=None)
    with pytest.raises(ValueError, match="top_logprobs"):
        build(stub, top_logprobs=50)


def test_preflight_refuses_unknown_keys():
    with pytest.raises(ValueError, match="does not take"):
        REWARDS.check_kwargs("vlm_judge", {"base_url": "http://x/v1", "modle": "m"}, "rewards[0].kwargs")
