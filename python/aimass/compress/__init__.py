"""aimass.compress: quantization, calibration, pruning and quantized linear kernels.

Numerics: docs/numerics.md; kernels: docs/qlinear.md. The C++ kernels live in
aimass_core/src/quant/ and aimass_core/src/qlinear/. The torch integration
(quantize_model, QuantizedLinear) is imported on first use so that
``import aimass.compress`` does not load torch.
"""
from .calibrate import Calibration, calibrate
from .prune import ChannelPruneResult, prune_channels, prune_mask, prune_model
from .qlinear import PackedLinear, dequantize_weight, linear, pack_linear, quantize_weight
from .quantize import QuantizedTensor, dequantize, quantize

_TORCH_NAMES = ("quantize_model", "QuantizedLinear")


def __getattr__(name):
    if name in _TORCH_NAMES:
        from . import modules
        return getattr(modules, name)
    raise AttributeError(f"module 'aimass.compress' has no attribute {name!r}")


__all__ = [
    "QuantizedTensor", "quantize", "dequantize",
    "Calibration", "calibrate",
    "prune_mask", "prune_channels", "prune_model", "ChannelPruneResult",
    "linear", "PackedLinear", "pack_linear", "quantize_weight", "dequantize_weight",
    "quantize_model", "QuantizedLinear",
]
