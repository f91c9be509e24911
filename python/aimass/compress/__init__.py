"""aimass.compress: quantization, calibration and pruning.

Numerics: docs/numerics.md. Kernels are C++ (aimass_core/src/quant/)."""
from .calibrate import Calibration, calibrate
from .prune import ChannelPruneResult, prune_channels, prune_mask, prune_model
from .quantize import QuantizedTensor, dequantize, quantize

__all__ = [
    "QuantizedTensor", "quantize", "dequantize",
    "Calibration", "calibrate",
    "prune_mask", "prune_channels", "prune_model", "ChannelPruneResult",
]
