"""aimass.compress: quantization, calibration and pruning.

Numerics: docs/numerics.md. Kernels are C++ (aimass_core/src/quant/)."""
from .quantize import QuantizedTensor, dequantize, quantize

__all__ = ["QuantizedTensor", "quantize", "dequantize"]
