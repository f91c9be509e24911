"""Reduction ops and gradient compression with Horovod's names.

``Average``, ``Sum``, ``Min``, ``Max``, ``Product`` are members of :class:`ReduceOp`, a
``str`` enum: ``hvd.Sum == "sum"``, so aimass's string spelling (``op="sum"``) and
Horovod's constants are interchangeable. ``Adasum`` exists so scripts import, but a
collective given it raises NotImplementedError.

``Compression.none`` / ``Compression.fp16`` / ``Compression.bf16`` follow Horovod's
compressor interface (``compress(tensor) -> (tensor, ctx)``, ``decompress(tensor, ctx)``).
For float32 tensors on the engine's path the built-in 16-bit compressors do not cast in
Python: the engine converts while packing the fusion buffer and sums in fp32 per step.
User-defined compressors (any object with compress/decompress) run in Python around the
collective, as in Horovod.
"""
from __future__ import annotations

import enum
from typing import Any, Optional
import warnings


class ReduceOp(str, enum.Enum):
    Average = "average"
    Sum = "sum"
    Min = "min"
    Max = "max"
    Product = "product"
    Adasum = "adasum"

    def __str__(self):
        return self.value


Average = ReduceOp.Average
Sum = ReduceOp.Sum
Min = ReduceOp.Min
Max = ReduceOp.Max
Product = ReduceOp.Product
Adasum = ReduceOp.Adasum

_ALIASES = {"avg": "average", "mean": "average", "prod": "product"}

ADASUM_MESSAGE = ("op=Adasum is not supported by aimass.dist. Use op=Average (the default; with "
                  "DistributedOptimizer the usual learning-rate scaling by size() applies) or op=Sum; "
                  "see docs/horovod.md")


def check_op(op: Any) -> str:
    """The engine's op name for `op` (a ReduceOp or its string); raises for anything else."""
    if isinstance(op, ReduceOp):
        v = op.value
    elif isinstance(op, str):
        v = _ALIASES.get(op, op)
    else:
        raise ValueError(f"op must be one of Average, Sum, Min, Max, Product (or 'average', 'sum', 'min', 'max', "
                         f"'product'), got {op!r}")
    if v == "adasum":
        raise NotImplementedError(ADASUM_MESSAGE)
    if v not in ("average", "sum", "min", "max", "product"):
        raise ValueError(f"op must be one of ('average', 'sum', 'min', 'max', 'product'), got {op!r}")
    return v


def resolve_op(op: Any, average: Any) -> str:
    """Horovod's rule for the deprecated `average` argument; a string there is aimass's old positional op."""
    if isinstance(average, (str, ReduceOp)) and op is None:
        return check_op(average)
    if op is not None and average is not None:
        raise ValueError("The op parameter supersedes average. Please provide only one of them.")
    if average is not None:
        warnings.warn("Parameter `average` has been replaced with `op` and will be removed in a future version",
                      DeprecationWarning, stacklevel=3)
        return "average" if average else "sum"
    return "average" if op is None else check_op(op)


# ------------------------------------------------------------------ compression

class Compressor:
    """Interface for compressing and decompressing a tensor (Horovod's ``hvd.compression.Compressor``)."""

    wire: Optional[str] = None  # engine wire type for float32 tensors (aimass's built-ins only)

    @staticmethod
    def compress(tensor):
        """Returns (compressed tensor, context needed by decompress)."""
        raise NotImplementedError

    @staticmethod
    def decompress(tensor, ctx):
        raise NotImplementedError


class NoneCompressor(Compressor):
    """No compression."""

    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


def _cast_compress(tensor, target: str):
    import torch
    dt = getattr(torch, target)
    if tensor.dtype.is_floating_point and tensor.dtype != dt:
        return tensor.to(dt), tensor.dtype
    return tensor, None


def _cast_decompress(tensor, ctx):
    return tensor if ctx is None else tensor.to(ctx)


class _CastCompressor(Compressor):
    """Floats travel as `target` (float32 on the engine's path: converted by the engine, summed in fp32)."""
    target = ""

    @classmethod
    def compress(cls, tensor):
        return _cast_compress(tensor, cls.target)

    @staticmethod
    def decompress(tensor, ctx):
        return _cast_decompress(tensor, ctx)


class FP16Compressor(_CastCompressor):
    """Floats travel as float16."""
    wire, target = "fp16", "float16"


class BF16Compressor(_CastCompressor):
    """Floats travel as bfloat16 (aimass extra; float32 range, 8-bit mantissa)."""
    wire, target = "bf16", "bfloat16"


class Compression:
    """Optional gradient compression used during allreduce (Horovod's ``hvd.Compression``)."""
    none = NoneCompressor
    fp16 = FP16Compressor
    bf16 = BF16Compressor


_LEGACY = {None: Compression.none, "none": Compression.none, "fp16": Compression.fp16,
           "float16": Compression.fp16, "bf16": Compression.bf16, "bfloat16": Compression.bf16}


def check_compression(c: Any):
    """A compressor for `c`: a Compressor (class or instance), or aimass's strings None/'fp16'/'bf16'."""
    if isinstance(c, str) or c is None:
        if c not in _LEGACY:
            raise ValueError(f"compression must be None, 'fp16' or 'bf16' (or a Compression member), got {c!r}")
        return _LEGACY[c]
    if callable(getattr(c, "compress", None)) and callable(getattr(c, "decompress", None)):
        return c
    raise ValueError(f"compression must be Compression.none/.fp16/.bf16 or an object with compress() and "
                     f"decompress(), got {c!r}")
