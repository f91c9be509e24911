"""Loader throughput (pytest-benchmark over aimass.bench.data; `aimass bench data` runs the same
measurements with stable windows and writes report.json).

    python -m pytest bench/bench_data.py -s    # AIMASS_BENCH_DATA_RECORDS changes the record count
"""
from __future__ import annotations

import os

import pytest

from aimass.bench import data as B

RECORDS = int(os.environ.get("AIMASS_BENCH_DATA_RECORDS", "200000"))
_results: dict = {}


@pytest.fixture(scope="module")
def dataset():
    d = B.Dataset(RECORDS)
    yield d
    d.close()
    if {"aimass", "roof", "torch_w0", "torch_w2"} <= _results.keys():
        torch_best = max(_results["torch_w0"], _results["torch_w2"])
        print(f"\naimass {_results['aimass']:.0f} samples/s: x{_results['aimass'] / torch_best:.1f} torch DataLoader "
              f"(best of workers 0/2: {torch_best:.0f}), {100 * _results['aimass'] / _results['roof']:.0f}% of the "
              f"memmap roof ({_results['roof']:.0f})")


def _bench(benchmark, key, fn):
    rate = benchmark.pedantic(fn, rounds=1, iterations=1)
    _results[key] = rate
    benchmark.extra_info["samples_per_s"] = rate


def test_aimass_loader(benchmark, dataset):
    _bench(benchmark, "aimass", lambda: B.loader_rate(dataset))


def test_aimass_loader_verify_once(benchmark, dataset):
    _bench(benchmark, "aimass_once", lambda: B.loader_rate(dataset, verify="once", epochs=2))


def test_roof_memmap(benchmark, dataset):
    _bench(benchmark, "roof", lambda: B.roof_rate(dataset))


def test_torch_dataloader_w0(benchmark, dataset):
    _bench(benchmark, "torch_w0", lambda: B.torch_rate(dataset, 0, 300))


def test_torch_dataloader_w2(benchmark, dataset):
    _bench(benchmark, "torch_w2", lambda: B.torch_rate(dataset, 2, 300))
