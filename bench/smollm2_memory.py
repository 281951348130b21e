"""The weights a compressed SmolLM2-135M holds, per scheme: what the graph stores and what the triton backend
puts on the device.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2_memory.py

The model in bf16 (as it runs on a GPU), every linear of the 30 blocks compressed, lm_head (tied to the
embeddings) left bf16. Per scheme: ``cm.held_bytes()`` on backend="torch" (the graph's own tensors) and
after ``cm.with_backend("triton")`` (lowering only: the tensors that go to the device, here under
TRITON_INTERPRET=1 on the CPU, where they are the same bytes), and for the sparse schemes the dense weights
their layers no longer carry beside the packed ones. Bytes do not depend on the machine, so no GPU is
needed. Pruning here is by magnitude (the bytes depend on the pattern, not on which weights it keeps).
Writes bench/results/smollm2_memory.json and .md (--out-dir and --name move them).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")     # before triton is imported: lowering on the CPU

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import slimfx  # noqa: E402
from bench.common import RESULTS, provenance  # noqa: E402
from bench.models import load_smollm2  # noqa: E402
from slimfx.passes import Fuse, LowerSparse, Prune, Quantize  # noqa: E402

SKIP = "lm_head"


def schemes() -> dict:
    w8a8 = Quantize(weights="int8", activations="dynamic", exclude=SKIP)
    blocks = Prune(sparsity=0.5, pattern="block", block=(64, 64), score="magnitude", exclude=SKIP)
    return {
        "bf16": [],
        "W8A16 (int8 weights per channel)": [Quantize(weights="int8", exclude=SKIP)],
        "W4A16 (int4, groups of 64)": [Quantize(weights="int4", group_size=64, exclude=SKIP)],
        "W8A8 dynamic + Fuse": [w8a8, Fuse()],
        "2:4 + LowerSparse": [Prune(pattern="2:4", score="magnitude", exclude=SKIP), Fuse(), LowerSparse()],
        "50% of 64x64 blocks + LowerSparse": [blocks, Fuse(), LowerSparse()],
        "50% of 64x64 blocks, W8A8 + LowerSparse": [blocks, w8a8, Fuse(), LowerSparse()],
    }


def dropped_dense_bytes(cm) -> int:
    """Bytes of the dense weights the lowered sparse layers read from the graph but leave off the device."""
    sf = torch.ops.slimfx
    total = 0
    for n in cm.graph.graph.nodes:
        sparse = n.target is sf.sparse_linear.default or (
            n.target is sf.quantized_linear.default and slimfx.ir.meta.info(n).sparse)
        if sparse and n.args[1].op == "get_attr":
            total += slimfx.ir.meta.tensor_attr(cm.graph, n.args[1]).untyped_storage().nbytes()
    return total


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", type=Path, default=RESULTS, help="where to write (default: bench/results)")
    ap.add_argument("--name", default="smollm2_memory", help="results file stem (no machine name: bytes are alike "
                                                            "on any machine)")
    a = ap.parse_args()
    model, tok = load_smollm2()
    model = model.to(torch.bfloat16)
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids[:, :64]
    t0 = time.perf_counter()
    captured = slimfx.capture(model, (), dict(input_ids=ids, use_cache=False))
    print(f"captured in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for name, passes in schemes().items():
        cm = slimfx.compile(captured, passes=passes, backend="torch", measure=False, progress=False)
        graph = cm.held_bytes()["weights"]
        device = cm.with_backend("triton").held_bytes()
        rows.append(dict(scheme=name, graph_mb=graph / 1e6, device_mb=device["weights"] / 1e6,
                         dense_copies_mb=device["dense_copies"] / 1e6, not_carried_mb=dropped_dense_bytes(cm) / 1e6))
        print(rows[-1], flush=True)
    base = rows[0]["device_mb"]
    lines = ["# SmolLM2-135M: the weights each scheme holds", "",
             "`HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2_memory.py`. The model in bf16, the 30 blocks' linears "
             "compressed, lm_head (tied to the embeddings: 28.3 M of the 134.5 M parameters) bf16 in every row. "
             "graph: `cm.held_bytes()` on backend=\"torch\" (the graph's tensors); device: on backend=\"triton\" "
             "(what goes to the GPU, measured by lowering under the interpreter: the same bytes); not carried: the "
             "dense weights of the sparse layers, which the device no longer holds beside their packed form "
             "(before this change it did).", "",
             "| scheme | graph MB | device MB | vs bf16 | dense weights not carried MB |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['scheme']} | {r['graph_mb']:.1f} | {r['device_mb']:.1f} | {r['device_mb'] / base:.2f}x | "
                     f"{r['not_carried_mb']:.1f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    a.out_dir.mkdir(parents=True, exist_ok=True)
    res = {"torch": torch.__version__, "rows": rows, "provenance": provenance()}   # bytes: any machine alike
    (a.out_dir / f"{a.name}.json").write_text(json.dumps(res, indent=1) + "\n")
    (a.out_dir / f"{a.name}.md").write_text(md)
    print(f"wrote {a.out_dir / a.name}.json and .md")


if __name__ == "__main__":
    main()
