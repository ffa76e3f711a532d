"""Where the end-to-end reranking time goes on a GPU: wall time, device-busy time and top kernels per
provider (the quick GPU case of fastrank/benchmarks/rerank.py).

    python bench/profile_rerank.py
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from fastrank.benchmarks import rerank
from fastrank.benchmarks.harness import cuda_required

if not torch.cuda.is_available():
    sys.exit(cuda_required(__file__))
device = torch.device("cuda")
case = rerank.quick_cases(device)[0]
fns = rerank.providers(case, device)
for name in ("hf_full_logits", "fastrank_unfused", "fastrank"):
    fn = fns[name]
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e3
    print(f"\n{name}: wall {wall * 1e3:.0f} ms, device busy {busy:.0f} ms ({case.label()})")
    print(events.table(sort_by="self_cuda_time_total", row_limit=8, max_name_column_width=60))
