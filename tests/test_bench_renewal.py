"""The renewal benchmark runs (smoke size), so it cannot rot unnoticed."""

from __future__ import annotations

import re

import pytest

from benchmarks import bench_renewal


def test_the_renewal_benchmark_measures_real_renewals(capsys: pytest.CaptureFixture[str]) -> None:
    bench_renewal.main(["--smoke"])
    out = capsys.readouterr().out
    m = re.search(r"(\d+) bytes each on the wire .* ([\d.]+) renewals per node per day", out)
    assert m, out
    # a renewal carries at least the CSR and the certificate chain back: a few KiB, not 0
    assert 2000 < int(m[1]) < 50_000, out
    assert 1.3 < float(m[2]) < 1.7, out
