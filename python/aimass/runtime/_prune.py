"""prune= for aimass.runtime.export: prune a copy of the module with aimass.compress before
tracing (the caller's module is never modified).

    {"method": "magnitude", "sparsity": 0.5, "scope": "global" | "layer"}
    {"method": "n:m", "n": 2, "m": 4}
    {"method": "channel", "sparsity": 0.25}

magnitude and n:m zero weights of every nn.Linear / nn.Conv2d (aimass.compress.prune_model);
shapes stay. channel removes output rows of hidden nn.Linear layers and the matching input
columns of the next nn.Linear, so both layers really shrink. It supports chains
Linear -> [elementwise activations / dropout] -> Linear where the first Linear's output has no
other reader; the Linear layers that produce model outputs keep their rows. A pruned row's
output is the constant act(bias); its contribution to the next layer is folded into that
layer's bias, so the exported model equals torch on the module with the pruned rows zeroed.
"""
from __future__ import annotations

import copy
import operator
from typing import Any, Dict, List, Tuple

import numpy as np

_KEYS = {"method", "sparsity", "n", "m", "scope"}
_SUPPORTED_CHAIN = "Linear -> [ReLU/GELU/SiLU/Sigmoid/Tanh/Dropout/Identity] -> Linear"


def check_spec(prune: Any) -> Dict[str, Any]:
    """Validates a prune= dict and fills the defaults (sparsity 0.5, n=2, m=4)."""
    from ..compress.prune import _check_method, _check_nm, _check_sparsity

    if not isinstance(prune, dict):
        raise TypeError(f"export: prune must be None or a dict like {{'method': 'magnitude', 'sparsity': 0.5}}, "
                        f"got {type(prune).__name__}")
    unknown = set(prune) - _KEYS
    if unknown:
        raise ValueError(f"export: unknown prune keys {sorted(unknown)}; allowed: {sorted(_KEYS)}")
    if "method" not in prune:
        raise ValueError("export: prune needs 'method': 'magnitude', 'n:m' or 'channel'")
    spec = {"method": _check_method(prune["method"]), "sparsity": _check_sparsity(prune.get("sparsity", 0.5))}
    spec["n"], spec["m"] = _check_nm(prune.get("n", 2), prune.get("m", 4))
    if spec["method"] == "magnitude":
        spec["scope"] = prune.get("scope", "global")
    elif prune.get("scope", "layer") != "layer":
        raise ValueError(f"export: prune method {spec['method']!r} prunes each layer on its own; scope must be "
                         "'layer' (or left out)")
    if spec["method"] != "n:m" and ("n" in prune or "m" in prune):
        raise ValueError("export: prune keys 'n' and 'm' apply to method 'n:m' only")
    return spec


def pruned_copy(module, spec: Dict[str, Any]) -> Tuple[Any, Dict[str, Any]]:
    """(pruned deep copy of module, report). The report is what export stores as metadata."""
    from ..compress.prune import prune_model

    mod = copy.deepcopy(module).eval()
    if spec["method"] in ("magnitude", "n:m"):
        rep = prune_model(mod, spec["method"], spec["sparsity"], scope=spec.get("scope"), n=spec["n"], m=spec["m"])
        report = {k: rep[k] for k in ("method", "scope", "sparsity", "kept_fraction")}
        if spec["method"] == "n:m":
            report.update(n=spec["n"], m=spec["m"])
        return mod, report
    return _channel_prune(mod, spec["sparsity"])


def _elementwise(node, modules) -> bool:
    import torch
    from torch import nn

    F = torch.nn.functional
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Dropout,
                                                 nn.Identity))
    if node.op == "call_function":
        return node.target in (torch.relu, F.relu, F.gelu, F.silu, torch.sigmoid, torch.tanh, F.dropout)
    if node.op == "call_method":
        return node.target in ("relu", "sigmoid", "tanh")
    return False


def _apply_chain(chain, modules, z):
    """Runs the elementwise chain on tensor z (the constant output of pruned rows)."""
    for node in chain:
        if node.op == "call_module":
            z = modules[node.target](z)
        elif node.op == "call_function":
            z = node.target(z, *node.args[1:], **node.kwargs)
        else:
            z = getattr(z, node.target)(*node.args[1:], **node.kwargs)
    return z


