"""Client side of the reward server (server.py): tensor encoding, :class:`RewardClient` and the
``remote`` reward registered in REWARDS, so the trainer uses local and remote rewards through the
same interface, e.g. ``{"type": "remote", "reward": "hps", "port": 8765}``.

The client talks only to the configured host (default 127.0.0.1; proxies are bypassed), with a
timeout, bounded retries with exponential back-off, and clear errors: ConnectionError naming
host:port and the start command when the server is down, TimeoutError when it does not answer,
ValueError when it rejects the input (HTTP 400/404), RuntimeError when the reward fails (500).
``wire_dtype="uint8"`` quarters the traffic (images quantised to 1/255); the default float32 sends
the images losslessly: a server in the same process scoring with the same torch thread count gives
bit-identical scores, one in another process or on another machine equal scores up to float32
rounding (see server.py). ``chunk_size`` splits big batches into several requests.
"""

from __future__ import annotations

import base64
import json
import math
import time
import urllib.error
import urllib.request
from typing import List, Optional, Sequence

import torch

from .base import REWARDS, check_scores, validate_reward_inputs

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}
START_HINT = "start it with `python -m fastvideo_grpo.rewards.server --config <rewards.yaml> --port {port}`"


# ---------------------------------------------------------------- tensor <-> JSON

def encode_tensor(x: torch.Tensor, wire_dtype: str = "float32") -> dict:
    """Images in [0, 1] -> {"dtype", "shape", "data"}; uint8 quantises to round(255 x)."""
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
    x = x.detach().cpu()
    if wire_dtype == "uint8":
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        x = x.to(WIRE_DTYPES[wire_dtype])
    return {"dtype": wire_dtype, "shape": list(x.shape),
            "data": base64.b64encode(x.contiguous().numpy().tobytes()).decode("ascii")}


def decode_tensor(obj: dict) -> torch.Tensor:
    """The inverse of :func:`encode_tensor`; always returns float32 (uint8 is divided by 255)."""
    try:
        dtype, shape, data = obj["dtype"], [int(s) for s in obj["shape"]], base64.b64decode(obj["data"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"images must be {{'dtype', 'shape', 'data'}} (base64 raw bytes): {e}") from None
    if dtype not in WIRE_DTYPES:
        raise ValueError(f"unsupported wire dtype {dtype!r}; use one of {sorted(WIRE_DTYPES)}")
    td = WIRE_DTYPES[dtype]
    n = math.prod(shape) * torch.empty((), dtype=td).element_size()
    if len(data) != n:
        raise ValueError(f"images: {len(data)} bytes for shape {shape} of {dtype} (expected {n})")
    x = torch.frombuffer(bytearray(data), dtype=td).reshape(shape) if n else torch.empty(shape, dtype=td)
    return x.float() / 255.0 if td == torch.uint8 else x.float()


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().tolist()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def _merge_infos(infos: List[dict], sizes: List[int]):
    """Per-sample lists are concatenated; numbers are averaged weighted by chunk size; else last."""
    if len(infos) == 1:
        return infos[0]
    out = {}
    for key in infos[-1]:
        vals = [i.get(key) for i in infos]
        if all(isinstance(v, list) and len(v) == s for v, s in zip(vals, sizes)):
            out[key] = [x for v in vals for x in v]
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[key] = sum(v * s for v, s in zip(vals, sizes)) / sum(sizes)
        elif all(isinstance(v, dict) for v in vals):
            out[key] = _merge_infos(vals, sizes)
        else:
            out[key] = vals[-1]
    return out


# ---------------------------------------------------------------- client

class RewardClient:
    """HTTP client for a reward server (only the given host; proxies are bypassed)."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, timeout: float = 600.0,
                 retries: int = 2, backoff: float = 0.5, wire_dtype: str = "float32",
                 chunk_size: Optional[int] = None):
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
        if int(retries) < 0 or float(timeout) <= 0:
            raise ValueError(f"need retries >= 0 and timeout > 0, got {retries}, {timeout}")
        self.host, self.port, self.timeout = host, int(port), float(timeout)
        self.retries, self.backoff, self.wire_dtype = int(retries), float(backoff), wire_dtype
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _request(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        last = None
        for attempt in range(self.retries + 1):  # bounded
            req = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with self._opener.open(req, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:  # the server answered: no retry
                try:
                    msg = json.loads(e.read()).get("error", "")
                except Exception:  # noqa: BLE001
                    msg = ""
                where = f"reward server {self.host}:{self.port}"
                if e.code in (400, 404):
                    raise ValueError(f"{where} rejected the request: {msg}") from None
                raise RuntimeError(f"{where} failed (HTTP {e.code}): {msg}") from None
            except (TimeoutError, OSError) as e:  # URLError is an OSError; socket.timeout is TimeoutError
                last = e
                if attempt < self.retries:
                    time.sleep(self.backoff * (2 ** attempt))
        reason = getattr(last, "reason", last)
        if isinstance(reason, TimeoutError) or isinstance(last, TimeoutError):
            raise TimeoutError(f"reward server {self.host}:{self.port} did not answer {method} {path} within "
                               f"{self.timeout:g}s ({self.retries + 1} tries); raise timeout= or check the server log")
        raise ConnectionError(f"reward server {self.host}:{self.port} is not reachable ({reason}) after "
                              f"{self.retries + 1} tries; {START_HINT.format(port=self.port)}")

    def health(self) -> dict:
        return self._request("GET", "/health")

    def score(self, reward: str, images: torch.Tensor, prompts: Sequence[str], **metadata):
        validate_reward_inputs(images, prompts)
        b = images.shape[0]
        step = self.chunk_size or b
        scores, infos, sizes = [], [], []
        for s in range(0, b, step):
            e = min(b, s + step)
            md = {k: (v[s:e] if isinstance(v, (list, tuple)) and len(v) == b else v) for k, v in metadata.items()}
            out = self._request("POST", "/score", {
                "reward": reward, "images": encode_tensor(images[s:e], self.wire_dtype),
                "prompts": list(prompts[s:e]), "metadata": _jsonable(md)})
            scores.append(torch.tensor(out["scores"], dtype=torch.float32))
            infos.append(out.get("info", {}))
            sizes.append(e - s)
        return check_scores(f"remote:{reward}", torch.cat(scores), b), _merge_infos(infos, sizes)


@REWARDS.register("remote")
def remote(reward=None, host=DEFAULT_HOST, port=DEFAULT_PORT, timeout=600.0, retries=2, backoff=0.5,
           wire_dtype="float32", chunk_size=None, check_on_build=True):
    """A reward computed by a reward server; ``reward`` is the name the server serves it under."""
    if not reward or not isinstance(reward, str):
        raise ValueError("remote: set reward= to the name the reward server serves (see GET /health)")
    client = RewardClient(host, port, timeout=timeout, retries=retries, backoff=backoff,
                          wire_dtype=wire_dtype, chunk_size=chunk_size)
    if check_on_build:
        served = client.health().get("rewards", [])
        if reward not in served:
            raise ValueError(f"reward server {host}:{port} does not serve {reward!r}; it serves {served}")

    def fn(images, prompts, **metadata):
        return client.score(reward, images, prompts, **metadata)

    fn.client = client
    return fn
