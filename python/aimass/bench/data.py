"""Data suite: the native Loader vs torch DataLoader and a numpy memmap roof, and the
loader's threads x prefetch sweep.

Records of 3,072 uint8 bytes + an int64 label, batch 256, shuffled. Baselines in the same
process on the same bytes: torch ``DataLoader`` over a memmap-backed map-style dataset
(best of num_workers 0 and 2, capped at a number of batches to keep the run short) and the
roof, a numpy memmap fancy-index copy of each shuffled batch."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Dict, Optional

import numpy as np

from ._report import Report

SUITE = "data"
BATCH = 256
RECORD_BYTES = 3072


class Dataset:
    def __init__(self, n: int):
        from .. import data as D
        self.dir = tempfile.mkdtemp(prefix="aimass_bench_data_")
        rng = np.random.default_rng(0)
        self.npy = os.path.join(self.dir, "x.npy")
        mm = np.lib.format.open_memmap(self.npy, mode="w+", dtype=np.uint8, shape=(n, RECORD_BYTES))
        for s in range(0, n, 20000):
            mm[s:s + 20000] = rng.integers(0, 256, (min(20000, n - s), RECORD_BYTES), dtype=np.uint8)
        mm.flush()
        del mm
        self.labels = rng.integers(0, 10, n).astype(np.int64)
        self.x = np.load(self.npy, mmap_mode="r")
        self.ds = D.write(os.path.join(self.dir, "ds"), {"x": self.x, "label": self.labels})
        self.n = n

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def loader_rate(d: Dataset, threads: Optional[int] = None, prefetch: Optional[int] = None,
                verify=True, epochs: int = 1) -> float:
    from .. import data as D
    kw = {}
    if threads is not None:
        kw["num_threads"] = threads
    if prefetch is not None:
        kw["prefetch"] = prefetch
    loader = D.Loader(d.ds, BATCH, shuffle=True, seed=0, verify=verify, **kw)
    for _ in range(epochs - 1):  # e.g. verify="once": the first epoch checks every CRC
        for _ in loader:
            pass
    t = time.perf_counter()
    n = 0
    for b in loader:
        n += len(b["label"])
    return n / (time.perf_counter() - t)


def roof_rate(d: Dataset) -> float:
    perm = np.random.default_rng(1).permutation(d.n)
    t = time.perf_counter()
    n = 0
    for s in range(0, d.n, BATCH):
        idx = perm[s:s + BATCH]
        x, y = d.x[idx], d.labels[idx]
        n += len(y) + 0 * x.shape[0]
    return n / (time.perf_counter() - t)


def torch_rate(d: Dataset, workers: int, max_batches: int) -> float:
    import torch
    from torch.utils.data import DataLoader

    class MapDataset(torch.utils.data.Dataset):
        def __init__(self, path, labels):
            self.path, self.labels, self.x = path, labels, None

        def __len__(self):
            return len(self.labels)

        def __getitem__(self, i):
            if self.x is None:  # opened per worker process
                self.x = np.load(self.path, mmap_mode="r")
            return torch.from_numpy(np.array(self.x[i])), int(self.labels[i])

    loader = DataLoader(MapDataset(d.npy, d.labels), batch_size=BATCH, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    n = 0
    for k, (_, y) in enumerate(loader):
        n += len(y)
        if k + 1 >= max_batches:
            break
    return n / (time.perf_counter() - t)


def _best(fn, reps: int):
    vals = [fn() for _ in range(reps)]
    best = max(vals)
    spread = (max(vals) - min(vals)) / best if best else 0.0
    return best, spread


def run(report: Report, quick: bool = False, progress=None) -> Dict[str, float]:
    n = 30_000 if quick else 200_000
    reps = 2 if quick else 3
    d = Dataset(n)
    try:
        a, a_sp = _best(lambda: loader_rate(d), reps)
        once, once_sp = _best(lambda: loader_rate(d, verify="once", epochs=2), reps)
        roof, roof_sp = _best(lambda: roof_rate(d), reps)
        tb = 60 if quick else 300
        t0 = torch_rate(d, 0, tb)
        t2 = torch_rate(d, 2, tb)
        torch_best = max(t0, t2)
        common = dict(higher_is_better=True, baseline="torch DataLoader (best of workers 0/2)",
                      baseline_value=torch_best, roof="memmap fancy-index copy", roof_value=roof)
        report.add(SUITE, f"Loader {n} records x 3 KiB, batch 256, CRC on every read", a, "samples/s",
                   spread=a_sp, goal=10.0, **common)
        report.add(SUITE, "Loader verify='once', second epoch", once, "samples/s", spread=once_sp, **common)
        report.add(SUITE, "memmap fancy-index copy (roof)", roof, "samples/s", spread=roof_sp, higher_is_better=True)
        if progress:
            progress("data: loader vs torch done")
        threads = (1, 2) if quick else (1, 2, 4)
        prefetches = (1, 4) if quick else (1, 2, 4, 8)
        series = {f"prefetch {p}": [] for p in prefetches}
        best = (0.0, None, None)
        for th in threads:
            for p in prefetches:
                r, _ = _best(lambda: loader_rate(d, th, p), 2)
                series[f"prefetch {p}"].append(r)
                if r > best[0]:
                    best = (r, th, p)
        report.add_sweep("loader_threads_prefetch", list(threads), series, xlabel="loader threads",
                         ylabel="samples/s (higher is better)")
        return {"loader_threads": best[1], "loader_prefetch": best[2], "rate": best[0]}
    finally:
        d.close()
