"""`fastrank bench`'s runner, plot and flags: baselines that cannot be built, progress lines, the figure."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from dataclasses import asdict

import pytest
import torch
from references import require

import fastrank
from fastrank.benchmarks import embedder_train, pool, rank_shared, reranker_train, runner
from fastrank.benchmarks.harness import MissingInput, reference_baseline, require_input
from fastrank.benchmarks.protocol import Benchmark
from fastrank.benchmarks.synthetic import synthetic_rankings
from fastrank.cli import main
from fastrank.data.templates import shared_prefix_lengths

CPU = torch.device("cpu")
CASE = pool.Case(mode="mean_fwd", sequences=2, seq_len=4, hidden_size=8, dtype="float32")
RESULTS = pathlib.Path(__file__).resolve().parents[1] / "bench" / "results"
# what FlagEmbedding 1.3 raises on import under transformers 5.24
MOVED_MODULE = (
    "raise ModuleNotFoundError(\"No module named 'transformers.modeling_attn_mask_utils'\", "
    "name='transformers.modeling_attn_mask_utils')\n"
)


def _package(root, name, source):
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(source)


def _fake_op(monkeypatch, providers, names=("fastrank",)):
    """Register op "fake": one tiny pool-shaped case whose providers() is ``providers``, returning ``names``."""
    benchmark = Benchmark(
        name="fake",
        case_type=pool.Case,
        quick_cases=lambda device: [CASE],
        full_cases=lambda device: [CASE],
        providers=lambda case, device: providers(),
        provider_names=names,
        table_label=pool.BENCHMARK.table_label,
    )
    monkeypatch.setitem(runner.OPS, "fake", benchmark)


def _double():
    x = torch.ones(64)
    return lambda: x * 2


def test_unavailable_baselines_get_a_row_with_the_reason_and_the_rest_are_measured(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(tmp_path))
    _package(tmp_path, "bench_moved_dep", MOVED_MODULE)
    _package(tmp_path, "bench_odd_error", "raise AttributeError('transformers has no attribute X\\nmore detail')\n")
    _package(tmp_path, "bench_fails_to_build", "def make():\n    raise RuntimeError('needs transformers<5')\n")
    _fake_op(
        monkeypatch,
        lambda: {
            "torch_ok": _double(),
            "missing": reference_baseline("bench_no_such_package", lambda m: m.run),
            "moved": reference_baseline("bench_moved_dep.sub", lambda m: m.run),
            "odd": reference_baseline("bench_odd_error", lambda m: m.run),
            "build": reference_baseline("bench_fails_to_build", lambda m: m.make()),
            "fastrank": _double(),
        },
        names=("torch_ok", "missing", "moved", "odd", "build", "fastrank"),
    )
    lines = []
    results = runner.run(["fake"], CPU, log=lines.append)

    entry = results["cases"][0]
    assert [m["provider"] for m in entry["measurements"]] == ["torch_ok", "fastrank"]
    assert all(m["time_ms"] is not None for m in entry["measurements"])
    assert list(entry["ratios"]) == ["torch_ok"]
    reasons = entry["unavailable"]
    assert list(reasons) == ["missing", "moved", "odd", "build"]
    assert (
        reasons["missing"] == "bench_no_such_package is not installed "
        "(pip install -c constraints.txt -e '.[bench]' installs the baselines)"
    )
    assert reasons["moved"] == (
        "bench_moved_dep.sub does not import: "
        "ModuleNotFoundError: No module named 'transformers.modeling_attn_mask_utils'"
    )
    assert reasons["odd"] == "bench_odd_error does not import: AttributeError: transformers has no attribute X"
    assert reasons["build"] == "bench_fails_to_build fails to build this baseline: RuntimeError: needs transformers<5"

    table = runner.format_table(results).splitlines()
    for name, reason in reasons.items():
        assert sum(name in line and f"not run: {reason}" in line for line in table) == 1
    assert any("torch_ok" in line and "ms," in line for line in table)  # ratios and fastrank's time
    # progress: the providers timed in turns named before they run, then each with its time per call
    assert "  timing torch_ok, fastrank in turns ..." in lines
    for name in ("torch_ok", "fastrank"):
        assert any(line.startswith(f"  {name}: ") and line.endswith(" ms per call") for line in lines)
    assert any(line.startswith("  moved: not run: ") for line in lines)

    path = tmp_path / "results.json"
    runner.write_json(results, str(path))
    assert runner.read_json(str(path))["cases"][0]["unavailable"] == reasons


def test_provider_selection_measures_those_and_fastrank(monkeypatch):
    built = []

    def providers():
        built.append(1)
        return {"a": _double(), "b": _double(), "fastrank": _double()}

    _fake_op(monkeypatch, providers, names=("a", "b", "fastrank"))
    results = runner.run(["fake"], CPU, providers=["b"])
    entry = results["cases"][0]
    assert [m["provider"] for m in entry["measurements"]] == ["b", "fastrank"] and list(entry["ratios"]) == ["b"]
    with pytest.raises(ValueError, match=r"^--provider c, d: not a provider of fake; choose from a, b, fastrank$"):
        runner.run(["fake"], CPU, providers=["d", "c", "a"])
    with pytest.raises(ValueError, match=r"^--op 'nope' is not a benchmark"):
        runner.run(["fake", "nope"], CPU, providers=["a"])
    assert len(built) == 1  # refused before any case is set up
    with pytest.raises(ValueError, match="--provider b: not a provider of pool; choose from"):
        main(["--traceback", "bench", "--op", "pool", "--provider", "b"])


def test_errors_in_fastrank_code_surface(monkeypatch):
    def bad_build(json_module):
        return fastrank.pool(torch.ones(2, 3, 4), torch.ones(2, 3), mode="no_such_mode")

    with pytest.raises(ValueError, match="no_such_mode"):  # raised in fastrank, not in the reference package
        reference_baseline("json", bad_build)

    def broken_providers():
        raise ImportError("cannot import name 'helper' from 'fastrank.utils'")

    _fake_op(monkeypatch, broken_providers)
    with pytest.raises(ImportError, match="helper"):  # not a missing baseline: the run stops
        runner.run(["fake"], CPU)


def test_missing_shared_input_reports_the_case_as_not_run(monkeypatch):
    _fake_op(monkeypatch, lambda: {"fastrank": require_input("bench_no_weights_package", "the fake case")})
    lines = []
    results = runner.run(["fake"], CPU, log=lines.append)
    assert results["cases"] == []
    (skipped,) = results["skipped"]
    assert skipped["reason"].startswith("the fake case needs bench_no_weights_package: ModuleNotFoundError")
    table = runner.format_table(results)
    assert f"(all)           not run: {skipped['reason']}" in table
    assert any(line.startswith("  not run: the fake case") for line in lines)
    with pytest.raises(MissingInput):
        require_input("bench_no_weights_package", "x")


def test_flagembedding_failing_to_import_leaves_fastrank_measured(monkeypatch, tmp_path):
    """The embedder step with FlagEmbedding as it fails under transformers 5.24: a row, fastrank still timed."""
    for name in [m for m in sys.modules if m == "FlagEmbedding" or m.startswith("FlagEmbedding.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    _package(tmp_path, "FlagEmbedding", MOVED_MODULE)
    tiny = embedder_train.Case(queries=2, group_size=2, passage_max_length=16, dtype="float32")
    monkeypatch.setitem(
        runner.OPS, "embedder_train", dataclasses.replace(embedder_train.BENCHMARK, quick_cases=lambda device: [tiny])
    )
    results = runner.run(["embedder_train"], CPU)
    entry = results["cases"][0]
    assert [m["provider"] for m in entry["measurements"]] == ["fastrank_padded", "fastrank"]
    assert all(m["time_ms"] > 0 for m in entry["measurements"])
    assert list(entry["ratios"]) == ["fastrank_padded"]
    assert (
        "ModuleNotFoundError: No module named 'transformers.modeling_attn_mask_utils'"
        in entry["unavailable"]["flagembedding"]
    )
    table = runner.format_table(results)
    assert "queries/s" in table and "flagembedding   not run: FlagEmbedding." in table


def test_rank_shared_providers_score_alike_and_share_the_query_prefix():
    """The four providers of rank_shared score the same pairs the same (fp32), and the packed one shares."""
    case = rank_shared.Case(queries=2, docs=3, min_words=5, max_words=20, batch_size=2, layers=1, dtype="float32")
    fns = rank_shared.BENCHMARK.providers_of(case, CPU)
    assert list(fns) == ["hf_logits_to_keep", "fastrank_padded", "fastrank_packed", "fastrank"]
    scores = {name: torch.tensor(fn()) for name, fn in fns.items()}
    assert scores["fastrank"].shape == (2, 3)
    for name, got in scores.items():
        torch.testing.assert_close(got, scores["hf_logits_to_keep"], rtol=1e-4, atol=1e-4, msg=name)
    # every pair starts with its query's prefix, so the shared provider computes it once per batch
    model, tokenizer = rank_shared._setup(case, CPU)
    preset = fastrank.get_preset(rank_shared.PRESET)
    for query, docs in synthetic_rankings(2, 3, (5, 20), seed=0):
        pairs = [(query, doc) for doc in docs]
        encoded = preset.template.tokenize(tokenizer, pairs, preset.max_length)
        heads = shared_prefix_lengths(preset.template, tokenizer, pairs, encoded, preset.max_length)
        assert all(head is not None and head > 20 for head in heads)


def test_reranker_step_shares_each_query_prefix():
    """reranker_train's engine batch (quick CPU case) holds each query's prefix once, read by all its passages:
    fewer tokens than the padded batch's real ones."""
    case = reranker_train.quick_cases(CPU)[0]
    padded, shared = reranker_train._batches(case, reranker_train.build_tokenizer(padding_side="left"), CPU)
    prefixes = shared["segments_prefix"]
    assert int((prefixes >= 0).sum()) == case.queries * case.group_size  # every passage reads its prefix
    assert shared["num_tokens"] < int(padded["attention_mask"].sum())


