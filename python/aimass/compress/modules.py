"""torch integration: swap nn.Linear layers for QuantizedLinear, which runs the
engine's fused quantized kernels (inference only)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import _C
from .qlinear import PackedLinear, _check_options, linear, pack_linear, quantize_weight


class QuantizedLinear(nn.Module):
    """Drop-in inference replacement for nn.Linear with symmetric int8 (per-channel)
    or int4 (grouped) weights. The quantized weight lives in buffers (``qweight``,
    ``qscale``) so state_dict round-trips; it is prepacked on first use. forward runs
    under no_grad semantics and returns x's dtype (computed in fp32). ``kernel`` and
    ``activation_precision`` are those of :func:`aimass.compress.linear`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 8,
                 group_size: Optional[int] = None, kernel: str = "auto", activation_precision: str = "int16"):
        super().__init__()
        _check_options(kernel, activation_precision)
        if bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, got {bits!r}")
        g = int(group_size or 0)
        if g and in_features % g:
            raise ValueError(f"group_size={g} must divide in_features={in_features}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, g
        self.kernel = kernel
        self.activation_precision = activation_precision
        nbytes = out_features * in_features if bits == 8 else (out_features * in_features + 1) // 2
        wshape = (out_features, in_features) if bits == 8 else (nbytes,)
        self.register_buffer("qweight", torch.zeros(wshape, dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("qscale", torch.ones((out_features, in_features // g) if g else (out_features,)))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features))
        else:
            self.bias = None
        self._packed: Optional[PackedLinear] = None
        self._fast = None

    @classmethod
    def from_linear(cls, layer: nn.Linear, bits: int = 8, group_size: Optional[int] = None,
                    kernel: str = "auto", activation_precision: str = "int16") -> "QuantizedLinear":
        q = cls(layer.in_features, layer.out_features, layer.bias is not None, bits=bits, group_size=group_size,
                kernel=kernel, activation_precision=activation_precision)
        w = layer.weight.detach().to("cpu", torch.float32).contiguous()
        qw = quantize_weight(w, bits=bits, group_size=q.group_size or None)
        q.qweight.copy_(torch.from_numpy(np.ascontiguousarray(qw.data).reshape(q.qweight.shape)))
        q.qscale.copy_(torch.from_numpy(qw.scale.reshape(q.qscale.shape)))
        if layer.bias is not None:
            q.bias.copy_(layer.bias.detach().to("cpu", torch.float32))
        return q

    def _load_from_state_dict(self, *args, **kwargs):
        self._packed = None  # new weights: prepack again on next forward
        self._fast = None
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        # .half() / .to(dtype) would round the fp32 scales to the new dtype (and .numpy() has no
        # bfloat16): the scales stay fp32 (moved like the rest), the bias follows the module.
        scale = self.qscale
        super()._apply(fn, *args, **kwargs)
        self.qscale = scale.to(device=self.qscale.device)
        self._packed = None
        self._fast = None
        return self

    def packed(self) -> PackedLinear:
        if self._packed is None:
            self._packed = pack_linear(self.qweight.numpy(), self.qscale.numpy(), bits=self.bits,
                                       shape=(self.out_features, self.in_features), group_size=self.group_size)
            self._fast = None
        return self._packed

    def _fast_args(self):
        # What every fast-path call passes to the binding, looked up once: a batch-1 call
        # takes ~0.1-0.3 ms, and each nn.Module attribute lookup or .numpy() costs ~1 us.
        # Keyed on the bias tensor and the options, so reassigning them is picked up. The bias
        # buffer is read from the dict: nn.Module.__getattr__ costs ~1-3 us, 2-6% of a 2048 x
        # 2048 int4 call (a bias assigned as something else, or None, is found as before).
        buffers = self.__dict__["_buffers"]
        bias = buffers["bias"] if "bias" in buffers else self.bias
        key = (bias, self.kernel, self.activation_precision)
        fast = self.__dict__.get("_fast")
        if fast is None or fast[0] is not key[0] or fast[1:3] != key[1:]:
            if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"
                                     or not bias.is_contiguous()):
                return None
            fast = key + (self.packed()._handle, bias.numpy() if bias is not None else None)
            self._fast = fast
        return fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cpu:
            raise TypeError(f"QuantizedLinear runs on the CPU; x is on {x.device}")
        fast = self._fast_args()
        if fast is not None and x.dtype is torch.float32 and x.dim() >= 1 and x.shape[-1] == self.in_features:
            # Fast path: zero-copy numpy views straight into the binding, which checks the rest.
            if x.requires_grad:
                x = x.detach()
            if not x.is_contiguous():
                x = x.contiguous()
            if x.dim() == 2:
                return torch.from_numpy(_C.qlinear_linear(fast[3], x.numpy(), fast[4], fast[1], fast[2]))
            y = _C.qlinear_linear(fast[3], x.numpy().reshape(-1, self.in_features), fast[4], fast[1], fast[2])
            return torch.from_numpy(y).reshape(*x.shape[:-1], self.out_features)
        p = self.packed()
        with torch.no_grad():
            y = linear(x.detach().contiguous(), p, self.bias, kernel=self.kernel,
                       activation_precision=self.activation_precision)
            return y if x.dtype == torch.float32 else y.to(x.dtype)

    def extra_repr(self) -> str:
        g = "per-channel" if not self.group_size else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int{self.bits}, {g}, kernel={self.kernel!r}, activation_precision={self.activation_precision!r}")


def quantize_model(module: nn.Module, bits: int = 8, group_size: Optional[int] = 128, min_features: int = 0,
                   kernel: str = "auto", activation_precision: str = "int16") -> nn.Module:
    """Replace every nn.Linear with in_features >= min_features by a QuantizedLinear, in place.

    bits=8: per-channel int8 (group_size is ignored); bits=4: int4 in groups of group_size
    along in_features (a layer whose in_features it does not divide keeps fp32).
    kernel / activation_precision: see aimass.compress.linear.
    Returns the module (the QuantizedLinear itself when `module` is an nn.Linear)."""
    _check_options(kernel, activation_precision)
    if bits not in (4, 8):
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if bits == 4 and (group_size is None or int(group_size) <= 0):
        raise ValueError("bits=4 needs a positive group_size (128 is the usual choice)")
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    g = None if bits == 8 else int(group_size)

    def convert(layer: nn.Linear):
        if type(layer) is not nn.Linear or layer.in_features < min_features:
            return None
        if g and layer.in_features % g:
            return None
        return QuantizedLinear.from_linear(layer, bits=bits, group_size=g, kernel=kernel,
                                           activation_precision=activation_precision)

    if isinstance(module, nn.Linear):
        q = convert(module)
        return q if q is not None else module
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                q = convert(child)
                if q is not None:
                    setattr(parent, name, q)
    return module
