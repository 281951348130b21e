"""Bit-exactness across devices, on a GPU: the Triton kernels against the numpy references (the executable
spec, run on the CPU) and the torch references run on the GPU. Integer outputs and per-token scales must be
identical; prints one line per case, writes JSON to --out, and exits 1 where any case mismatches.

    python bench/gpu_checks.py --out results/gpu_checks-<card>.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

if not torch.cuda.is_available():         # no GPU: the checks run under Triton's interpreter, a smoke test
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import description, provenance  # noqa: E402
from slimfx import kernels as K  # noqa: E402
from slimfx.quant import linear as QL  # noqa: E402
from slimfx.quant.numerics import absmax_scale_torch, quantize_torch  # noqa: E402


def mismatches(a, b) -> int:
    a, b = np.asarray(a), np.asarray(b)
    return int((a != b).sum()) if a.shape == b.shape else -1


def checks(dev: torch.device) -> list[dict]:
    """Every case's row (printed as it goes); a mismatch count other than 0 is a failure."""
    # without a GPU (TRITON_INTERPRET=1) the same checks run on small shapes: a smoke test of the script
    small = dev.type == "cpu"
    g = torch.Generator(device="cpu").manual_seed(0)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for m, k in [(1, 40), (7, 333)] if small else [(1, 4096), (16, 4096), (2048, 4096), (4099, 11008)]:
            x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 8).to(dtype)
            xq, xs = K.quantize_per_token(x.to(dev))
            q_np, s_np = QL.quantize_per_token_np(x.float().numpy())
            s_t = absmax_scale_torch(x.to(dev), dim=-1, qmax=127)
            q_t = quantize_torch(x.to(dev), s_t, 0, -127, 127)
            row = {"case": "act_quant", "dtype": str(dtype), "m": m, "k": k,
                   "q_vs_numpy": mismatches(xq.cpu(), q_np), "scale_vs_numpy": mismatches(xs.cpu(), s_np),
                   "q_vs_torch_cuda": mismatches(xq.cpu(), q_t.cpu()), "scale_vs_torch_cuda": mismatches(xs.cpu(), s_t.cpu())}
            rows.append(row)
            print(row, flush=True)
    for m, n, k in [(1, 24, 48), (5, 33, 80)] if small else [(1, 4096, 4096), (33, 1000, 4096), (2048, 4096, 4096)]:
        x = torch.randn(m, k, generator=g)
        w = torch.randn(n, k, generator=g) * 0.02
        ws = absmax_scale_torch(w, dim=1).reshape(n)
        wq = quantize_torch(w, ws[:, None], 0, -127, 127)
        bias = torch.randn(n, generator=g)
        xq, xs = QL.quantize_per_token_torch(x)
        ref = QL.quantized_linear_np(xq.numpy(), wq.numpy(), ws.numpy(), bias.numpy(), x_scale=xs.numpy())
        # every implementation: the tiled kernel, the persistent TMA kernel, and a forced split-K
        variants = {"auto": {}, "tiled": dict(impl="tiled"), "tma": dict(impl="tma"),
                    "split-K 4": dict(_config=dict(BLOCK_M=16, BLOCK_N=64 if not small else 32,
                                                   BLOCK_K=256 if not small else 32, SPLIT_K=4))}
        if m > 1:    # the TMA configs that only a GPU runs, pinned: two programs per SM, 256-wide K steps
            pins = ([dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, CTAS=2, num_warps=4, num_stages=1)] if small else
                    [dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=128, CTAS=2, num_warps=4, num_stages=2),
                     dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=256, CTAS=1, num_warps=8, num_stages=2)])
            for cfg in pins:
                label = f"tma {cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} CTAS={cfg['CTAS']}"
                variants[label] = dict(impl="tma", _config=cfg)
        # sm_90 only (elsewhere its refusal is printed); one config pinned to bound the compiles here (the
        # prefill part's tests pin every config)
        variants["gluon"] = dict(impl="gluon", _config=dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_stages=4,
                                                            num_warps=8))
        for name, kw in variants.items():
            try:
                y = K.int8_gemm(xq.to(dev), wq.to(dev), xs.to(dev), ws.to(dev), bias=bias.to(dev),
                                out_dtype=torch.float32, **kw)
            except ValueError as e:          # e.g. TMA's alignment refusal at odd K
                print({"case": f"int8_gemm {name}", "m": m, "n": n, "k": k, "refused": str(e)}, flush=True)
                continue
            row = {"case": f"int8_gemm {name}, fp32 out (dialect order) vs numpy", "m": m, "n": n, "k": k,
                   "mismatches": mismatches(y.cpu().numpy(), ref),
                   "max_abs_diff": float(np.abs(y.cpu().numpy() - ref).max())}
            rows.append(row)
            print(row, flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--out", type=Path, default=None, help="the JSON to write (default: print only)")
    a = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = checks(dev)
    ok = all(v == 0 for r in rows for key, v in r.items() if key.startswith(("q_", "scale_", "mismatches")))
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (Triton interpreter)"
    print("ALL EXACT" if ok else "MISMATCHES FOUND", name)
    if a.out:
        a.out.write_text(json.dumps({"device": name, "torch": torch.__version__, "provenance": provenance(name),
                                     "all_exact": ok, "rows": rows}, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