@pytest.mark.parametrize("device", ["cpu", "cuda"])  # the cases only: nothing runs, no GPU needed
def test_every_op_is_a_benchmark_whose_saved_cases_label(device):
    device = torch.device(device)
    for op, benchmark in runner.OPS.items():
        assert isinstance(benchmark, Benchmark) and benchmark.name == op
        for case in [*benchmark.quick_cases(device), *benchmark.full_cases(device)]:
            assert isinstance(case, benchmark.case_type) and case.label()
            saved = json.loads(json.dumps(benchmark.case_dict(case)))
            assert asdict(case).items() <= saved.items()
            assert runner.case_label(op, saved) == benchmark.table_label(saved)


# The first case of each committed file, labelled as the table and the figure showed it before the Case fields
# were renamed (the files keep the old keys: n, t, hidden, batch_size ...).
SAVED_LABELS = {
    "score_head-h100.json": "forward N=1 T=512 bfloat16",
    "pool-h100.json": "mean_fwd N=256 T=128 bfloat16",
    "contrastive-h100.json": "train B=4096 G=8 D=1024 bfloat16",
    "rerank-h100.json": "1024 pairs L<=512 b=64 24l bfloat16",
    "encode-h100.json": "10000 minilm texts L<=256 b=64 6l float32",
    "embedder_train-h100.json": "step B=128 G=8 L<=128 bfloat16",
    "reranker_train-h100.json": "step_ckpt B=4 G=8 L<=512 24l bfloat16",
}


