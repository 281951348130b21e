"""Quantization numerics: the one definition every implementation (torch reference, numpy backend,
Triton kernels) follows. See ``numerics`` for the integer arithmetic.

    scheme     QScheme (what a quantized tensor is), QParams, parameter shapes
    numerics   uniform affine quantize/dequantize and the exact int8 GEMM (numpy and torch twins)
    logq       logarithmic quantization
    quantize   parameters from data or a range; quantize/dequantize a tensor by a QScheme
    linear     quantized_linear / weight_only_linear / requantize arithmetic
    int4       two 4-bit codes per byte
    size       weight_bytes: honest storage accounting
    observers  calibration observers (min-max, moving average, percentile, MSE search)
"""
from .scheme import QParams, QScheme, param_shape
from .quantize import (dequantize_tensor_np, dequantize_tensor_torch, fake_quantize_np, fake_quantize_torch,
                       qparams_from_range_np, qparams_from_range_torch, qparams_np, qparams_torch,
                       quantize_tensor_np, quantize_tensor_torch)
from .int4 import pack_int4_np, pack_int4_torch, unpack_int4_np, unpack_int4_torch
from .size import fp32_bytes, weight_bytes
from .observers import (MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, Observer,
                        PercentileObserver)

__all__ = [
    "QScheme", "QParams", "param_shape",
    "qparams_np", "qparams_torch", "qparams_from_range_np", "qparams_from_range_torch",
    "quantize_tensor_np", "quantize_tensor_torch", "dequantize_tensor_np", "dequantize_tensor_torch",
    "fake_quantize_np", "fake_quantize_torch",
    "pack_int4_np", "pack_int4_torch", "unpack_int4_np", "unpack_int4_torch",
    "weight_bytes", "fp32_bytes",
    "Observer", "MinMaxObserver", "MovingAverageMinMaxObserver", "PercentileObserver", "MSEObserver",
]
