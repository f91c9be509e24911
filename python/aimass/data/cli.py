"""``aimass data convert|clean|split|inspect``: thin wrappers over aimass.data.

Each command prints what it did (JSON for inspect). A damaged dataset exits 1
with one ``CORRUPT: ...`` line; any other user error exits 2 with one
``error: ...`` line."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from ._convert import clean, from_csv, from_image_folder, from_npy
from ._format import CorruptDataError, Dataset, inspect
from ._split import split

_USER_ERRORS = (OSError, ValueError, TypeError, KeyError, ImportError)  # OSError: missing files, permissions


def _run(fn, args) -> int:
    """Call fn(args); user errors become one line on stderr and an exit status."""
    try:
        return fn(args)
    except CorruptDataError as exc:
        print(f"CORRUPT: {exc}", file=sys.stderr)
        return 1
    except _USER_ERRORS as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2


def _write_kwargs(args) -> dict:
    kw = {"overwrite": args.overwrite}
    if args.shard_mb is not None:
        if args.shard_mb <= 0:
            raise ValueError(f"--shard-mb must be > 0, got {args.shard_mb}")
        kw["shard_bytes"] = max(1, int(args.shard_mb * (1 << 20)))
    return kw


def _summary(ds: Dataset) -> dict:
    return {"path": ds.path, "records": len(ds), "shards": len(ds.shards), "schema": ds.schema}


# ---------------------------------------------------------------- convert
def _convert_kind(src: str, kind: str) -> str:
    if kind != "auto":
        return kind
    if os.path.isdir(src):
        return "images"
    low = src.lower()
    if low.endswith((".csv", ".tsv")):
        return "csv"
    if low.endswith((".npy", ".npz")):
        return "npy"
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src} does not exist")
    raise ValueError(f"cannot tell what {src} is from its name: give --from csv|npy|images")


def _cmd_convert(args) -> int:
    kind = _convert_kind(args.src, args.kind)
    if not os.path.exists(args.src):
        raise FileNotFoundError(f"{args.src} does not exist")
    kw = _write_kwargs(args)
    with contextlib.redirect_stdout(sys.stderr):  # clean()'s report goes to stderr; stdout is the JSON
        ds = _convert(args, kind, kw)
    print(json.dumps(_summary(ds), indent=2))
    return 0


def _convert(args, kind: str, kw: dict) -> Dataset:
    if kind == "csv":
        if not args.label:
            raise ValueError("converting a CSV needs --label COLUMN (the column that holds the class)")
        delim = args.delimiter or ("\t" if args.src.lower().endswith(".tsv") else ",")
        ds = from_csv(args.src, args.out, label=args.label, delimiter=delim, clean_rows=not args.no_clean, **kw)
    elif kind == "npy":
        ds = from_npy(args.src, args.out, name=args.name, **kw)
    else:
        size = tuple(args.size) if args.size else (64, 64)
        if any(s <= 0 for s in size):
            raise ValueError(f"--size must be two positive numbers H W, got {list(size)}")
        ds = from_image_folder(args.src, args.out, size=size, **kw)
    return ds


# ---------------------------------------------------------------- clean
def _parse_classes(text):
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--classes must be a count (e.g. 10) or a comma list of label values "
                         f"(e.g. 0,1,5), got {text!r}") from None
    if len(vals) == 1:
        if vals[0] <= 0:
            raise ValueError(f"--classes count must be > 0, got {vals[0]}")
        return vals[0]
    return vals


def _cmd_clean(args) -> int:
    if os.path.abspath(args.src) == os.path.abspath(args.out):
        raise ValueError("clean writes a new dataset: OUT must differ from SRC")
    ds = Dataset(args.src)
    label = args.label
    classes = _parse_classes(args.classes)
    if classes is not None and label is None:
        label = ds.metadata.get("label_field") or ("label" if "label" in ds.fields else None)
        if label is None:
            raise ValueError("--classes needs --label FIELD: the dataset names no label field")
    out, report = clean(ds, label=label, classes=classes, out_dir=args.out, verbose=False,
                        metadata=ds.metadata, **_write_kwargs(args))
    print(report, file=sys.stderr)
    print(json.dumps({**_summary(out), "dropped": report["dropped"]}, indent=2))
    return 0


# ---------------------------------------------------------------- split
def _parse_ratios(text: str) -> dict:
    """'70,15,15' (train, valid, test), 'train=80,test=20' or fractions summing to 1."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    names, vals = [], []
    for i, p in enumerate(parts):
        if "=" in p:
            k, v = p.split("=", 1)
            names.append(k.strip())
        else:
            if i >= 3:
                raise ValueError(f"--ratios {text!r}: more than 3 unnamed parts; name them (train=..,valid=..)")
            names.append(("train", "valid", "test")[i])
            v = p
        try:
            vals.append(float(v))
        except ValueError:
            raise ValueError(f"--ratios {text!r}: {v!r} is not a number") from None
    if not parts:
        raise ValueError("--ratios is empty; e.g. --ratios 70,15,15")
    if len(set(names)) != len(names):
        raise ValueError(f"--ratios {text!r} names a split twice")
    if abs(sum(vals) - 1.0) < 1e-9:  # fractions
        vals = [v * 100 for v in vals]
    return {k: (int(v) if float(v).is_integer() else v) for k, v in zip(names, vals)}