def test_results_saved_before_the_rename_read_as_new_ones():
    for name, label in SAVED_LABELS.items():
        entry = runner.read_json(str(RESULTS / name))["cases"][0]
        assert runner.case_label(entry["op"], entry["case"]) == label
    # every saved case is a case of today's fields (those dropped since aside), and labels as one
    for path in sorted(RESULTS.glob("*.json")):
        for entry in runner.read_json(str(path))["cases"]:
            op, benchmark = entry["op"], runner.OPS[entry["op"]]
            fields = {f.name for f in dataclasses.fields(benchmark.case_type)}
            current = benchmark.current_keys(entry["case"])
            case = benchmark.case_type(**{key: value for key, value in current.items() if key in fields})
            assert runner.case_label(op, benchmark.case_dict(case)) == runner.case_label(op, entry["case"])


def test_a_benchmark_that_breaks_the_protocol_is_refused():
    shape = dict(
        name="bad",
        case_type=pool.Case,
        quick_cases=lambda device: [CASE],
        full_cases=lambda device: [CASE],
        table_label=pool.BENCHMARK.table_label,
    )
    with pytest.raises(ValueError, match="provider_names .* must include 'fastrank'"):
        Benchmark(providers=lambda case, device: {}, provider_names=("torch",), **shape)
    with pytest.raises(ValueError, match="items_per_call and unit go together"):
        Benchmark(providers=lambda case, device: {}, provider_names=("fastrank",), unit="texts", **shape)
    with pytest.raises(ValueError, match="legacy_keys maps 'n' -> 'rows'"):
        Benchmark(providers=lambda case, device: {}, provider_names=("fastrank",), legacy_keys={"n": "rows"}, **shape)
    undeclared = Benchmark(
        providers=lambda case, device: {"torch": _double(), "fastrank": _double()},
        provider_names=("fastrank",),
        **shape,
    )
    with pytest.raises(ValueError, match=r"^bad: providers\(\) returned \['torch', 'fastrank'\]; .*\['torch'\]\)$"):
        undeclared.providers_of(CASE, CPU)


