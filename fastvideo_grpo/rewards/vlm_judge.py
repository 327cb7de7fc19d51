"""VLM-judge reward: a vision-language model behind an OpenAI-compatible chat API answers a yes/no
question about each image; the score is P("yes") read from the returned top logprobs.

Registry name ``vlm_judge``. One ``POST {base_url}/chat/completions`` per image (per sampled frame
for videos) with the question built from ``question`` (a template holding ``{prompt}``, filled with
the sample's own prompt) and the image as a base64 ``data:`` URL; the request asks for one token
(``max_tokens=1``, ``temperature=0``) with ``logprobs`` and ``top_logprobs``. Works with vLLM,
SGLang, llama.cpp's server, TGI's OpenAI route and hosted APIs that return logprobs for images.

Score. Over the returned top logprobs of the first answer token, every token that reads "yes"
(case, surrounding spaces and a trailing full stop ignored: ``Yes``, `` yes``, ``YES.``) adds to
P(yes), every token that reads "no" to P(no); the score is P(yes) / (P(yes) + P(no)) in [0, 1].
Other tokens ("Maybe", "The") are ignored. When neither appears the response cannot be scored: a
RuntimeError naming the tokens returned, or ``fallback_score`` when it is set.

Input contract: floats in [0, 1] (values within 0.01 of the range are clamped; anything further
out, e.g. [-1, 1] or [0, 255] pixels, is a ValueError), (B, 3, H, W) images or (B, F, 3, H, W)
videos, each side at least ``min_side`` pixels; images larger than ``max_side`` on their longer
side are downscaled (antialiased) before encoding. Videos: ``video_frames`` frames at
``linspace(0, F - 1, n)`` are judged one by one and their P(yes) averaged.

Transport: at most ``max_concurrency`` requests in flight; each has a ``timeout``; 429, 5xx,
connection errors and timeouts are retried ``retries`` times with exponential back-off from
``backoff`` seconds (capped at ``max_backoff``; a 429's ``Retry-After`` is honoured under the
same cap). Other HTTP errors are not retried: 400/404/422 -> ValueError (the request or model name
is wrong), 401/403 -> PermissionError (the API key). After the last try: TimeoutError,
ConnectionError or RuntimeError naming the URL. The API key is read from the environment variable
named by ``api_key_env``, never from the config. Proxies from the environment are used except for
loopback hosts.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import random
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .base import REWARDS, check_scores, validate_reward_inputs

DEFAULT_QUESTION = ('Does this image match the description "{prompt}"? '
                    "Answer with a single word: yes or no.")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _word(token: str) -> str:
    return token.strip().rstrip(".").strip().lower()


def yes_probability(top_logprobs: Sequence[dict]) -> Optional[float]:
    """P(yes) / (P(yes) + P(no)) over ``[{"token": str, "logprob": float}, ...]``; None when neither
    a yes- nor a no-token is among them."""
    p = {"yes": 0.0, "no": 0.0}
    for entry in top_logprobs:
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
            raise ValueError(f"a top_logprobs entry is not {{'token': str, 'logprob': float}}: {entry!r}")
        w = _word(entry["token"])
        if w in p:
            lp = entry.get("logprob")
            if not isinstance(lp, (int, float)) or isinstance(lp, bool) or math.isnan(lp):
                raise ValueError(f"token {entry['token']!r} has logprob {lp!r}, not a number")
            p[w] += math.exp(lp) if lp > -math.inf else 0.0
    total = p["yes"] + p["no"]
    return None if total <= 0.0 else p["yes"] / total


def first_token_top_logprobs(response: dict) -> List[dict]:
    """The first generated token's ``top_logprobs`` from a chat-completions response (ValueError
    naming what is missing otherwise, e.g. a server that ignores ``logprobs``)."""
    try:
        choice = response["choices"][0]
    except (KeyError, IndexError, TypeError):
        raise ValueError(f"response has no choices[0]: {str(response)[:300]}") from None
    logprobs = (choice or {}).get("logprobs") if isinstance(choice, dict) else None
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not content or not isinstance(content, list) or not isinstance(content[0], dict):
        raise ValueError("response has no choices[0].logprobs.content: the server did not return logprobs "
                         "(does it support `logprobs`/`top_logprobs` for this model?); got "
                         f"{str(choice)[:300]}")
    top = content[0].get("top_logprobs")
    if not isinstance(top, list):
        raise ValueError(f"response has no choices[0].logprobs.content[0].top_logprobs list: {str(content[0])[:300]}")
    return top


def encode_image(image: torch.Tensor, fmt: str = "png", quality: int = 95) -> str:
    """(3, H, W) floats in [0, 1] -> a ``data:image/...;base64,`` URL (pixels rounded to 1/255)."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(arr).save(buf, format="PNG")
    else:
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    mime = "png" if fmt == "png" else "jpeg"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class ChatJudge:
    """The HTTP side: one chat-completions request per image, with limits, timeouts and retries."""

    def __init__(self, base_url: str, model: str, api_key: Optional[str] = None, timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0, max_concurrency: int = 8,
                 top_logprobs: int = 20, system_prompt: Optional[str] = None,
                 extra_body: Optional[Dict] = None):
        parsed = urllib.parse.urlparse(str(base_url or ""))
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"vlm_judge: base_url must be an http(s) URL such as http://127.0.0.1:8000/v1, "
                             f"got {base_url!r}")
        if not model or not isinstance(model, str):
            raise ValueError("vlm_judge: set model= to the model name the server serves (GET <base_url>/models)")
        if float(timeout) <= 0 or int(retries) < 0 or float(backoff) < 0 or int(max_concurrency) < 1:
            raise ValueError(f"vlm_judge: need timeout > 0, retries >= 0, backoff >= 0, max_concurrency >= 1; "
                             f"got {timeout}, {retries}, {backoff}, {max_concurrency}")
        if not 1 <= int(top_logprobs) <= 20:
            raise ValueError(f"vlm_judge: top_logprobs must be in [1, 20] (the OpenAI API's limit), got {top_logprobs}")
        if extra_body is not None and not isinstance(extra_body, dict):
            raise ValueError(f"vlm_judge: extra_body must be a mapping of extra request fields, got {extra_body!r}")
        self.url = str(base_url).rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout = model, api_key, float(timeout)
        self.retries, self.backoff, self.max_backoff = int(retries), float(backoff), float(max_backoff)
        self.max_concurrency, self.top_logprobs = int(max_concurrency), int(top_logprobs)
        self.system_prompt, self.extra_body = system_prompt, dict(extra_body or {})
        handlers = [urllib.request.ProxyHandler({})] if parsed.hostname in _LOOPBACK else []
        self._opener = urllib.request.build_opener(*handlers)
        self._lock = threading.Lock()
        self.requests_sent = 0  # every HTTP attempt, retries included (for logs and tests)

    def body(self, question: str, image_url: str) -> dict:
        messages = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        messages.append({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url}},
            {"type": "text", "text": question}]})
        return {**self.extra_body, "model": self.model, "messages": messages, "max_tokens": 1,
                "temperature": 0.0, "logprobs": True, "top_logprobs": self.top_logprobs}

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.retries + 1):
            wait = min(self.max_backoff, self.backoff * (2 ** attempt)) * (1.0 + 0.1 * random.random())
            with self._lock:
                self.requests_sent += 1
            req = urllib.request.Request(self.url, data=data, method="POST", headers=headers)
            try:
                with self._opener.open(req, timeout=self.timeout) as r:
                    raw = r.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    raise ValueError(f"{self.url} answered with non-JSON: {raw[:200]!r}") from None
            except urllib.error.HTTPError as e:
                detail = _error_text(e)
                if e.code in (401, 403):
                    raise PermissionError(f"{self.url} refused the API key (HTTP {e.code}): {detail}; set the "
                                          "environment variable named by api_key_env") from None
                if e.code not in RETRY_STATUS and e.code < 500:
                    raise ValueError(f"{self.url} rejected the request (HTTP {e.code}): {detail}; check model= "
                                     "and that the model accepts images") from None
                last = RuntimeError(f"{self.url} failed with HTTP {e.code} after {self.retries + 1} tries: {detail}")
                retry_after = _retry_after(e)
                if retry_after is not None:
                    wait = min(self.max_backoff, retry_after)
            except (TimeoutError, OSError) as e:  # URLError is an OSError; socket.timeout is TimeoutError
                reason = getattr(e, "reason", e)
                if isinstance(e, TimeoutError) or isinstance(reason, TimeoutError):
                    last = TimeoutError(f"{self.url} did not answer within {self.timeout:g}s "
                                        f"({self.retries + 1} tries); raise timeout= or lower max_concurrency")
                else:
                    last = ConnectionError(f"{self.url} is not reachable ({reason}) after {self.retries + 1} tries; "
                                           "is the server up and base_url right?")
            if attempt < self.retries:
                time.sleep(wait)
        raise last

    def ask(self, question: str, image_url: str) -> dict:
        return self._post(self.body(question, image_url))

    def map(self, fn, items):
        """``fn`` over ``items`` with at most ``max_concurrency`` running; results in order. On a
        failure the calls not yet started are cancelled and, once the running ones have finished, the
        first failure (in item order) is raised."""
        items = list(items)
        if not items:
            return []
        with ThreadPoolExecutor(min(self.max_concurrency, len(items)), thread_name_prefix="vlm_judge") as pool:
            futures = [pool.submit(fn, it) for it in items]
            for f in futures:
                if f.exception() is not None:
                    for g in futures:
                        g.cancel()
                    break
        for f in futures:
            if not f.cancelled() and f.exception() is not None:
                raise f.exception()
        return [f.result() for f in futures]


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read()
    except Exception:  # noqa: BLE001
        return ""
    try:
        obj = json.loads(raw)
        err = obj.get("error", obj) if isinstance(obj, dict) else obj
        if isinstance(err, dict):
            err = err.get("message", err)
        return str(err)[:300]
    except ValueError:
        return raw[:300].decode("utf-8", "replace")


