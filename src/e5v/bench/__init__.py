"""Benchmarks: the fast path in process (:mod:`e5v.bench.fastpath`) and ``e5v serve`` under
load (:mod:`e5v.bench.serving`)."""