def _cmd_split(args) -> int:
    if args.ratios and args.config:
        raise ValueError("give --ratios or --config, not both")
    if args.ratios:
        config = {"splitting": _parse_ratios(args.ratios)}
    else:
        config = args.config or "config.yml"
        if not os.path.isfile(config):
            raise FileNotFoundError(f"config file {config} does not exist; give --ratios 70,15,15 or "
                                    "--config FILE with 'splitting: {train: 70, valid: 15, test: 15}'")
    stratify = args.stratify
    if stratify == "":
        stratify = True
    s = split(args.dir, config=config, seed=args.seed, stratify=stratify)
    print(json.dumps({"path": os.path.abspath(args.dir), "splits": {k: len(v) for k, v in s.items()}}, indent=2))
    return 0


# ---------------------------------------------------------------- inspect
def _cmd_inspect(args) -> int:
    info = inspect(args.dir, verify=not args.no_verify)
    print(json.dumps(info, indent=2))
    return 0


def _parser(dsub, name, help_text, example):
    return dsub.add_parser(name, help=help_text, description=help_text, epilog="example:\n  " + example,
                           formatter_class=argparse.RawDescriptionHelpFormatter)


def _write_options(q) -> None:
    q.add_argument("--shard-mb", type=float, default=None, help="target shard size in MiB (default 64)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def add_cli(sub) -> None:
    """Registers ``aimass data ...`` on the CLI's subparsers."""
    p = sub.add_parser("data", help="convert, clean, split and inspect datasets")
    dsub = p.add_subparsers(dest="data_command")

    q = _parser(dsub, "convert", "convert a CSV, a .npy/.npz file or an image folder (root/<class>/*.jpg) "
                "into a record dataset", "aimass data convert iris.csv data/iris --label species")
    q.add_argument("src", help="a .csv/.tsv file, a .npy/.npz file, or a folder of class subfolders")
    q.add_argument("out", help="dataset directory to write")
    q.add_argument("--from", dest="kind", choices=("auto", "csv", "npy", "images"), default="auto",
                   help="what SRC is (default: from its name)")
    q.add_argument("--label", help="CSV: the label column")
    q.add_argument("--delimiter", help="CSV: the delimiter (default ',' or tab for .tsv)")
    q.add_argument("--no-clean", action="store_true", help="CSV: keep rows with missing values and duplicates")
    q.add_argument("--name", default="x", help=".npy: the field name (default x)")
    q.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="images: resize to H W (default 64 64)")
    _write_options(q)
    q.set_defaults(func=lambda a: _run(_cmd_convert, a))

    q = _parser(dsub, "clean", "drop records with NaN values, exact duplicates and labels outside --classes; "
                "writes a new dataset and reports every drop", "aimass data clean data/raw data/clean --classes 10")
    q.add_argument("src", help="dataset directory to read")
    q.add_argument("out", help="dataset directory to write")
    q.add_argument("--label", help="label field (default: the dataset's label field)")
    q.add_argument("--classes", help="a class count (labels 0..N-1) or a comma list of allowed labels")
    _write_options(q)
    q.set_defaults(func=lambda a: _run(_cmd_clean, a))

    q = _parser(dsub, "split", "seeded train/valid/test split stored with the dataset (records not copied)",
                "aimass data split data/iris --ratios 70,15,15 --stratify\n"
                "  aimass data split data/iris --config config.yml   # splitting: {train: 70, valid: 15, test: 15}")
    q.add_argument("dir", help="dataset directory")
    q.add_argument("--ratios", help="percentages '70,15,15' (train, valid, test), 'train=80,test=20', "
                   "or fractions summing to 1")
    q.add_argument("--config", help="a config.yml with 'splitting: {train: 70, valid: 15, test: 15}' "
                   "(default ./config.yml when --ratios is not given)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--stratify", nargs="?", const="", default=None, metavar="FIELD",
                   help="keep class proportions in every split (FIELD defaults to the label field)")
    q.set_defaults(func=lambda a: _run(_cmd_split, a))

    q = _parser(dsub, "inspect", "schema, counts, class balance; verifies every checksum",
                "aimass data inspect data/iris")
    q.add_argument("dir")
    q.add_argument("--no-verify", action="store_true", help="skip the checksum pass")
    q.set_defaults(func=lambda a: _run(_cmd_inspect, a))
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])
