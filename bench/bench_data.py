"""Loader throughput: aimass.data.Loader vs torch DataLoader vs a numpy memmap roof.

200,000 records of 3,072 uint8 bytes + an int64 label, batch 256, shuffled
(AIMASS_BENCH_DATA_RECORDS changes the count for a quick run). Baselines run in
the same process on the same data:
  * torch: DataLoader over a map-style Dataset reading the same records from a
    numpy memmap, best of num_workers 0 and 2 (capped at AIMASS_BENCH_TORCH_BATCHES
    batches, default 300, to keep the run short);
  * roof: numpy memmap fancy-index copy of each shuffled batch (bandwidth bound).
aimass runs its default, verify=True (both CRCs of every record checked on every
read), and verify="once" in a second epoch. Also: aimass with RandomHorizontalFlip +
Cast + Normalize on the records viewed as 32x32x3 images, and the CPU time per
record of aimass and of the roof (all threads; unlike samples/s it barely moves
when other processes load the machine).

    python -m pytest bench/bench_data.py --benchmark-only -s   # pytest-benchmark
    python bench/bench_data.py                                  # plain table of ratios
"""
from __future__ import annotations

import os
import resource
import shutil
import tempfile
import time

import numpy as np

import aimass.data as D

RECORDS = int(os.environ.get("AIMASS_BENCH_DATA_RECORDS", "200000"))
TORCH_BATCHES = int(os.environ.get("AIMASS_BENCH_TORCH_BATCHES", "300"))
BATCH = 256
RECORD_BYTES = 3072

_results: dict = {}


class Data:
    def __init__(self, n: int = RECORDS):
        self.dir = tempfile.mkdtemp(prefix="aimass_bench_data_")
        rng = np.random.default_rng(0)
        self.npy = os.path.join(self.dir, "x.npy")
        mm = np.lib.format.open_memmap(self.npy, mode="w+", dtype=np.uint8, shape=(n, RECORD_BYTES))
        for s in range(0, n, 20000):
            mm[s:s + 20000] = rng.integers(0, 256, (min(20000, n - s), RECORD_BYTES), dtype=np.uint8)
        mm.flush()
        self.labels = rng.integers(0, 10, n).astype(np.int64)
        self.x = np.load(self.npy, mmap_mode="r")
        self.ds = D.write(os.path.join(self.dir, "ds"), {"x": self.x, "label": self.labels})
        self.img = D.write(os.path.join(self.dir, "img"),
                           {"image": self.x.reshape(n, 32, 32, 3), "label": self.labels})
        self.n = n

    def close(self):
        shutil.rmtree(self.dir, ignore_errors=True)


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return r.ru_utime + r.ru_stime


# CPU microseconds per record of the last run_aimass / run_roof: unlike samples/s it
# hardly moves when other processes load the machine, so it compares the work done.
cpu_us_per_record: dict = {}


def run_aimass(d: Data, transforms=None, dataset=None) -> float:
    loader = D.Loader(dataset or d.ds, BATCH, shuffle=True, seed=0, num_threads=2, prefetch=4,
                      transforms=transforms)
    c = _cpu_s()
    t = time.perf_counter()
    n = 0
    for b in loader:
        n += len(b["label"])
    rate = n / (time.perf_counter() - t)
    cpu_us_per_record["aimass" if transforms is None else "aimass_transforms"] = (_cpu_s() - c) / n * 1e6
    return rate


def run_aimass_verify_once(d: Data) -> float:
    """Steady-state epochs with verify="once": the first epoch checks every CRC, later ones skip it."""
    loader = D.Loader(d.ds, BATCH, shuffle=True, seed=0, num_threads=2, prefetch=4, verify="once")
    for _ in loader:
        pass
    t = time.perf_counter()
    n = 0
    for b in loader:
        n += len(b["label"])
    return n / (time.perf_counter() - t)


def run_roof(d: Data) -> float:
    perm = np.random.default_rng(1).permutation(d.n)
    c = _cpu_s()
    t = time.perf_counter()
    n = 0
    for s in range(0, d.n, BATCH):
        idx = perm[s:s + BATCH]
        x, y = d.x[idx], d.labels[idx]
        n += len(y) + 0 * x.shape[0]
    rate = n / (time.perf_counter() - t)
    cpu_us_per_record["roof"] = (_cpu_s() - c) / n * 1e6
    return rate


def run_torch(d: Data, workers: int) -> float:
    import torch
    from torch.utils.data import DataLoader, Dataset

    class MapDataset(Dataset):
        def __init__(self, path, labels):
            self.path, self.labels, self.x = path, labels, None

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            if self.x is None:  # opened per worker process
                self.x = np.load(self.path, mmap_mode="r")
            return torch.from_numpy(np.array(self.x[i])), int(self.labels[i])

    loader = DataLoader(MapDataset(d.npy, d.labels), batch_size=BATCH, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0), persistent_workers=False)
    t = time.perf_counter()
    n = 0
    for k, (x, y) in enumerate(loader):
        n += len(y)
        if k + 1 >= TORCH_BATCHES:
            break
    return n / (time.perf_counter() - t)