def _results():
    """A small saved run: two cases, a lower-bound memory ratio, an out-of-memory and an unavailable baseline."""

    def m(provider, time_ms, peak, error=None):
        return {
            "provider": provider,
            "time_ms": time_ms,
            "time_ms_p20": time_ms,
            "time_ms_p80": time_ms,
            "peak_bytes": peak,
            "graph_time_ms": None,
            "error": error,
            "extra": {},
        }

    def r(time, memory, lower=False):
        return {"time": time, "graph_time": None, "memory": memory, "memory_is_lower_bound": lower}

    return {
        "environment": {"torch": torch.__version__, "fastrank": "0.0-test", "cpu_threads": 2, "triton": None},
        "command": "fastrank bench",
        "timestamp": "2026-01-01T00:00:00+00:00",
        "cases": [
            {
                "op": "pool",
                "case": asdict(CASE),
                "measurements": [m("torch_unfused", 2.0, 4 << 20), m("fastrank", 1.0, 1 << 19)],
                "ratios": {"torch_unfused": r(2.0, 4.0, True)},
                "unavailable": {},
            },
            # saved before the Case fields were renamed: n, t for sequences, seq_len
            {
                "op": "score_head",
                "case": {"mode": "forward", "n": 4, "t": 32, "dtype": "float32"},
                "measurements": [
                    m("full_logits", 30.0, 1 << 30),
                    m("logits_to_keep", None, None, "out of memory"),
                    m("fastrank", 2.0, 1 << 10),
                ],
                "ratios": {"full_logits": r(15.0, 1e6), "logits_to_keep": r(None, None)},
                "unavailable": {"flagembedding": "FlagEmbedding does not import: ModuleNotFoundError: ..."},
            },
        ],
    }


