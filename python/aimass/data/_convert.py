"""Converters (CSV, .npy/.npz, image folders) and clean(): raw data in, records out."""
from __future__ import annotations

import os
from typing import Dict, Mapping, Optional

import numpy as np

from .._array import as_numpy
from ._format import Dataset, write


class CleanReport(dict):
    """What clean() dropped and why: {"input": N, "kept": K, "dropped": {reason: count},
    "dropped_indices": {reason: [indices]}}. Printed by clean()."""

    def __str__(self) -> str:
        lines = [f"clean: {self['input']} records in, {self['kept']} kept, "
                 f"{self['input'] - self['kept']} dropped"]
        for reason, count in self["dropped"].items():
            idx = self["dropped_indices"][reason]
            more = " ..." if len(idx) > 10 else ""
            lines.append(f"  {reason}: {count} (records {idx[:10]}{more})")
        return "\n".join(lines)


def _as_arrays(data) -> Dict[str, np.ndarray]:
    if isinstance(data, Dataset):
        return {name: data.column(name) for name in data.fields}
    if isinstance(data, Mapping):
        out = {}
        for k, v in data.items():
            a, _ = as_numpy(v, f"data[{k!r}]")
            out[k] = a
        return out
    raise TypeError(f"expected a Dataset or a dict of arrays, got {type(data).__name__}")


def clean(data, label: Optional[str] = None, classes=None, out_dir: Optional[str] = None,
          verbose: bool = True, **write_kwargs):
    """Drop rows with NaN values, exact-duplicate records and labels outside `classes`.

    `data` is a dict of arrays or a Dataset; `classes` is an int (labels 0..classes-1)
    or a list of allowed label values. Returns (cleaned dict of arrays, CleanReport),
    or (Dataset, CleanReport) when `out_dir` is given (the cleaned data is written
    there). Nothing is dropped silently: the report lists every dropped index."""
    arrays = _as_arrays(data)
    n = {len(a) for a in arrays.values()}
    if len(n) != 1:
        raise ValueError(f"clean: fields have different record counts {sorted(n)}")
    n = n.pop()
    drop = np.zeros(n, dtype=bool)
    reasons: Dict[str, np.ndarray] = {}
    nan = np.zeros(n, dtype=bool)
    for a in arrays.values():
        if a.dtype.kind == "f":
            nan |= np.isnan(a.reshape(n, -1)).any(axis=1)
    reasons["missing or NaN value"] = nan
    drop |= nan
    if classes is not None:
        if label is None or label not in arrays:
            raise ValueError(f"clean: classes given, so label= must name a field; fields are {list(arrays)}")
        allowed = np.arange(classes) if isinstance(classes, (int, np.integer)) else np.asarray(list(classes))
        bad = ~np.isin(arrays[label].reshape(n, -1)[:, 0], allowed) & ~drop
        reasons[f"label outside classes {allowed.tolist() if allowed.size <= 20 else f'({allowed.size})'}"] = bad
        drop |= bad
    # exact duplicates: identical bytes across every field; the first copy stays
    rows = np.concatenate([np.ascontiguousarray(a).reshape(n, -1).view(np.uint8).reshape(n, -1)
                           for a in arrays.values()], axis=1) if n else np.zeros((0, 1), np.uint8)
    keyed = np.ascontiguousarray(rows).view(np.dtype((np.void, rows.shape[1]))).ravel()
    cand = np.flatnonzero(~drop)
    _, first = np.unique(keyed[cand], return_index=True)
    dup = np.zeros(n, dtype=bool)
    dup[cand] = True
    dup[cand[first]] = False
    reasons["exact duplicate of an earlier record"] = dup
    drop |= dup
    keep = ~drop
    report = CleanReport(input=int(n), kept=int(keep.sum()),
                         dropped={r: int(m.sum()) for r, m in reasons.items()},
                         dropped_indices={r: np.flatnonzero(m).tolist() for r, m in reasons.items()})
    if verbose:
        print(report)
    cleaned = {k: a[keep] for k, a in arrays.items()}
    if out_dir is not None:
        return write(out_dir, cleaned, **write_kwargs), report
    return cleaned, report


