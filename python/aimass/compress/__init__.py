from .linear import linear, PackedLinear
from .modules import quantize_model, QuantizedLinear
