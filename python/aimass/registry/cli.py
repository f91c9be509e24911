"""``aimass registry ...``: push, list, show, label, promote, rollback, history, delete, gc, check."""
from __future__ import annotations

import argparse
import json
import sys

_STORE_HELP = ("registry store: a folder, sqlite:///PATH or postgresql://USER@HOST/DB "
               "(default: $AIMASS_REGISTRY, else $AIMASS_HOME/registry)")


class _UserError(Exception):
    pass


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--store", default=None, help=_STORE_HELP)
    p.add_argument("--blobs", default=None,
                   help="blob store: a folder or fsspec URL (s3://, gs://, file://, memory://); "
                        "default $AIMASS_REGISTRY_BLOBS, else beside the metadata")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def _sub(sp, common, name, help_, example, func):
    p = sp.add_parser(name, parents=[common], help=help_, description=help_,
                      epilog="example:\n  " + example, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(func=lambda args, _f=func, _n=name: _run(args, _f, _n))
    return p


def add_cli(subparsers) -> None:
    reg = subparsers.add_parser(
        "registry", help="versioned model store: push, list, show, label, promote, rollback, delete, gc",
        description="Versioned model store with labels and rollback (docs/registry.md).",
        epilog="example:\n  aimass registry push mlp.aimass --name mnist --label canary\n"
               "  aimass registry promote mnist", formatter_class=argparse.RawDescriptionHelpFormatter)
    reg.set_defaults(func=lambda args: (reg.print_help(), 2)[1])
    sp = reg.add_subparsers(dest="registry_command", metavar="COMMAND")
    c = _common()

    p = _sub(sp, c, "push", "store an .aimass file as the next version of a model",
             "aimass registry push mlp.aimass --name mnist --label canary --metrics metrics.json", _push)
    p.add_argument("path", help="the .aimass model file")
    p.add_argument("--name", required=True, help="model name (letters, digits, '.', '_', '-')")
    p.add_argument("--label", help="point this label at the new version (e.g. canary)")
    p.add_argument("--metrics", help="JSON file with an object of metrics, e.g. {\"accuracy\": 0.98}")
    p.add_argument("--source", help="where the model came from (default: the file's path)")
    p.add_argument("--parent", type=int, help="the version this one was derived from")

    _sub(sp, c, "list", "list models with their versions and labels", "aimass registry list --json", _list)

    p = _sub(sp, c, "show", "show one version (default: label 'stable', else the newest), or all",
             "aimass registry show mnist --label canary", _show)
    p.add_argument("name")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--version", type=int, help="this version")
    g.add_argument("--label", help="the version this label points at")
    g.add_argument("--all", action="store_true", help="every version")

    p = _sub(sp, c, "label", "point a label at a version (or remove it)", "aimass registry label mnist canary 3",
             _label)
    p.add_argument("name")
    p.add_argument("label")
    p.add_argument("version", nargs="?", type=int, help="the version (omit with --remove)")
    p.add_argument("--remove", action="store_true", help="remove the label")

    p = _sub(sp, c, "promote", "point one label at another label's version (canary -> stable)",
             "aimass registry promote mnist --from canary --to stable", _promote)
    p.add_argument("name")
    p.add_argument("--from", dest="from_label", default="canary", help="source label (default canary)")
    p.add_argument("--to", dest="to_label", default="stable", help="target label (default stable)")

    p = _sub(sp, c, "rollback", "return a label to its previous version", "aimass registry rollback mnist --label stable",
             _rollback)
    p.add_argument("name")
    p.add_argument("--label", default="stable", help="the label (default stable)")

    p = _sub(sp, c, "history", "every change of a label", "aimass registry history mnist stable", _history)
    p.add_argument("name")
    p.add_argument("label", nargs="?", default="stable")

    p = _sub(sp, c, "delete", "delete a version (refused while a label points at it)",
             "aimass registry delete mnist 2", _delete)
    p.add_argument("name")
    p.add_argument("version", type=int)

    p = _sub(sp, c, "gc", "remove unreferenced blobs and leftovers of killed pushes",
             "aimass registry gc --grace 0   # only when no push is running", _gc)
    p.add_argument("--grace", type=float, default=3600.0,
                   help="only remove files older than this many seconds (default 3600: protects pushes in flight)")
    p.add_argument("--dry-run", action="store_true", help="only say what would be removed")

    p = _sub(sp, c, "check", "check that every version's blob is there (--deep: and matches its sha256)",
             "aimass registry check --deep", _check)
    p.add_argument("--deep", action="store_true", help="re-hash every blob")


def _open(args):
    from . import Registry
    return Registry(args.store, blobs=args.blobs)


def _run(args, func, name) -> int:
    from . import RegistryError
    try:
        result, text, *rc = func(args)
    except _UserError as exc:
        print(f"aimass registry {name}: error: {exc}", file=sys.stderr)
        return 2
    except (RegistryError, ValueError, TypeError, OSError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"aimass registry {name}: error: {msg}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif text:
        print(text)
    return rc[0] if rc else 0


def _push(args):
    metrics = None
    if args.metrics:
        try:
            with open(args.metrics, encoding="utf-8") as f:
                metrics = json.load(f)
        except json.JSONDecodeError as exc:
            raise _UserError(f"--metrics {args.metrics} is not valid JSON: {exc}") from None
        if not isinstance(metrics, dict):
            raise _UserError(f"--metrics {args.metrics} must hold a JSON object, got {type(metrics).__name__}")
    with _open(args) as reg:
        v = reg.push(args.path, args.name, label=args.label, metrics=metrics, source=args.source, parent=args.parent)
        mv = reg.show(args.name, version=v)
    lab = f" (label {args.label})" if args.label else ""
    return mv.to_dict(), f"pushed {args.name} version {v}{lab}, sha256 {mv.sha256[:12]}, {mv.size} bytes"


def _list(args):
    with _open(args) as reg:
        models = reg.list()
    if not models:
        return models, "no models"
    lines = [f"{'NAME':24} {'VERSIONS':>8} {'LATEST':>6}  LABELS"]
    for m in models:
        labs = ", ".join(f"{k}={v}" for k, v in m["labels"].items()) or "-"
        lines.append(f"{m['name']:24} {len(m['versions']):>8} {str(m['latest'] or '-'):>6}  {labs}")
    return models, "\n".join(lines)


def _fmt_version(mv) -> str:
    d = mv.to_dict()
    sig = d.pop("signature")
    lines = [f"{d['name']} version {d['version']}" + (f"  [{', '.join(d['labels'])}]" if d["labels"] else "")]
    for k in ("sha256", "size", "created", "source", "parent", "path"):
        lines.append(f"  {k:10} {d[k]}")
    lines.append(f"  {'metrics':10} {json.dumps(d['metrics'], sort_keys=True)}")
    for io in ("inputs", "outputs"):
        for s in sig.get(io, []):
            lines.append(f"  {io[:-1]:10} {s.get('name')} {s.get('dtype')} {s.get('shape')}")
    return "\n".join(lines)


def _show(args):
    with _open(args) as reg:
        if args.all:
            mvs = reg.versions(args.name)
            return [m.to_dict() for m in mvs], "\n".join(_fmt_version(m) for m in mvs) or "no versions"
        mv = reg.show(args.name, version=args.version, label=args.label)
    return mv.to_dict(), _fmt_version(mv)


def _label(args):
    with _open(args) as reg:
        if args.remove:
            if args.version is not None:
                raise _UserError("give a version or --remove, not both")
            old = reg.remove_label(args.name, args.label)
            return ({"name": args.name, "label": args.label, "version": None, "previous": old},
                    f"{args.name}: label {args.label} removed (was version {old})")
        if args.version is None:
            raise _UserError("give the version to point the label at (or --remove)")
        old = reg.set_label(args.name, args.label, args.version)
    was = f" (was {old})" if old is not None else ""
    return ({"name": args.name, "label": args.label, "version": args.version, "previous": old},
            f"{args.name}: {args.label} -> version {args.version}{was}")


def _promote(args):
    with _open(args) as reg:
        v = reg.promote(args.name, from_label=args.from_label, to_label=args.to_label)
    return ({"name": args.name, "label": args.to_label, "version": v},
            f"{args.name}: {args.to_label} -> version {v} (from {args.from_label})")


def _rollback(args):
    with _open(args) as reg:
        v = reg.rollback(args.name, label=args.label)
    return {"name": args.name, "label": args.label, "version": v}, f"{args.name}: {args.label} rolled back to version {v}"


def _history(args):
    with _open(args) as reg:
        h = reg.label_history(args.name, args.label)
    lines = [f"{e['changed']}  {e['action']:8} {e['previous'] if e['previous'] is not None else '-'} -> "
             f"{e['version'] if e['version'] is not None else '(removed)'}" for e in h]
    return h, "\n".join(lines) or f"label {args.label} of {args.name} was never set"


def _delete(args):
    with _open(args) as reg:
        mv = reg.delete(args.name, args.version)
    return mv.to_dict(), f"deleted {args.name} version {args.version}; 'aimass registry gc' frees its blob"


def _gc(args):
    with _open(args) as reg:
        r = reg.gc(grace_s=args.grace, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    return r, f"{verb} {len(r['removed_blobs'])} blob(s), {len(r['removed_temp'])} temp file(s), {r['bytes_freed']} bytes"


def _check(args):
    with _open(args) as reg:
        problems = reg.check(deep=args.deep)
    return {"problems": problems}, "\n".join(problems) or "ok", 1 if problems else 0
