"""Triton kernels, one file per family, each with the numpy reference of exactly what it computes.

    int8_gemm     W8A8 GEMM, int32 accumulation, fused dequant/bias/activation/residual/requant epilogue
    act_quant     per-token dynamic int8 quantization, optionally fused with RMSNorm/LayerNorm
    weight_only   int8 per-channel and int4 per-group weight-only linear (decode shapes)
    grouped_weight_only  int8 / int4 weight-only grouped GEMMs of mixture-of-experts layers (routed tokens only)
    block_sparse  BSR-weight GEMM (fp16/bf16, and int8 with the W8A8 epilogue)
    sparse24      2:4 semi-structured GEMM with in-kernel decompression

Importing this package imports triton; set TRITON_INTERPRET=1 before that to run on the CPU.
"""
from slimfx.kernels.act_quant import norm_quantize_per_token, quantize_per_token
from slimfx.kernels.block_sparse import BSR, bsr_int8_gemm, bsr_linear, to_bsr
from slimfx.kernels.grouped_weight_only import (int4_grouped_weight_only, int8_grouped_weight_only,
                                                pack_int4_experts, unpack_int4_experts)
from slimfx.kernels.int8_gemm import int8_gemm
from slimfx.kernels.sparse24 import compress_24, sparse24_linear
from slimfx.kernels.weight_only import (int4_weight_only_linear, int8_weight_only_linear, pack_int4,
                                        quantize_int4_grouped, quantize_int8_per_channel)

__all__ = ["int8_gemm", "quantize_per_token", "norm_quantize_per_token", "int8_weight_only_linear",
           "int4_weight_only_linear", "int8_grouped_weight_only", "int4_grouped_weight_only", "quantize_int8_per_channel",
           "quantize_int4_grouped", "pack_int4", "pack_int4_experts", "unpack_int4_experts",
           "BSR", "to_bsr", "bsr_linear", "bsr_int8_gemm", "compress_24", "sparse24_linear"]
