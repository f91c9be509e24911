"""Pruning masks (True = keep): unstructured magnitude, N:M semi-structured, and
whole output channels. Rules (docs/numerics.md):

* magnitude: removes floor(sparsity * numel) elements with the smallest |w|; among
  equal |w| the lower flat index is kept.
* n:m: in every m consecutive elements along the last dimension, keeps the n with the
  largest |w|; ties go to the lower index. `sparsity` is not used (it is 1 - n/m).
* channel: removes floor(sparsity * rows) output rows (index 0 of the weight) with the
  smallest L2 norm; ties keep the lower row.

All selection is vectorised numpy (a loop over the m positions of a group, never over
elements).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .. import _array

__all__ = ["prune_mask", "prune_channels", "prune_model", "ChannelPruneResult"]

_METHODS = ("magnitude", "n:m", "channel")


def _check_sparsity(sparsity: Any) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float, np.floating)):
        raise TypeError(f"sparsity must be a float in [0, 1), got {type(sparsity).__name__}")
    s = float(sparsity)
    if not 0.0 <= s < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r} (1.0 would remove everything)")
    return s


def _check_nm(n: Any, m: Any) -> Tuple[int, int]:
    for name, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    n, m = int(n), int(m)
    if m < 1 or n < 1:
        raise ValueError(f"n and m must be >= 1, got n={n}, m={m}")
    if n > m:
        raise ValueError(f"n={n} > m={m}: n:m keeps n of every m elements, so n must be <= m")
    return n, m


def _weights(w: Any, name: str = "w") -> np.ndarray:
    a, dt = _array.as_numpy(w, name)
    if dt not in _array.FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dt}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous; call .contiguous() (torch) or np.ascontiguousarray() first")
    if a.ndim == 0:
        raise ValueError(f"{name} must have rank >= 1, got a scalar")
    if a.size == 0:
        raise ValueError(f"{name} has no elements (shape {a.shape})")
    x = _array.float32_array(w, name)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains NaN or Inf; pruning needs finite weights")
    return x


def _keep_largest(score: np.ndarray, keep: int) -> np.ndarray:
    """Boolean mask keeping the `keep` largest entries of 1-D `score`; ties keep lower indices. O(n)."""
    total = score.size
    if keep >= total:
        return np.ones(total, dtype=bool)
    if keep <= 0:
        return np.zeros(total, dtype=bool)
    t = np.partition(score, total - keep)[total - keep]  # the smallest kept value
    mask = score > t
    need = keep - int(mask.sum())
    ties = np.flatnonzero(score == t)[:need]
    mask[ties] = True
    return mask


def _nm_mask(a: np.ndarray, n: int, m: int) -> np.ndarray:
    """a: |w| as [groups, m]; rank_i = #(a_j > a_i) + #(a_j == a_i, j < i); keep rank < n."""
    idx = np.arange(m)
    rank = np.zeros(a.shape, dtype=np.int32)
    for j in range(m):  # m positions, each a vectorised pass over all groups
        aj = a[:, j:j + 1]
        rank += (aj > a) | ((aj == a) & (j < idx)[None, :])
    return rank < n


def _mask(x: np.ndarray, method: str, sparsity: float, n: int, m: int) -> np.ndarray:
    if method == "magnitude":
        keep = x.size - int(np.floor(sparsity * x.size))
        return _keep_largest(np.abs(x).reshape(-1), keep).reshape(x.shape)
    if method == "n:m":
        if x.shape[-1] % m:
            raise ValueError(f"n:m needs the last dimension of w ({x.shape[-1]}) to be a multiple of m={m}")
        return _nm_mask(np.abs(x).reshape(-1, m), n, m).reshape(x.shape)
    rows = x.shape[0]
    norms = np.sqrt(np.sum(np.square(x.reshape(rows, -1), dtype=np.float64), axis=1))
    keep_rows = _keep_largest(norms, rows - int(np.floor(sparsity * rows)))
    return np.broadcast_to(keep_rows.reshape((rows,) + (1,) * (x.ndim - 1)), x.shape).copy()


def _check_method(method: Any) -> str:
    if not isinstance(method, str) or method not in _METHODS:
        raise ValueError(f"method must be one of 'magnitude', 'n:m', 'channel'; got {method!r}")
    return method


def prune_mask(w: Any, method: str = "magnitude", sparsity: float = 0.5, n: int = 2, m: int = 4) -> np.ndarray:
    """Boolean numpy mask of w's shape, True = keep. See the module doc for the exact rules."""
    _check_method(method)
    sparsity = _check_sparsity(sparsity)
    n, m = _check_nm(n, m)
    return _mask(_weights(w), method, sparsity, n, m)


