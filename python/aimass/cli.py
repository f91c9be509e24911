"""The ``aimass`` command: assembles each area's ``add_cli(subparsers)``.

Every subcommand has an example in its --help. A user error (bad config, missing
file, wrong value) prints one line ``aimass <command>: error: ...`` and exits 2;
``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import sys


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) and examples kept as written in --help."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*a, **kw)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def add_command(sub, name: str, help: str, example: str, func=None, description: str = None):
    """Register `aimass <name>`; `example` is shown under --help. Returns the subparser."""
    p = sub.add_parser(name, help=help, description=description or help,
                       epilog="example:\n  " + example.strip().replace("\n", "\n  "))
    if func is not None:
        p.set_defaults(func=func)
    return p


def _cmd_info(args) -> int:
    import aimass
    from . import cuda

    info = {
        "version": aimass.__version__,
        "cpu_features": aimass.cpu_features(),
        "num_threads": aimass.num_threads(),
        "cuda_built": cuda.built(),
        "cuda_available": cuda.is_available(),
    }
    print(json.dumps(info, indent=2))
    return 0


def _user_errors():
    import aimass
    from .config import ConfigError
    return (ConfigError, ValueError, TypeError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError, ConnectionError, aimass.CorruptDataError, aimass.DistributedError)


_EXAMPLES = {
    "data": "aimass data convert iris.csv data/iris --label species\n"
            "aimass data split data/iris --ratios 70,15,15 --stratify",
    "serve": "aimass serve --store ~/.aimass/registry --port 8000 --tokens tokens.yml\n"
             "curl -H 'Authorization: Bearer $TOKEN' localhost:8000/v2/models/digits",
    "serve-token": "aimass serve-token --name ci --scopes infer,metrics   # the token, and its tokens.yml entry",
}


def build_parser() -> Parser:
    parser = Parser(prog="aimass", description="aimass: collect, train, compress, evaluate and serve models",
                    epilog="example:\n  aimass demo            # the whole pipeline on scikit-learn's digits\n"
                           "  aimass train config.yml --help")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_command(sub, "info", "what this machine and build support", "aimass info", _cmd_info)
    from .data.cli import add_cli as data_cli
    data_cli(sub)
    from .train.cli import add_cli as train_cli
    train_cli(sub)
    from .eval.cli import add_cli as eval_cli
    eval_cli(sub)
    from .compress.cli import add_cli as compress_cli
    compress_cli(sub)
    from .demo import add_cli as demo_cli
    demo_cli(sub)
    from .registry.cli import add_cli as registry_cli
    registry_cli(sub)
    from .serve.cli import add_cli as serve_cli
    serve_cli(sub)
    from .bench.cli import add_cli as bench_cli
    bench_cli(sub)
    for name, p in sub.choices.items():  # an area that registered no example gets one here
        if not (p.epilog or "").startswith("example") and name in _EXAMPLES:
            p.epilog = "example:\n  " + _EXAMPLES[name].replace("\n", "\n  ")
            p.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.debug:
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"aimass {args.command}: interrupted", file=sys.stderr)
        return 130
    except _user_errors() as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        msg = " ".join(str(msg).split())  # one line
        print(f"aimass {args.command}: error: {msg} (--debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