def measure(d: Data) -> dict:
    cpu = {}
    rates = []
    for _ in range(2):
        rates.append(run_aimass(d))
        cpu["aimass"] = min(cpu.get("aimass", 1e9), cpu_us_per_record["aimass"])
    r = {
        "aimass": max(rates),
        "aimass_verify_once_epoch2": max(run_aimass_verify_once(d) for _ in range(2)),
        "roof_memmap_fancy_index": max(run_roof(d) for _ in range(2)),
        "torch_w0": run_torch(d, 0),
        "torch_w2": run_torch(d, 2),
        "aimass_flip_normalize": run_aimass(d, [D.RandomHorizontalFlip("image"), D.Cast("image", scale=1 / 255),
                                                D.Normalize("image", [0.49, 0.48, 0.45], [0.25, 0.24, 0.26])],
                                            dataset=d.img),
    }
    run_roof(d)
    r["cpu_us_per_record_aimass"] = cpu["aimass"]
    r["cpu_us_per_record_roof"] = cpu_us_per_record["roof"]
    r["torch_best"] = max(r["torch_w0"], r["torch_w2"])
    r["aimass_vs_torch"] = r["aimass"] / r["torch_best"]
    r["aimass_vs_roof"] = r["aimass"] / r["roof_memmap_fancy_index"]
    r["aimass_verify_once_vs_torch"] = r["aimass_verify_once_epoch2"] / r["torch_best"]
    r["aimass_verify_once_vs_roof"] = r["aimass_verify_once_epoch2"] / r["roof_memmap_fancy_index"]
    r["aimass_transforms_vs_torch"] = r["aimass_flip_normalize"] / r["torch_best"]
    return r


def _print_ratios():
    if {"aimass", "roof", "torch_w0", "torch_w2"} <= _results.keys():
        torch_best = max(_results["torch_w0"], _results["torch_w2"])
        line = (f"aimass {_results['aimass']:.0f} samples/s: x{_results['aimass'] / torch_best:.1f} torch "
                f"DataLoader (best of workers 0/2: {torch_best:.0f}), "
                f"{100 * _results['aimass'] / _results['roof']:.0f}% of the memmap roof ({_results['roof']:.0f})")
        if "aimass_once" in _results:
            line += (f"; verify='once' steady state {_results['aimass_once']:.0f} samples/s "
                     f"(x{_results['aimass_once'] / torch_best:.1f} torch, "
                     f"{100 * _results['aimass_once'] / _results['roof']:.0f}% of roof)")
        if "aimass_tf" in _results:
            line += f"; with flip+normalize {_results['aimass_tf']:.0f} samples/s"
        print("\n" + line)


# ---------------------------------------------------------------- pytest-benchmark
try:
    import pytest

    @pytest.fixture(scope="module")
    def data():
        d = Data()
        yield d
        d.close()
        _print_ratios()

    def _bench(benchmark, key, fn):
        rate = benchmark.pedantic(fn, rounds=1, iterations=1)
        _results[key] = rate
        benchmark.extra_info["samples_per_s"] = rate

    def test_aimass_loader(benchmark, data):
        _bench(benchmark, "aimass", lambda: run_aimass(data))

    def test_aimass_loader_verify_once(benchmark, data):
        _bench(benchmark, "aimass_once", lambda: run_aimass_verify_once(data))

    def test_roof_memmap(benchmark, data):
        _bench(benchmark, "roof", lambda: run_roof(data))

    def test_torch_dataloader_w0(benchmark, data):
        _bench(benchmark, "torch_w0", lambda: run_torch(data, 0))

    def test_torch_dataloader_w2(benchmark, data):
        _bench(benchmark, "torch_w2", lambda: run_torch(data, 2))

    def test_aimass_flip_normalize(benchmark, data):
        tf = [D.RandomHorizontalFlip("image"), D.Cast("image"), D.Normalize("image", [0.5] * 3, [0.25] * 3)]
        _bench(benchmark, "aimass_tf", lambda: run_aimass(data, tf, data.img))

except ImportError:  # pragma: no cover
    pass


if __name__ == "__main__":
    d = Data()
    try:
        res = measure(d)
    finally:
        d.close()
    print(f"records={RECORDS} batch={BATCH} record_bytes={RECORD_BYTES} (torch capped at {TORCH_BATCHES} batches)")
    for k, v in res.items():
        print(f"  {k:28s} {v:14.2f}")