def test_plot_writes_a_png(tmp_path):
    require("matplotlib")
    from fastrank.benchmarks.plot import plot, plot_results

    out = tmp_path / "ratios.png"
    plot([_results()], str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = tmp_path / "r.json"
    runner.write_json(_results(), str(saved))
    plot_results([str(saved), str(saved)], str(tmp_path / "two.png"))
    assert (tmp_path / "two.png").stat().st_size > 0


def test_bench_from_json_prints_the_table_and_plots(tmp_path, capsys):
    require("matplotlib")
    saved = tmp_path / "r.json"
    runner.write_json(_results(), str(saved))
    out = tmp_path / "fig.png"
    assert main(["bench", "--from-json", str(saved), "--plot", str(out)]) == 0
    printed = capsys.readouterr()
    assert "flagembedding   not run: FlagEmbedding does not import" in printed.out
    assert "out of memory" in printed.out and ">4x" in printed.out
    assert "mean_fwd N=2 T=4 float32" in printed.out and "forward N=4 T=32 float32" in printed.out  # new, old keys
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--from-json", "r.json", "--op", "pool", "--full"],
            "--from-json shows saved results; --op, --full only apply",
        ),
        (
            ["--from-json", "r.json", "--provider", "fastrank"],
            "--from-json shows saved results; --provider only apply",
        ),
        (["--from-json", "missing.json"], "--from-json missing.json: no such file"),
        (["--from-json", "other.json"], "--from-json other.json: not the output of `fastrank bench --json`"),
        (["--from-json", "broken.json"], "--from-json broken.json: not JSON"),
    ],
)
def test_bench_flag_errors(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "other.json").write_text(json.dumps({"cases": []}))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        main(["--traceback", "bench", *argv])


def test_bench_plot_needs_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ValueError, match=r"^--plot needs matplotlib, which is not installed: pip install matplotlib$"):
        main(["--traceback", "bench", "--op", "pool", "--plot", str(tmp_path / "r.png")])  # before anything runs


def test_bench_plot_path_is_checked_before_the_run(tmp_path):
    require("matplotlib")
    with pytest.raises(ValueError, match=r"^--plot .*r\.txt: cannot write a figure of type 'txt'; use \.png"):
        main(["--traceback", "bench", "--op", "pool", "--plot", str(tmp_path / "r.txt")])
    with pytest.raises(ValueError, match=r"^--plot .*r\.png: the folder .*no_dir does not exist"):
        main(["--traceback", "bench", "--op", "pool", "--plot", str(tmp_path / "no_dir" / "r.png")])


def test_decoder_flops_count_the_projections_mlp_and_causal_attention():
    """Qwen2.5-0.5B: 0.72 GFLOP per token of projections and MLP over 24 layers (the figure of issue 15), plus
    causal attention that grows with the context; checked against a count written out by hand."""
    from fastrank.benchmarks.harness import decoder_flops, gpu_bf16_peak_flops, throughput
    from fastrank.benchmarks.synthetic import qwen25_config

    config = qwen25_config(num_layers=24)
    one = decoder_flops(config, [1])
    by_hand = 24 * (2 * (896 * 64 * (2 * 14 + 2 * 2) + 3 * 896 * 4864) + 4 * 14 * 64 * 1)
    assert one == by_hand and 0.70e9 < one < 0.73e9
    # two sequences of 3 tokens: contexts 1 + 2 + 3 each
    assert decoder_flops(config, [3, 3]) == 24 * (2 * 6 * (896 * 64 * 32 + 3 * 896 * 4864) + 4 * 14 * 64 * 12)
    out = throughput({"tokens": 1000, "flops": 2e12}, 500.0, 1e15)
    assert out["tokens_per_second"] == 2000 and out["model_tflops_per_second"] == 4.0 and out["mfu"] == 0.004
    assert "mfu" not in throughput({"tokens": 1, "flops": 1.0}, 1.0, None)
    assert gpu_bf16_peak_flops(torch.device("cpu")) is None