def _retry_after(e: urllib.error.HTTPError) -> Optional[float]:
    v = e.headers.get("Retry-After") if e.headers is not None else None
    try:
        return max(0.0, float(v)) if v is not None else None
    except ValueError:
        return None


def _frame_indices(num_frames: int, n: int) -> List[int]:
    n = max(1, min(int(n), num_frames))
    return torch.linspace(0, num_frames - 1, n).round().long().tolist()


def _fit(frames: torch.Tensor, max_side: int) -> torch.Tensor:
    h, w = frames.shape[-2:]
    if max(h, w) <= max_side:
        return frames
    s = max_side / max(h, w)
    size = (max(1, round(h * s)), max(1, round(w * s)))
    return F.interpolate(frames.float(), size=size, mode="bilinear", align_corners=False, antialias=True)


@REWARDS.register("vlm_judge")
def vlm_judge(base_url=None, model=None, question=DEFAULT_QUESTION, system_prompt=None, api_key_env=None,
              api_key=None, timeout=60.0, retries=3, backoff=1.0, max_backoff=30.0, max_concurrency=8,
              top_logprobs=20, image_format="png", jpeg_quality=95, max_side=1024, min_side=16,
              video_frames=4, fallback_score=None, extra_body=None):
    """See the module docstring. ``api_key`` exists only to refuse a key written into a config."""
    if api_key is not None:
        raise ValueError("vlm_judge: do not put the API key in the config; set api_key_env= to the name of an "
                         "environment variable that holds it (e.g. api_key_env: OPENAI_API_KEY)")
    key = None
    if api_key_env:
        key = os.environ.get(str(api_key_env))
        if not key:
            raise ValueError(f"vlm_judge: environment variable {api_key_env!r} (api_key_env) is not set or empty")
    if not isinstance(question, str) or "{prompt}" not in question:
        raise ValueError(f"vlm_judge: question must be a template containing {{prompt}}, got {question!r}")
    if image_format not in ("png", "jpeg"):
        raise ValueError(f"vlm_judge: image_format must be 'png' or 'jpeg', got {image_format!r}")
    if int(min_side) < 1 or int(max_side) < int(min_side) or int(video_frames) < 1:
        raise ValueError(f"vlm_judge: need 1 <= min_side <= max_side and video_frames >= 1; got min_side={min_side}, "
                         f"max_side={max_side}, video_frames={video_frames}")
    if fallback_score is not None and not (0.0 <= float(fallback_score) <= 1.0):
        raise ValueError(f"vlm_judge: fallback_score must be in [0, 1] or unset, got {fallback_score}")
    judge = ChatJudge(base_url, model, api_key=key, timeout=timeout, retries=retries, backoff=backoff,
                      max_backoff=max_backoff, max_concurrency=max_concurrency, top_logprobs=top_logprobs,
                      system_prompt=system_prompt, extra_body=extra_body)
    min_side, max_side = int(min_side), int(max_side)

    def judge_one(job):
        q, url = job
        top = first_token_top_logprobs(judge.ask(q, url))
        p = yes_probability(top)
        if p is None:
            if fallback_score is None:
                raise RuntimeError(f"vlm_judge: neither 'yes' nor 'no' among the top {len(top)} tokens "
                                   f"{[t.get('token') for t in top][:20]} for question {q!r}; rephrase the "
                                   "question/system_prompt, raise top_logprobs, or set fallback_score")
            return float(fallback_score), True
        return p, False

    def fn(images, prompts, **metadata):
        validate_reward_inputs(images, prompts)
        lo, hi = float(images.min()), float(images.max())
        if lo < -0.01 or hi > 1.01:
            raise ValueError(f"vlm_judge: pixels must be in [0, 1], got values in [{lo:.3g}, {hi:.3g}] "
                             "(map [-1, 1] with (x + 1) / 2, or divide [0, 255] by 255)")
        h, w = images.shape[-2:]
        if min(h, w) < min_side:
            raise ValueError(f"vlm_judge: images are {h}x{w}; each side must be at least min_side={min_side} pixels")
        if images.ndim == 5:
            idx = _frame_indices(images.shape[1], video_frames)
            frames = images[:, idx]
        else:
            idx, frames = [0], images.unsqueeze(1)
        b, n = frames.shape[:2]
        flat = _fit(frames.reshape(b * n, *frames.shape[2:]), max_side)
        jobs = [(question.format(prompt=prompts[i // n]), encode_image(flat[i], image_format, jpeg_quality))
                for i in range(b * n)]
        results = judge.map(judge_one, jobs)
        p = torch.tensor([r[0] for r in results], dtype=torch.float32).view(b, n)
        scores = check_scores("vlm_judge", p.mean(1), b)
        return scores, {"vlm_judge_mean": float(scores.mean()), "p_yes": p.tolist(),
                        "fallbacks": sum(r[1] for r in results)}

    fn.judge, fn.frame_indices = judge, _frame_indices
    return fn
