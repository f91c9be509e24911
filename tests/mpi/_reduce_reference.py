"""The allreduce reference the MPI tests compare against: every rank's input in float64, reduced in
numpy, cast back for integer dtypes (average truncates toward zero, as the engine's integer average)."""
import numpy as np


def reference(ins, op, dtype):
    """ins: the ranks' inputs (a list or a stacked array); op: sum/average/product/min/max."""
    stack = np.stack(ins)
    if dtype == "bool":
        return stack.any(0) if op in ("sum", "max") else stack.all(0)
    s = stack.astype(np.float64)
    if op == "sum":
        ref = s.sum(0)
    elif op == "average":
        ref = s.sum(0) / len(stack)
        if np.dtype(dtype).kind in "iu":
            ref = np.trunc(ref)
    elif op == "product":
        ref = s.prod(0)
    else:
        ref = s.min(0) if op == "min" else s.max(0)
    return ref.astype(dtype) if np.dtype(dtype).kind in "iu" else ref