def test_gpu_slug_names_result_files(monkeypatch):
    from fastrank.benchmarks import harness

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name, slug in [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA H100 PCIe", "h100-pcie"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("Some New GPU X9", "x9"),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        assert harness.gpu_slug() == slug


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak memory is read from /proc (Linux)")
def test_cpu_peak_is_each_calls_own_after_timed_calls_cached_memory(monkeypatch):
    """The peak call sees a call's own allocation even after timed calls (under glibc's large timing threshold)
    left the same block cached in the heap; the peak call alone runs under the 64 KiB threshold, and the timing
    threshold is back after it, also when the call raises."""
    from fastrank.benchmarks import harness

    size = 8 << 20  # 8 MiB: under the 32 MiB timing threshold, so timed calls keep it in the heap

    def fn():
        return torch.ones(size // 4)  # written, so resident

    assert harness._prepare_cpu_memory_tracking()
    for _ in range(3):
        for _ in range(3):
            fn()  # timed calls: the block stays cached in malloc's heap
        peak = harness.peak_bytes(fn, CPU)
        assert size <= peak < size + (2 << 20), peak
    # Which threshold is in force when, read from the calls that set them (the page faults of a long test
    # session's process say too little: glibc serves a large block from its heap top whatever the threshold).
    real = harness._set_malloc_thresholds
    thresholds = []

    def recording(value):
        thresholds.append(value)
        return real(value)

    monkeypatch.setattr(harness, "_set_malloc_thresholds", recording)
    during = []
    harness.peak_bytes(lambda: during.append(thresholds[-1]), CPU)
    assert during == [harness._PEAK_MMAP_THRESHOLD] and thresholds[-1] == harness._TIMING_MMAP_THRESHOLD

    def failing():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        harness.peak_bytes(failing, CPU)
    assert thresholds[-1] == harness._TIMING_MMAP_THRESHOLD


def test_serve_benchmark_runs_each_server_in_its_own_process_and_stops_it():
    """The serve benchmark's providers on a tiny rank case: both servers are processes of their own that answer
    every request and report their own peak memory, and they have exited once the case is done; in_process runs
    here."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import os

    from fastrank.benchmarks import serve

    case = serve.Case(
        mode="rank", clients=2, requests=1, items=3, min_words=2, max_words=4, layers=1, hidden=64, dtype="float32"
    )
    fns = serve.providers(case, CPU)
    assert set(fns) == {"batching_off", "fastrank", "in_process"}
    procs = [fns[name].server.proc for name in ("batching_off", "fastrank")]
    assert len({p.pid for p in procs} | {os.getpid()}) == 3
    for name, fn in fns.items():
        assert fn() == 2, name  # two clients x one request each, every one answered 200
    assert fns["fastrank"].stats()["latency_samples"] == 2
    peak = fns["fastrank"].peak_bytes()
    assert isinstance(peak, int) and peak >= 0
    serve._stop_all()
    assert all(p.poll() is not None for p in procs)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads process states from /proc (Linux)")
def test_serve_benchmark_servers_stop_when_the_benchmark_process_is_killed():
    """A benchmark killed outright (no clean-up runs) leaves no server behind: each notices its parent is gone."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    import subprocess
    import time

    script = (
        "import time, torch\n"
        "from fastrank.benchmarks import serve\n"
        "case = serve.Case(mode='rank', clients=1, requests=1, items=3, min_words=2, max_words=4, layers=1, "
        "hidden=64, dtype='float32')\n"
        "fns = serve.providers(case, torch.device('cpu'))\n"
        "print(' '.join(str(fns[n].server.proc.pid) for n in ('batching_off', 'fastrank')), flush=True)\n"
        "time.sleep(600)\n"
    )
    bench = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in bench.stdout.readline().split()]
    finally:
        bench.kill()
        bench.wait()
    assert len(pids) == 2

    def running(pid):  # an exited process nobody has reaped yet is a zombie ("Z"): not running
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 30
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(running(p) for p in pids)


def test_cpu_providers_are_timed_in_turns():
    """measure_cpu alternates the providers in short turns (a drift of the machine's speed falls on both), each
    timed for its min_seconds, after one warm-up and one peak-memory call each."""
    import time

    from fastrank.benchmarks.harness import measure_cpu

    order = []

    def provider(name, seconds):
        def call():
            order.append(name)
            time.sleep(seconds)

        return call

    out = measure_cpu({"a": provider("a", 0.001), "b": provider("b", 0.002)}, min_seconds=0.05, block_seconds=0.005)
    assert [m.provider for m in out] == ["a", "b"]
    assert order[:4] == ["a", "a", "b", "b"]  # warm-up and peak call of each
    timed = order[4:]
    switches = sum(x != y for x, y in zip(timed, timed[1:]))
    assert switches >= 6, timed  # turns, not one provider after the other
    for m, name in zip(out, "ab"):  # each timed for at least min_seconds
        assert m.time_ms > 0 and timed.count(name) * m.time_ms >= 0.5 * 50, (name, m.time_ms, timed.count(name))
