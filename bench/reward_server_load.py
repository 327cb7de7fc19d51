"""Load on the reward server over loopback: throughput and latency; prints ONE JSON line.

Starts the real server CLI in a subprocess (token from ``$FVG_REWARD_TOKEN``, a fresh random one)
serving ``bench_mean``, a reward registered by importing this file: the mean pixel value times the
prompt length, so the numbers measure the server and the wire (JSON + base64, HTTP, threads), not
a model. ``--clients`` threads each send ``--requests`` batches of ``--batch`` images of
``3 x size x size`` through :class:`RewardClient`; every request's images are distinct and every
answer is checked against the score computed locally (``mismatches`` must be 0).

Reported: ``images_per_s`` (all images / wall time of the load), ``requests_per_s``, latency per
request (client encode + send + queue + score + answer + decode) ``p50_ms`` / ``p99_ms`` / ``max_ms``,
and ``errors``. Client threads share one Python process (the GIL); on a machine with few cores the
clients compete with the server for them.

``--slowloris N`` runs the load while N slow connections (:class:`Slowloris`: a request line, then one
header byte every ``--slowloris-every`` seconds, never a complete header; reopened when the server
closes them) hold the server's ``--max-connections`` slots; ``slowloris`` in the output counts their
connections and the answers the server gave them. Everything comes from 127.0.0.1, so the server gets
``--max-connections-per-peer`` = ``--max-connections``: the slow connections compete with the clients
for every slot.

    python bench/reward_server_load.py                                   # 8 clients x 10 x 8 images of 64 px
    python bench/reward_server_load.py --size 512 --wire-dtype uint8     # real image sizes
    python bench/reward_server_load.py --max-connections 64 --slowloris 128   # under a slowloris
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional, Union

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fastvideo_grpo.rewards import REWARDS  # noqa: E402
from fastvideo_grpo.rewards.serving.remote import RewardClient  # noqa: E402


def bench_mean(images, prompts, **metadata):
    x = images.reshape(images.shape[0], -1).mean(-1)
    return x * torch.tensor([1.0 + len(p) for p in prompts]), {}


if "bench_mean" not in REWARDS.names():  # also imported by tests (for Slowloris) and by the server (--import)
    REWARDS.register("bench_mean")(lambda: bench_mean)


class Slowloris:
    """``n`` connections to ``host:port`` that each send ``POST /score HTTP/1.1``, a Host line and then one
    header byte every ``every`` seconds, never finishing the header. A connection the server closes is
    opened again at its next tick (a slow attacker, not a flood of new connections). ``answers`` counts
    the status codes the server answered them with (``None``: closed or reset without an answer),
    ``opened`` the connections made (``"stopped"``: still held when :meth:`close` was called). Use as a
    context manager (``close`` stops every thread, bounded)."""

    HEAD = b"POST /score HTTP/1.1\r\nHost: reward-server\r\nX-Slow: "

    def __init__(self, host: str, port: int, n: int, every: float = 0.2, source: Optional[str] = None):
        self.address, self.every, self.source = (host, port), float(every), source
        self.opened, self.answers = 0, collections.Counter()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(n)]

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self, timeout: float = 10.0):
        self._stop.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    def _run(self):
        while not self._stop.is_set():
            try:
                sock = socket.create_connection(self.address, timeout=5.0,
                                                source_address=(self.source, 0) if self.source else None)
            except OSError:
                self._stop.wait(self.every)
                continue
            with self._lock:
                self.opened += 1
            with sock:
                status = self._hold(sock)
            with self._lock:
                self.answers[status] += 1
            self._stop.wait(self.every)  # reopen at the next tick

    def _hold(self, sock) -> Union[int, str, None]:
        """Drip header bytes until the server answers or closes: the answer's status code, None when
        it closed without one, "stopped" when :meth:`close` came first."""
        try:
            sock.sendall(self.HEAD)
            while not self._stop.is_set():
                if select.select([sock], [], [], self.every)[0]:
                    data = b""
                    while len(data) < 65536 and (chunk := sock.recv(65536)):
                        data += chunk
                    return int(data.split()[1]) if data.startswith(b"HTTP/") else None
                sock.sendall(b"a")
        except (OSError, ValueError, IndexError):
            return None
        return "stopped"


def _percentile(values, q):
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q / 100 * (len(v) - 1))))]


def start_server(token: str, args) -> tuple:
    env = dict(os.environ, FVG_REWARD_TOKEN=token,
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "fastvideo_grpo.rewards.serving.server", "--import", "reward_server_load",
           "--reward", "bench_mean", "--host", "127.0.0.1", "--port", "0", "--threads", str(args.server_threads),
           "--max-batch", str(args.batch), "--max-queue", str(max(16, args.clients)),
           "--max-connections", str(args.max_connections), "--max-connections-per-peer", str(args.max_connections),
           "--header-timeout", str(args.header_timeout)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
    deadline, seen = time.monotonic() + 300, []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if line.startswith("reward server ready on http://127.0.0.1:"):
            return proc, int(line.split(":")[2].split()[0])
    proc.kill()
    raise RuntimeError("the reward server did not start:\n" + "".join(seen))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=10, help="requests per client")
    p.add_argument("--batch", type=int, default=8, help="images per request")
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--wire-dtype", default="float32", choices=["float32", "float16", "uint8"])
    p.add_argument("--server-threads", type=int, default=1, help="the server's --threads")
    p.add_argument("--max-connections", type=int, default=None,
                   help="the server's --max-connections (and --max-connections-per-peer); default max(64, 2 x clients)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="the server's --header-timeout")
    p.add_argument("--slowloris", type=int, default=0, help="slow connections held open during the load")
    p.add_argument("--slowloris-every", type=float, default=0.2, help="seconds between their header bytes")
    p.add_argument("--slowloris-warmup", type=float, default=2.0,
                   help="seconds the slow connections run before the clients start")
    a = p.parse_args(argv)
    if min(a.clients, a.requests, a.batch, a.size) < 1:
        p.error("--clients, --requests, --batch and --size must be >= 1")
    if a.max_connections is None:
        a.max_connections = max(64, 2 * a.clients)
    if a.max_connections < 1 or a.slowloris < 0 or not a.slowloris_every > 0 or not a.header_timeout > 0:
        p.error("--max-connections must be >= 1, --slowloris >= 0, --slowloris-every and --header-timeout > 0")
    torch.set_num_threads(1)
    token = secrets.token_urlsafe(32)
    proc, port = start_server(token, a)
    latencies, mismatches, errors = [], [0], []
    lock = threading.Lock()

    def client(c):
        cl = RewardClient(port=port, token=token, wire_dtype=a.wire_dtype, timeout=300, retries=3)
        for r in range(a.requests):
            x = torch.rand(a.batch, 3, a.size, a.size, generator=torch.Generator().manual_seed(1 + c * 100003 + r))
            prompts = [f"client {c} request {r} sample {i}" for i in range(a.batch)]
            seen = {"uint8": lambda v: (v * 255).round() / 255, "float16": lambda v: v.half().float(),
                    "float32": lambda v: v}[a.wire_dtype](x)  # what the server decodes
            expected, _ = bench_mean(seen, prompts)
            t0 = time.perf_counter()
            try:
                scores, _ = cl.score("bench_mean", x, prompts)
            except Exception as e:  # noqa: BLE001 - counted, reported
                with lock:
                    errors.append(repr(e)[:200])
                continue
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                if not torch.allclose(scores, expected, rtol=1e-5, atol=1e-6):
                    mismatches[0] += 1

    attack = Slowloris("127.0.0.1", port, a.slowloris, every=a.slowloris_every)
    try:
        RewardClient(port=port, token=token).health()
        if a.slowloris:
            attack.__enter__()
            time.sleep(a.slowloris_warmup)  # let the slow connections take the slots first
        threads = [threading.Thread(target=client, args=(c,)) for c in range(a.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        attack.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    done = len(latencies)
    ms = [1000 * x for x in latencies] or [float("nan")]
    print(json.dumps({
        "clients": a.clients, "requests": a.clients * a.requests, "answered": done, "batch": a.batch,
        "image": [3, a.size, a.size], "wire_dtype": a.wire_dtype,
        "request_mb": round(a.batch * 3 * a.size ** 2 * {"float32": 4, "float16": 2, "uint8": 1}[a.wire_dtype]
                            * 4 / 3 / 2 ** 20, 3),
        "images_per_s": round(done * a.batch / wall, 1), "requests_per_s": round(done / wall, 2),
        "p50_ms": round(_percentile(ms, 50), 1), "p99_ms": round(_percentile(ms, 99), 1), "max_ms": round(max(ms), 1),
        "mismatches": mismatches[0], "errors": len(errors), "first_error": errors[0] if errors else None,
        "wall_s": round(wall, 2), "cpus": os.cpu_count(), "auth": "token", "max_connections": a.max_connections,
        "slowloris": {"connections": a.slowloris, "every_s": a.slowloris_every, "opened": attack.opened,
                      "answers": {str(k): v for k, v in sorted(attack.answers.items(), key=str)}}
        if a.slowloris else None}))


if __name__ == "__main__":
    main()