# ---------------------------------------------------------------- converters
def from_npy(path: str, out_dir: str, name: str = "x", **write_kwargs) -> Dataset:
    """Convert a .npy file (one field called `name`) or a .npz archive (one field per key)."""
    path = os.fspath(path)
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    elif path.endswith(".npy"):
        arrays = {name: np.load(path, mmap_mode="r", allow_pickle=False)}
    else:
        raise ValueError(f"from_npy: {path} is neither .npy nor .npz")
    return write(out_dir, arrays, **write_kwargs)


def from_csv(path: str, out_dir: str, label: str, delimiter: str = ",", clean_rows: bool = True,
             **write_kwargs) -> Dataset:
    """Convert a CSV with a header row: the `label` column becomes field "label"
    (int64; string labels are mapped to class ids, kept in metadata["classes"]),
    every other column becomes one float32 feature of field "x" [N, F].
    With clean_rows, rows with missing values and exact duplicates are dropped
    and reported (see clean())."""
    # everything as text first: an empty cell must become "missing", never a fill value
    import csv
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r]
    if not rows:
        raise ValueError(f"from_csv: {path} is empty")
    names = [c.strip() for c in rows[0]]
    bad = [i + 2 for i, r in enumerate(rows[1:]) if len(r) != len(names)]
    if bad:
        raise ValueError(f"from_csv: rows {bad[:10]} do not have {len(names)} columns like the header")
    if label not in names:
        raise ValueError(f"from_csv: label column {label!r} not in the header {names}")
    cells = np.char.strip(np.array(rows[1:], dtype=str).reshape(len(rows) - 1, len(names)))
    table = {c: cells[:, j] for j, c in enumerate(names)}
    feats = [c for c in names if c != label]
    if not feats:
        raise ValueError("from_csv: the CSV has no feature columns besides the label")
    x = np.empty((len(cells), len(feats)), dtype=np.float32)
    for j, c in enumerate(feats):
        col = table[c]
        ok = col != ""
        x[:, j] = np.nan
        try:
            x[ok, j] = col[ok].astype(np.float32)
        except ValueError:
            raise ValueError(f"from_csv: column {c!r} is not numeric") from None
    lab = table[label]
    missing = lab == ""
    x[missing, 0] = np.nan  # a missing label makes the row incomplete: clean() drops it
    metadata = {"label_field": "label", "features": feats}
    try:
        y = np.where(missing, "-1", lab).astype(np.int64)
    except ValueError:  # class names: ids in sorted order, names kept in metadata
        classes = np.unique(lab[~missing])
        y = np.searchsorted(classes, lab).astype(np.int64)
        metadata["classes"] = classes.tolist()
    arrays = {"x": x, "label": y}
    if clean_rows:
        arrays, _ = clean(arrays, label="label")
    return write(out_dir, arrays, metadata=metadata, **write_kwargs)


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def from_image_folder(root: str, out_dir: str, size=(64, 64), **write_kwargs) -> Dataset:
    """Convert root/<class>/*.jpg (class = subfolder name, sorted) into fields
    "image" uint8[H, W, 3] (decoded by Pillow, RGB, resized to `size` = (H, W)) and
    "label" int64; metadata["classes"] lists the class names."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("from_image_folder needs Pillow: python -m pip install Pillow") from exc
    root = os.fspath(root)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"from_image_folder: {root} has no class subfolders (expected root/<class>/*.jpg)")
    files, labels = [], []
    for ci, c in enumerate(classes):
        for f in sorted(os.listdir(os.path.join(root, c))):
            if f.lower().endswith(IMAGE_EXTENSIONS):
                files.append(os.path.join(root, c, f))
                labels.append(ci)
    if not files:
        raise ValueError(f"from_image_folder: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    images = np.empty((len(files), h, w, 3), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                images[i] = np.asarray(im.convert("RGB").resize((w, h), Image.BILINEAR))
        except OSError as exc:
            raise ValueError(f"from_image_folder: cannot decode {f}: {exc}") from None
    return write(out_dir, {"image": images, "label": np.asarray(labels, dtype=np.int64)},
                 metadata={"classes": classes, "label_field": "label"}, **write_kwargs)

