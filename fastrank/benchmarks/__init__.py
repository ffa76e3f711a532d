"""Microbenchmarks of fastrank's ops against their unfused baselines (used by `fastrank bench` and bench/)."""
