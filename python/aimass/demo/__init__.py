"""``aimass demo``: the platform end to end on scikit-learn's digits (aimass.demo.digits);
``aimass demo --kernels``: the synthetic cat/dog pipeline and the quantized-kernel showcase
(aimass.demo.catdog, aimass.demo.kernels)."""
from __future__ import annotations

from .digits import run


def _cmd_demo(args) -> int:
    if args.kernels:
        from . import kernels
        return kernels.main()
    run(out=args.out, quick=args.quick, progress=not args.no_progress)
    return 0


def add_cli(sub) -> None:
    from ..cli import add_command
    p = add_command(sub, "demo", "the whole pipeline on scikit-learn's digits: config, clean, split, train, "
                    "prune, quantize, distill, evaluate, register, serve, report",
                    "aimass demo --out /tmp/demo\nmpirun -np 2 python3 -m aimass demo   # data-parallel training\n"
                    "aimass demo --kernels                  # quantized-kernel showcase", _cmd_demo)
    p.add_argument("--out", help="folder for everything it writes (default AIMASS_HOME/demo)")
    p.add_argument("--quick", action="store_true", help="fewer epochs, no cross-validation (for tests)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--kernels", action="store_true", help="the synthetic pipeline and quantized-kernel showcase")


__all__ = ["run", "add_cli"]
