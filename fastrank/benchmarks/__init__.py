"""Microbenchmarks of fastrank's ops against their unfused baselines (used by `fastrank bench` and bench/): one
module per op, each exposing its :class:`~fastrank.benchmarks.protocol.Benchmark` as ``BENCHMARK``."""
