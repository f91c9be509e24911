"""Datasets as sharded, checksummed record files, and a native multi-threaded loader.

    aimass.data.write("ds", {"image": X, "label": y})      # X: uint8[N,32,32,3], y: int64[N]
    ds = aimass.data.open("ds")                             # len(ds), ds[i] -> {"image": ..., "label": ...}
    for batch in aimass.data.Loader(ds, 256, seed=0):       # dict of numpy views (or torch tensors)
        ...

The byte layout is in docs/format.md. Records are read through memory maps by C++
worker threads that check each record's CRC32C, apply fused transforms and fill
batch buffers from a reusable pool; batches reach Python as zero-copy views.

Modules: _format (write/open/Dataset/inspect), _transforms, _loader, _convert
(clean and converters), _split, cli (`aimass data ...`). This file only re-exports.
"""
from __future__ import annotations

from ._format import (CorruptDataError, Dataset, FORMAT_NAME, FORMAT_VERSION, INDEX_FILE, crc32c, inspect,
                      open, write)
from ._transforms import CFunc, Cast, Normalize, OneHot, RandomCrop, RandomHorizontalFlip
from ._loader import Loader
from ._convert import CleanReport, IMAGE_EXTENSIONS, clean, from_csv, from_image_folder, from_npy
from ._split import Splits, open_split, split
from .cli import add_cli

__all__ = [
    "write", "open", "Dataset", "Loader", "CorruptDataError", "crc32c",
    "Cast", "Normalize", "RandomCrop", "RandomHorizontalFlip", "OneHot", "CFunc",
    "clean", "CleanReport", "from_csv", "from_npy", "from_image_folder", "split", "Splits", "open_split",
    "inspect",
]