@dataclass
class ChannelPruneResult:
    """weight: the kept rows (same kind and dtype as the input); kept_indices: their
    original row numbers (int64, ascending); shape / original_shape."""
    weight: Any
    kept_indices: np.ndarray
    shape: Tuple[int, ...]
    original_shape: Tuple[int, ...]


def prune_channels(w: Any, sparsity: float = 0.5) -> ChannelPruneResult:
    """Remove whole output rows (axis 0) with the smallest L2 norm; returns the smaller weight."""
    sparsity = _check_sparsity(sparsity)
    x = _weights(w)
    keep = _mask(x, "channel", sparsity, 1, 1).reshape(x.shape[0], -1)[:, 0]
    kept = np.flatnonzero(keep).astype(np.int64)
    if _array.is_torch(w):
        import torch
        out = w.detach()[torch.from_numpy(kept)]
    else:
        a, _ = _array.as_numpy(w, "w")
        out = a[kept]
    return ChannelPruneResult(weight=out, kept_indices=kept, shape=tuple(int(s) for s in out.shape),
                              original_shape=tuple(int(s) for s in x.shape))


def _layers(module) -> Dict[str, Any]:
    import torch
    out = {}
    for name, mod in module.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and mod.weight is not None:
            out[name or type(mod).__name__] = mod
    return out


def _layer_weights(mod) -> np.ndarray:
    """The weight as fp32 numpy in the orientation the mask is computed in: Linear [out, in];
    Conv2d [out, kh, kw, in] so that n:m groups run along input channels (as NVIDIA ASP does)."""
    import torch
    w = mod.weight.detach()
    if isinstance(mod, torch.nn.Conv2d):
        w = w.permute(0, 2, 3, 1)
    return _array.float32_array(w.contiguous().float().cpu(), "weight")


def _apply(mod, mask: np.ndarray) -> None:
    import torch
    t = torch.from_numpy(mask)
    if isinstance(mod, torch.nn.Conv2d):
        t = t.permute(0, 3, 1, 2)
    with torch.no_grad():
        mod.weight.mul_(t.to(device=mod.weight.device, dtype=mod.weight.dtype))


def prune_model(module: Any, method: str = "magnitude", sparsity: float = 0.5, scope: Optional[str] = None,
                n: int = 2, m: int = 4) -> Dict[str, Any]:
    """Zero pruned weights of every torch nn.Linear / nn.Conv2d in `module`, in place.

    scope: 'global' (magnitude only, the default for it: one threshold over all layers'
    |w|, ties kept in layer order then index) or 'layer' (each layer pruned to `sparsity`;
    the only choice, and the default, for 'n:m' and 'channel'). Channel pruning zeroes rows
    (shapes stay, so the model still runs; use prune_channels to shrink a weight).
    Returns {"method", "scope", "sparsity", "kept_fraction", "layers": {name: {"shape",
    "kept_fraction", "kept", "numel"}}}.
    """
    try:
        import torch
    except ImportError:  # pragma: no cover
        raise TypeError("prune_model needs torch (module must be a torch.nn.Module)") from None
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    _check_method(method)
    sparsity = _check_sparsity(sparsity)
    n, m = _check_nm(n, m)
    if scope is None:
        scope = "global" if method == "magnitude" else "layer"
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    if scope == "global" and method != "magnitude":
        raise ValueError(f"scope='global' applies to method='magnitude' only; {method!r} prunes each layer "
                         "on its own (use scope='layer')")
    layers = _layers(module)
    if not layers:
        raise ValueError("module has no nn.Linear or nn.Conv2d layers to prune")
    weights = {}
    for name, mod in layers.items():
        x = _layer_weights(mod)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"weight of layer {name!r} contains NaN or Inf")
        weights[name] = x
    masks = {}
    if scope == "global":
        scores = np.concatenate([np.abs(x).reshape(-1) for x in weights.values()])
        keep = scores.size - int(np.floor(sparsity * scores.size))
        flat = _keep_largest(scores, keep)
        off = 0
        for name, x in weights.items():
            masks[name] = flat[off:off + x.size].reshape(x.shape)
            off += x.size
    else:
        for name, x in weights.items():
            if method == "n:m" and x.shape[-1] % m:
                raise ValueError(f"layer {name!r}: its input dimension ({x.shape[-1]}) is not a multiple of m={m}")
            masks[name] = _mask(x, method, sparsity, n, m)
    report_layers = {}
    total_kept = total = 0
    for name, mod in layers.items():
        mk = masks[name]
        _apply(mod, mk)
        kept = int(mk.sum())
        report_layers[name] = {"shape": tuple(int(s) for s in mod.weight.shape), "kept_fraction": kept / mk.size,
                               "kept": kept, "numel": int(mk.size)}
        total_kept += kept
        total += mk.size
    return {"method": method, "scope": scope, "sparsity": sparsity, "kept_fraction": total_kept / total,
            "layers": report_layers}
