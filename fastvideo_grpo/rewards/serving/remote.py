"""Client side of the reward server (server.py): tensor encoding, :class:`RewardClient` and the
``remote`` reward registered in REWARDS, so the trainer uses local and remote rewards through the
same interface, e.g. ``{"type": "remote", "reward": "hps", "port": 8765}``.

The client talks only to the configured host (default 127.0.0.1; proxies are bypassed; ``https``
for a TLS-terminating proxy in front of the server), sends the shared token (``token_file`` or
``$FVG_REWARD_TOKEN``) as ``Authorization: Bearer``, with a timeout, bounded retries with
exponential back-off (connection failures and the transient answers 408/429/502/503/504), and
errors that say what to do: ConnectionError naming host:port and the start command when the
server is down, when it stays busy (429/503) or answers garbage; TimeoutError when it does not
answer; ValueError when it rejects the input (400/404), the token (401), the size (413) or is not
a reward server (no JSON); RuntimeError when the reward fails (500).
``wire_dtype="uint8"`` quarters the traffic (images quantised to 1/255); the default float32 sends
the images losslessly: a server in the same process scoring with the same torch thread count and the
same batch shapes (the request within ``max_batch`` and ``chunk_size``) gives bit-identical scores;
other shapes, another process or another machine give equal scores up to float32 rounding (see
server.py and docs/reproducibility.md). ``chunk_size`` splits big batches into several requests.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import ssl
import time
import urllib.error
import urllib.request
from typing import List, Optional, Sequence

import torch

from ..base import REWARDS, check_scores, validate_reward_inputs
from .server_guard import TOKEN_ENV, check_token, load_token

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}
START_HINT = "start it with `python -m fastvideo_grpo.rewards.serving.server --config <rewards.yaml> --port {port}`"


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

RETRIED_STATUS = {408, 429, 502, 503, 504}  # transient: the same request may succeed later
TOO_LARGE_HINT = ("send fewer samples per request (chunk_size=), use wire_dtype: uint8 (4x smaller), or raise "
                  "the server's --max-body-mb (and a proxy's body limit, e.g. nginx client_max_body_size)")


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        raw = e.read()
    except Exception:  # noqa: BLE001
        return ""
    try:
        return str(json.loads(raw).get("error", ""))
    except Exception:  # noqa: BLE001 - not our JSON (a proxy's page): show its start
        return raw[:120].decode("utf-8", "replace").strip()


class RewardClient:
    """HTTP client for a reward server (only the given host; proxies are bypassed).

    ``token``: the server's shared secret; default ``token_file``'s content, else ``$FVG_REWARD_TOKEN``,
    else none; sent as ``Authorization: Bearer``. ``https=True`` talks TLS (to a TLS-terminating
    proxy in front of the server), verifying its certificate against the system CAs or ``ca_file``."""

    def __init__(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, timeout: float = 600.0,
                 retries: int = 2, backoff: float = 0.5, wire_dtype: str = "float32",
                 chunk_size: Optional[int] = None, token: Optional[str] = None, token_file: Optional[str] = None,
                 https: bool = False, ca_file: Optional[str] = None):
        if wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"wire_dtype must be one of {sorted(WIRE_DTYPES)}, got {wire_dtype!r}")
        if int(retries) < 0 or float(timeout) <= 0:
            raise ValueError(f"need retries >= 0 and timeout > 0, got {retries}, {timeout}")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1 samples per request (or None = all), got {chunk_size}")
        self.host, self.port, self.timeout = host, int(port), float(timeout)
        self.retries, self.backoff, self.wire_dtype = int(retries), float(backoff), wire_dtype
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self.token = check_token(token, "token=") if token is not None else load_token(token_file)
        self.https = bool(https)
        self.max_body_bytes: Optional[int] = None  # the server's, learnt from GET /health
        handlers = [urllib.request.ProxyHandler({})]
        if self.https:
            if ca_file is not None and not os.path.isfile(ca_file):
                raise FileNotFoundError(f"ca_file {ca_file!r} does not exist; give the CA certificate (PEM) that "
                                        "signed the proxy's certificate, or leave it unset for the system CAs")
            handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=ca_file)))
        elif ca_file is not None:
            raise ValueError("ca_file is only used with https: true")
        self._opener = urllib.request.build_opener(*handlers)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.https else 'http'}://{host}:{self.port}"

    @property
    def where(self) -> str:
        return f"reward server {'https://' if self.https else ''}{self.host}:{self.port}"

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _request(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        size = 0 if data is None else len(data)
        if self.max_body_bytes and size > self.max_body_bytes:
            raise ValueError(f"a request of {size} bytes is over the limit of {self.where} ({self.max_body_bytes} "
                             f"bytes, from its GET /health): {TOO_LARGE_HINT}")
        last, last_msg = None, ""
        for attempt in range(self.retries + 1):  # bounded
            if attempt:
                time.sleep(self.backoff * (2 ** (attempt - 1)))
            req = urllib.request.Request(self.url + path, data=data, method=method, headers=self._headers())
            try:
                with self._opener.open(req, timeout=self.timeout) as r:
                    raw = r.read()
            except urllib.error.HTTPError as e:  # the server (or a proxy) answered
                last, last_msg = e, _error_text(e)
                if e.code in RETRIED_STATUS:
                    continue
                raise self._refusal(e.code, last_msg, size) from None
            except (TimeoutError, OSError, http.client.HTTPException) as e:  # URLError is an OSError
                last = e
                continue
            return self._parse(raw, method, path)
        raise self._gave_up(last, last_msg, method, path, size) from None

    def _parse(self, raw: bytes, method: str, path: str) -> dict:
        try:
            out = json.loads(raw)
        except ValueError:
            out = None
        if not isinstance(out, dict):
            raise ValueError(f"{self.where} answered {method} {path} with something that is not the reward API's "
                             f"JSON ({raw[:80]!r}): is {self.host}:{self.port} a reward server and not another "
                             f"service or a proxy's page? Check host, port and https")
        return out

    def _refusal(self, code: int, msg: str, size: int) -> Exception:
        """The exception for a final (not retried) HTTP error answer."""
        if code == 401:
            if self.token is None:
                return ValueError(f"{self.where} needs a token (HTTP 401) and none was sent: set {TOKEN_ENV} (or "
                                  f"the remote reward's token_file) to the server's token")
            return ValueError(f"{self.where} refused the token (HTTP 401): the token from {TOKEN_ENV} / token_file "
                              f"differs from the server's; give both the same secret")
        if code == 413:
            return ValueError(f"{self.where} refused a request of {size} bytes as too large (HTTP 413): "
                              f"{TOO_LARGE_HINT}. Server: {msg}")
        if code in (400, 404, 411):
            return ValueError(f"{self.where} rejected the request: {msg}")
        if code == 500:
            return RuntimeError(f"{self.where} failed (HTTP 500): {msg}")
        return RuntimeError(f"{self.where} answered HTTP {code}: {msg}")

    def _gave_up(self, last, msg: str, method: str, path: str, size: int) -> Exception:
        """The exception once every try failed transiently."""
        tries = f"{self.retries + 1} tries"
        code = getattr(last, "code", None)
        if code == 429:
            return ConnectionError(f"{self.where} is busy (HTTP 429: too many requests at once) after {tries}: "
                                   f"{msg}. Raise retries/backoff, send from fewer clients, or start the server "
                                   f"with a larger --max-queue")
        if code == 503:
            return ConnectionError(f"{self.where} is overloaded (HTTP 503) after {tries}: {msg}. Raise "
                                   f"retries/backoff, add a server, or raise the server's --queue-timeout / "
                                   f"--max-connections")
        if code == 408:
            return TimeoutError(f"{self.where} gave up receiving a request of {size} bytes (HTTP 408) after "
                                f"{tries}: the link is too slow for its --read-timeout. Send fewer samples per "
                                f"request (chunk_size=), use wire_dtype: uint8, or raise --read-timeout")
        if code in (502, 504):
            return ConnectionError(f"the proxy at {self.host}:{self.port} could not reach the reward server behind "
                                   f"it (HTTP {code}) after {tries}: start the server or fix the proxy's upstream "
                                   f"address")
        reason = getattr(last, "reason", last)
        if isinstance(reason, TimeoutError) or isinstance(last, TimeoutError):
            return TimeoutError(f"{self.where} did not answer {method} {path} within {self.timeout:g}s ({tries}); "
                                f"raise timeout= or check the server log")
        if isinstance(reason, ssl.SSLError):
            return ConnectionError(f"TLS with {self.host}:{self.port} failed ({reason}) after {tries}: trust the "
                                   f"proxy's certificate (ca_file=) or, for a plain-HTTP server, set https: false")
        if isinstance(last, http.client.HTTPException):
            return ConnectionError(f"{self.where} broke off or garbled its answer to {method} {path} ({last!r}) "
                                   f"after {tries}: check the server log (did it crash or refuse the connection?) "
                                   f"and that {self.host}:{self.port} is a reward server with the same http/https")
        if isinstance(reason, (BrokenPipeError, ConnectionResetError)) and size:
            return ConnectionError(f"{self.where} closed the connection during a request of {size} bytes ({reason}) "
                                   f"after {tries}: it may have refused it (too large for its --max-body-mb, a "
                                   f"wrong token, too busy) or crashed; check the server log")
        return ConnectionError(f"{self.where} is not reachable ({reason}) after {tries}; "
                               f"{START_HINT.format(port=self.port)}")

    def health(self) -> dict:
        out = self._request("GET", "/health")
        if isinstance(out.get("max_body_bytes"), int):
            self.max_body_bytes = out["max_body_bytes"]
        return out

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
            if not isinstance(out.get("scores"), list):
                raise ValueError(f"{self.where} answered POST /score without a 'scores' list (keys {sorted(out)}): "
                                 f"is {self.host}:{self.port} a reward server?")
            scores.append(torch.tensor(out["scores"], dtype=torch.float32))
            infos.append(out.get("info", {}))
            sizes.append(e - s)
        return check_scores(f"remote:{reward}", torch.cat(scores), b), _merge_infos(infos, sizes)


@REWARDS.register("remote", paths=("token_file", "ca_file"))
def remote(reward=None, host=DEFAULT_HOST, port=DEFAULT_PORT, timeout=600.0, retries=2, backoff=0.5,
           wire_dtype="float32", chunk_size=None, check_on_build=True, token_file=None, https=False, ca_file=None,
           token=None):
    """A reward computed by a reward server; ``reward`` is the name the server serves it under. The
    token comes from ``token_file`` or ``$FVG_REWARD_TOKEN``, never from the config itself."""
    if token is not None:  # a parameter only to say this
        raise ValueError(f"remote: do not put the token in the config (configs are logged and shared); set "
                         f"{TOKEN_ENV} or token_file")
    if not reward or not isinstance(reward, str):
        raise ValueError("remote: set reward= to the name the reward server serves (see GET /health)")
    client = RewardClient(host, port, timeout=timeout, retries=retries, backoff=backoff, wire_dtype=wire_dtype,
                          chunk_size=chunk_size, token_file=token_file, https=https, ca_file=ca_file)
    if check_on_build:
        served = client.health().get("rewards", [])
        if reward not in served:
            raise ValueError(f"reward server {host}:{port} does not serve {reward!r}; it serves {served}")

    def fn(images, prompts, **metadata):
        return client.score(reward, images, prompts, **metadata)

    fn.client = client
    return fn
