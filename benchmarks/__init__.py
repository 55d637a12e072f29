"""Benchmarks: each module has `main()` printing its figures and the ratio to its target.

Run them all with `./dev bench` (or `python -m benchmarks`); one of them with
`python -m benchmarks.bench_plan`.
Timed here, never in unit tests: these machines are noisy, so a benchmark reports the median of
several runs and the test-suite checks behaviour only.
"""
