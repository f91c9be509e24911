"""The ``aimass`` command."""
from __future__ import annotations

import argparse
import json
import sys


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


def _cmd_demo(args) -> int:
    from . import demo
    return demo.main()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="aimass", description="aimass: train, compress and serve models")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("info", help="what this machine and build support")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("demo", help="quantize, prune and run a quantized linear; prints what it measured")
    p.set_defaults(func=_cmd_demo)
    from .data.cli import add_cli as _data_cli
    _data_cli(sub)
    from .registry.cli import add_cli as _registry_cli
    _registry_cli(sub)
    from .serve.cli import add_cli as _serve_cli
    _serve_cli(sub)
    from .bench.cli import add_cli as _bench_cli
    _bench_cli(sub)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
