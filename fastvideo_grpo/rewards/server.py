"""Reward server: run reward models in a separate process behind a small HTTP/JSON API.

Start it (binds 127.0.0.1 by default; ``--port 0`` picks a free port and prints it)::

    python -m fastvideo_grpo.rewards.server --config rewards.yaml --port 8765
    python -m fastvideo_grpo.rewards.server --reward hps --set model_path=ckpts/hps_v2.1_hf --port 8765

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

Every request is handled on its own thread, and torch's intra-op thread count is a per-thread
setting (see fastvideo_grpo/threads.py), so each scoring call sets ``num_threads`` (``--threads``)
in the thread that runs it: a different count may split float reductions differently. A service in
the caller's process with the caller's count gives bit-identical scores; a server process (or
another machine) gives scores equal up to float32 rounding, since its math libraries may choose
other kernels or blockings even for the same count.

The client side (RewardClient and the ``remote`` reward) is in remote.py.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, Optional, Sequence

import torch

from ..threads import resolve_num_threads, thread_count
from .base import REWARDS, RewardFn, check_scores, validate_reward_inputs
from .remote import DEFAULT_HOST, DEFAULT_PORT, _jsonable, _merge_infos, decode_tensor

# ---------------------------------------------------------------- server

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

    def score(self, name: str, images: torch.Tensor, prompts: Sequence[str], metadata: Optional[dict] = None):
        if name not in self.rewards:
            raise KeyError(name)
        validate_reward_inputs(images, prompts)
        metadata = metadata or {}
        b = images.shape[0]
        scores, infos, sizes = [], [], []
        with self._lock, thread_count(self.num_threads):
            for s in range(0, b, self.max_batch):
                e = min(b, s + self.max_batch)
                md = {k: (v[s:e] if isinstance(v, list) and len(v) == b else v) for k, v in metadata.items()}
                sc, info = self.rewards[name](images[s:e], list(prompts[s:e]), **md)
                scores.append(check_scores(name, sc, e - s))
                infos.append(_jsonable(info or {}))
                sizes.append(e - s)
        return torch.cat(scores), _merge_infos(infos, sizes)


def _handler(service: RewardService):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: one line per error only
            pass

        def _send(self, code: int, obj: dict):
            body = json.dumps(obj).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout): one line
                self.close_connection = True
                print(f"[reward server] client {self.client_address[0]}:{self.client_address[1]} left before "
                      f"the answer to {self.command} {self.path} (client timeout?)", file=sys.stderr, flush=True)

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._send(200, {"rewards": sorted(service.rewards), "max_batch": service.max_batch,
                                 "num_threads": service.num_threads})
            else:
                self._send(404, {"error": f"unknown path {self.path}; use GET /health or POST /score"})

        def do_POST(self):
            if self.path.rstrip("/") != "/score":
                self._send(404, {"error": f"unknown path {self.path}; use POST /score"})
                return
            try:
                n = int(self.headers.get("Content-Length", "0"))
                req = json.loads(self.rfile.read(n))
                name = req.get("reward")
                images = decode_tensor(req.get("images") or {})
                prompts = req.get("prompts")
                if not isinstance(prompts, list) or not all(isinstance(x, str) for x in prompts):
                    raise ValueError("prompts must be a JSON list of strings")
                scores, info = service.score(name, images, prompts, req.get("metadata") or {})
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


def make_server(service: RewardService, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> ThreadingHTTPServer:
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[reward server] WARNING: binding {host}: the API has no authentication", file=sys.stderr)
    server = ThreadingHTTPServer((host, int(port)), _handler(service))
    server.daemon_threads = True
    return server


def serve_in_thread(service: RewardService, host: str = DEFAULT_HOST, port: int = 0):
    """Start a server on a background thread; returns (server, thread). Stop: server.shutdown()."""
    server = make_server(service, host, port)
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


def main(argv=None):
    p = argparse.ArgumentParser(description="Serve reward models over HTTP (see the module docstring)")
    p.add_argument("--config", help="YAML/JSON file: {rewards: {name: {type: ..., ...}}, host, port, max_batch, "
                                     "num_threads}")
    p.add_argument("--reward", help="serve one registered reward (instead of --config)")
    p.add_argument("--name", help="name to serve --reward under (default: the registry name)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config field for --reward (JSON values parsed), repeatable")
    p.add_argument("--import", dest="imports", action="append", default=[],
                   help="extra module to import first (registers custom rewards), repeatable")
    p.add_argument("--host", default=None, help=f"bind address (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=None, help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    p.add_argument("--max-batch", type=int, default=None, help="samples per model call (default 16)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per scoring call (default 0 = torch's default, as train.num_threads)")
    a = p.parse_args(argv)

    importlib.import_module("fastvideo_grpo.rewards")  # registers the built-in rewards
    for mod in a.imports:
        importlib.import_module(mod)
    cfg = load_server_config(a.config) if a.config else {}
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
    host = a.host or cfg.get("host", DEFAULT_HOST)
    port = a.port if a.port is not None else int(cfg.get("port", DEFAULT_PORT))
    threads = a.threads if a.threads is not None else cfg.get("num_threads", 0)
    service = RewardService(build_rewards(rewards_cfg), max_batch=a.max_batch or int(cfg.get("max_batch", 16)),
                            num_threads=threads)
    server = make_server(service, host, port)
    print(f"reward server ready on http://{host}:{server.server_address[1]} rewards={sorted(service.rewards)} "
          f"threads={service.num_threads}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
