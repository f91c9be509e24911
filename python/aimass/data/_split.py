"""Seeded (optionally stratified) train/valid/test splits stored as index files."""
from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

import numpy as np

from .._io import atomic_path, atomic_write_text
from ._format import INDEX_FILE, CorruptDataError, Dataset, _index_text, _load_split, _read_index, _split_files


class Splits:
    """The result of split(): .train, .valid, .test datasets (views; records not copied)."""

    def __init__(self, parts: Dict[str, Dataset]):
        self._parts = parts
        self.train, self.valid, self.test = parts.get("train"), parts.get("valid"), parts.get("test")

    def __getitem__(self, name: str) -> Dataset:
        return self._parts[name]

    def items(self):
        """(name, Dataset) pairs in the config's order."""
        return self._parts.items()

    def __repr__(self) -> str:
        return "Splits(" + ", ".join(f"{k}={len(v)}" for k, v in self._parts.items()) + ")"


def _read_config(config) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    import yaml
    path = os.fspath(config)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"split: config file {path} does not exist")
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"split: {path} must hold a mapping (data_path, download, splitting)")
    return cfg


def _label_of(ds: Dataset, stratify) -> Optional[str]:
    if stratify is None or stratify is False:
        return None
    if stratify is True:
        name = ds.metadata.get("label_field") or ("label" if "label" in ds.fields else None)
        if name is None:
            raise ValueError("split: stratify=True but the dataset names no label field; pass stratify='<field>'")
        return name
    if stratify not in ds.fields:
        raise ValueError(f"split: stratify field {stratify!r} not in {ds.fields}")
    return stratify


def split(dataset=None, config="config.yml", seed: int = 0, stratify=None, save: bool = True) -> Splits:
    """Split a dataset by the platform config's ``splitting: {train: 70, valid: 15, test: 15}``
    (percentages that must sum to 100). Seeded; with `stratify` (True or a label field)
    each class is split in the same proportions. Splits are int64 index files
    (split-<name>.npy) named in index.json; records are never copied.
    `dataset` may be a Dataset, a directory, or None (the config's data_path)."""
    cfg = _read_config(config)
    if dataset is None:
        if "data_path" not in cfg:
            raise ValueError("split: no dataset given and the config has no data_path")
        dataset = cfg["data_path"]
    ds = dataset if isinstance(dataset, Dataset) else Dataset(dataset)
    if ds.indices is not None:
        raise ValueError("split: split the whole dataset, not a subset")
    parts = cfg.get("splitting")
    if not isinstance(parts, Mapping) or not parts:
        raise ValueError("split: the config needs 'splitting: {train: 70, valid: 15, test: 15}'")
    for k, v in parts.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise ValueError(f"split: splitting.{k} must be a percentage >= 0, got {v!r}")
        if not isinstance(k, str) or not k.isidentifier():
            raise ValueError(f"split: split name {k!r} must be an identifier")
    total = sum(parts.values())
    if abs(total - 100) > 1e-9:
        raise ValueError(f"split: splitting percentages must sum to 100, got {total} "
                         f"({', '.join(f'{k}={v}' for k, v in parts.items())})")
    names = list(parts)
    fracs = np.array([parts[k] / 100 for k in names])
    rng = np.random.default_rng(seed)
    label = _label_of(ds, stratify)
    n = len(ds)
    order = rng.permutation(n)
    if label is not None:
        # spread every class evenly over the order: sort by (rank within class + 0.5) / class size,
        # so any prefix holds each class in proportion
        y = ds.column(label).reshape(n, -1)[:, 0][order]
        by_class = np.argsort(y, kind="stable")
        _, starts, counts = np.unique(y[by_class], return_index=True, return_counts=True)
        cls = np.searchsorted(np.unique(y), y[by_class])
        key = (np.arange(n) - starts[cls] + 0.5) / counts[cls]
        order = order[by_class][np.argsort(key, kind="stable")]
    # largest-remainder rounding so the counts add up to n
    raw = fracs * n
    cnt = np.floor(raw).astype(np.int64)
    cnt[np.argsort(-(raw - cnt), kind="stable")[:n - cnt.sum()]] += 1
    edges = np.concatenate([[0], np.cumsum(cnt)])
    chosen = {k: [order[edges[i]:edges[i + 1]]] for i, k in enumerate(names)}
    result = {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in chosen.items()}
    if save:
        index = _read_index(ds.path)
        index["splits"] = {}
        for k, idx in result.items():
            fname = f"split-{k}.npy"
            with atomic_path(os.path.join(ds.path, fname)) as tmp, open(tmp, "wb") as f:
                np.save(f, idx)
            index["splits"][k] = fname
        index["split_config"] = {"splitting": dict(parts), "seed": seed, "stratify": label}
        atomic_write_text(os.path.join(ds.path, INDEX_FILE), _index_text(index))
        ds._index = index
    return Splits({k: ds.subset(v) for k, v in result.items()})


def open_split(path: str, name: str) -> Dataset:
    """The split `name` ('train', 'valid', ...) saved by split() for the dataset at `path`."""
    ds = Dataset(path)
    splits = _split_files(ds)
    if name not in splits:
        raise KeyError(f"{path} has no split {name!r}; it has {sorted(splits)} (run aimass.data.split)")
    idx = _load_split(ds, name, splits[name])
    if idx.size and (idx.min() < 0 or idx.max() >= len(ds)):
        raise CorruptDataError(f"split {name!r} ({splits[name]}) holds record numbers outside [0, {len(ds)}); "
                               "run aimass.data.split again")
    return ds.subset(idx)