def _channel_prune(mod, sparsity: float):
    import torch
    import torch.fx
    from torch import nn

    from ..compress.prune import prune_mask

    try:
        gm = torch.fx.symbolic_trace(mod)
    except Exception as exc:
        raise ValueError(f"export: channel pruning needs a torch.fx-traceable module ({exc})") from exc
    modules = dict(gm.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    if convs:
        raise ValueError(f"export: prune method 'channel' supports nn.Linear chains ({_SUPPORTED_CHAIN}); the module "
                         f"has Conv2d layer {convs[0]!r}. Use method 'magnitude' or 'n:m' for conv models")
    calls: Dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.Linear):
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs: List[Tuple[str, list, str]] = []  # (linear, elementwise chain, next linear)
    for node in gm.graph.nodes:
        if not (node.op == "call_module" and isinstance(modules[node.target], nn.Linear)):
            continue
        if calls[node.target] > 1:
            raise ValueError(f"export: channel pruning: Linear {node.target!r} is called {calls[node.target]} times; "
                             "a shared layer cannot be shrunk")
        chain, cur = [], node
        while len(cur.users) == 1:
            user = next(iter(cur.users))
            if user.op == "output":
                break
            if _elementwise(user, modules) and user.args and user.args[0] is cur:
                chain.append(user)
                cur = user
                continue
            if (user.op == "call_module" and isinstance(modules[user.target], nn.Linear)
                    and user.args and user.args[0] is cur):
                pairs.append((node.target, chain, user.target))
                cur = None
            break
        if cur is None:
            continue
        # No next Linear: fine only when this Linear's value reaches nothing but the model output.
        if all(u.op == "output" for u in cur.users):
            continue
        readers = ", ".join(f"{u.op} {u.target if isinstance(u.target, str) else getattr(u.target, '__name__', u.target)}"
                            for u in cur.users)
        raise ValueError(f"export: channel pruning supports {_SUPPORTED_CHAIN} (the next Linear's inputs shrink); "
                         f"the output of Linear {node.target!r} is read by {readers}. Use method 'magnitude' or "
                         "'n:m', or aimass.compress.prune_model(method='channel') (zeroed rows, shapes kept)")
    if not pairs:
        raise ValueError(f"export: channel pruning found no {_SUPPORTED_CHAIN} chain to shrink")
    # Masks on the original weights, rows zeroed first (the reference module), then shrink in order.
    keep = {}
    with torch.no_grad():
        for a, _, _ in pairs:
            lin = modules[a]
            keep[a] = torch.from_numpy(prune_mask(lin.weight.detach().float().cpu(), "channel", sparsity)[:, 0])
            lin.weight.mul_(keep[a].to(lin.weight.dtype)[:, None])
        layers = {}
        for a, chain, b in pairs:
            la, lb = modules[a], modules[b]
            k = keep[a]
            gone = ~k
            if bool(gone.any()):
                const = torch.zeros(1, la.out_features, dtype=la.weight.dtype)
                if la.bias is not None:
                    const[0] = la.bias
                const = _apply_chain(chain, modules, const)[0]
                fold = lb.weight[:, gone] @ const[gone]
                if lb.bias is None:
                    lb.bias = nn.Parameter(torch.zeros(lb.out_features, dtype=lb.weight.dtype))
                lb.bias.add_(fold)
            la.weight = nn.Parameter(la.weight[k].clone())
            if la.bias is not None:
                la.bias = nn.Parameter(la.bias[k].clone())
            la.out_features = int(k.sum())
            lb.weight = nn.Parameter(lb.weight[:, k].clone())
            lb.in_features = int(k.sum())
            layers[a] = {"kept": int(k.sum()), "rows": int(k.numel())}
    kept = sum(v["kept"] for v in layers.values())
    total = sum(v["rows"] for v in layers.values())
    report = {"method": "channel", "scope": "layer", "sparsity": sparsity, "kept_fraction": kept / total,
              "layers": layers}
    return mod, report
