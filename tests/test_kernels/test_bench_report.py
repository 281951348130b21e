"""bench/kernel_bench.py and bench/gpu_checks.py without a GPU: the bench refuses clearly, its report writers work on
made-up rows, and every bench case and GPU check runs under the interpreter."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import kernel_report as R  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_bench_exits_clearly_without_cuda(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_bench.py"), "--quick", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "no CUDA device" in p.stderr and "--fake" in p.stderr
    assert not list(tmp_path.iterdir())
    # a misspelt --only is refused before anything runs (on a GPU it would time the baselines alone)
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_bench.py"), "--fake", "--only", "sparse_24",
                        "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "--only ['sparse_24']: no such kernel" in p.stderr
    assert not list(tmp_path.iterdir())
    # so is an --m no shape has: --fake crashed (IndexError), a GPU run wrote an empty report over the card's
    for m, said in (("128", "sweep has that M; it has M in [1, 16, 2048, 8192]"), ("abc", "comma-separated integers")):
        p = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_bench.py"), "--fake", "--quick", "--m", m,
                            "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and said in p.stderr, p.stderr
    assert not list(tmp_path.iterdir())


def test_only_picks_kernels_with_their_variants(tmp_path):
    """--only's names pick the same cases on the GPU and in --fake: a name and its implementations, never a
    longer name it merely begins (block_sparse_50 is not block_sparse_500), and the baseline always."""
    import kernel_bench as B
    assert B.selected("w8a8_tma", {"w8a8"}) and B.selected("w8a8_fused_with_act_quant", {"w8a8"})
    assert B.selected("block_sparse_50_b32x32", {"block_sparse_50"}) and B.selected("cublas_bf16", {"sparse24"})
    assert not B.selected("block_sparse_90", {"block_sparse_50"}) and not B.selected("sparse24", {"sparse2"})
    assert B.unknown_only({"w8a8", "sparse2", "cublas_bf16", "block_sparse_int8", "w8a8_"}) == ["sparse2", "w8a8_"]
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_bench.py"), "--fake", "--quick", "--only",
                        "sparse24,block_sparse_90", "--out-dir", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    data = json.loads((tmp_path / "kernels-fake-card-fake.json").read_text())
    assert {r["kernel"] for r in data["results"]} == {
        "cublas_bf16", "sparse24", "sparse24_gemv", "sparse24_dot", "block_sparse_90", "block_sparse_90_tiled",
        "block_sparse_90_tma", "block_sparse_90_b128x64", "block_sparse_90_b128x128", "block_sparse_90_b32x32"}


def test_fake_run_writes_json_md_png(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_bench.py"), "--fake", "--quick",
                        "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    names = sorted(f.name for f in tmp_path.iterdir())
    assert names == ["kernels-fake-card-fake.json", "kernels-fake-card-fake.md", "kernels-fake-card-fake.png"]
    data = json.loads((tmp_path / names[0]).read_text())
    assert data["meta"]["fake"] is True and len(data["goals"]) == len(R.GOALS)
    assert {(r["m"], r["n"], r["k"]) for r in data["results"]} == {(1, 4096, 4096), (16, 4096, 4096),
                                                                   (2048, 4096, 4096), (8192, 8192, 8192)}
    # --cudagraph is named in the file and the report (a fake run said eager launches, under the eager name)
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_bench.py"), "--fake", "--quick", "--cudagraph",
                        "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "Timing: CUDA-graph replay" in (tmp_path / "kernels-fake-card-cudagraph-fake.md").read_text()


def test_markdown_and_goals():
    rows = [dict(m=8192, n=8192, k=8192, kernel="cublas_bf16", ms=2.0, speedup_vs_bf16=1.0, ok=True, check="", note=""),
            dict(m=8192, n=8192, k=8192, kernel="w8a8_fused", ms=1.0, speedup_vs_bf16=2.0, ok=True, check="", note=""),
            dict(m=2048, n=4096, k=4096, kernel="w8a8_fused", ms=1.0, speedup_vs_bf16=1.5, ok=False,
                 check="rel err 0.5", note=""),
            dict(m=1, n=4096, k=4096, kernel="torch_int_mm_dequant", ms=None, speedup_vs_bf16=None, ok=None,
                 check="", note="RuntimeError: M must be > 16")]
    md = R.markdown(rows, {"card": "H100"})
    assert "| 8192 | 8192 | 8192 | 2.0000 ms | - | 2.00x |" in md
    assert "| 2048 | 4096 | 4096 | - | - | 1.50x ! |" in md
    goals = {g["goal"]: g for g in R.check_goals(rows)}
    assert goals["W8A8 fused >= 1.8x at 8192^3"]["met"] is True
    assert goals["W8A8 fused >= 1.3x at M=2048, N=K=4096"]["met"] is False     # fast but wrong is not met
    assert goals["2:4 >= 1.4x at M<=16"]["met"] is None
    assert "M must be > 16" in md
    assert R.card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_decode_bandwidth_table():
    rows = [dict(m=1, n=4096, k=4096, kernel="cublas_bf16", ms=0.01, speedup_vs_bf16=1.0, ok=True, check="", note=""),
            dict(m=1, n=4096, k=4096, kernel="weight_only_int8", ms=0.005, speedup_vs_bf16=2.0, ok=True, check="",
                 note=""),
            dict(m=2048, n=4096, k=4096, kernel="cublas_bf16", ms=0.1, speedup_vs_bf16=1.0, ok=True, check="",
                 note="")]
    # bf16: 2 bytes per weight + x and y: (2 * 4096**2 + 2 * 4096 * 2) B / 10 us = 3357 GB/s; int8: half the
    # weight bytes in half the time
    assert R.gbps(rows[0]) == pytest.approx((2 * 4096 ** 2 + 4 * 4096) / 1e-5 / 1e9)
    assert R.gbps(rows[1]) == pytest.approx((4096 ** 2 + 4 * 4096) / 5e-6 / 1e9)
    md = R.markdown(rows, {})
    assert "## Bytes at decode" in md and "| 1 | 4096 | 4096 | 3357 | 3359 |" in md
    assert "| 2048 |" not in md.split("## Bytes at decode")[1].split("## Goals")[0]     # prefill: not memory bound


def test_block_sparse_goal_takes_the_best_correct_block_shape():
    def row(kernel, speedup, ok=True):
        return dict(m=2048, n=4096, k=4096, kernel=kernel, ms=1.0, speedup_vs_bf16=speedup, ok=ok, check="", note="")
    goal = "block-sparse 50% >= 1.6x at M=2048 (best block shape)"
    rows = [row("block_sparse_50", 1.2), row("block_sparse_50_b128x128", 1.7)]
    g = {g["goal"]: g for g in R.check_goals(rows)}[goal]
    assert g["met"] is True and g["via"] == "block_sparse_50_b128x128" and g["cases"] == 1
    assert f"| {goal} | 1 | 1.70x (block_sparse_50_b128x128) | yes |" in R.markdown(rows, {})
    rows[1]["ok"] = False                                     # fast but wrong does not count
    g = {g["goal"]: g for g in R.check_goals(rows)}[goal]
    assert g["met"] is False and g["worst_speedup"] == 1.2


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the bench's cases on CPU tensors, interpreted")
def test_every_bench_case_runs_under_the_interpreter(monkeypatch):
    """The GPU bench's own code (inputs, checks, the impl variants) on tiny shapes under TRITON_INTERPRET:
    a GPU session should spend its minutes measuring, not finding a typo. Timing is stubbed (one call)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_kernels", ROOT / "bench" / "kernel_bench.py")
    bench_kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_kernels)
    bench = bench_kernels.Bench(set())
    bench.dev = "cpu"
    monkeypatch.setattr(bench, "time_ms", lambda fn: (fn(), 1.0)[1])

    def no_compile(*a):
        raise NotImplementedError("torch.compile is not exercised here")
    bench.compiled = no_compile
    torch.manual_seed(0)                                          # the bench draws its inputs from torch's RNG
    for m, n, k in [(1, 128, 128), (130, 256, 192)]:
        bench.shape(m, n, k)
    ran = {r["kernel"] for r in bench.rows if r["ms"] is not None}
    # every implementation ran at some shape, but the Gluon kernels, which need sm_90: their refusal is the note
    gluon_kernels = {"w8a8_gluon", "block_sparse_int8_90_gluon"}
    assert {k for k, _ in R.VARIANTS} - gluon_kernels <= ran
    gluon = [r for r in bench.rows if r["kernel"] in gluon_kernels]
    assert {r["kernel"] for r in gluon} == gluon_kernels
    assert all("impl='gluon': Gluon kernels run on a CUDA device only" in r["note"] for r in gluon)
    assert {k for k, _ in R.KERNELS} - ran <= {"torch_int_mm_dequant", "torch_compile_w8a8",
                                                "torch_semi_structured_24"}   # CPU lacks these baselines
    failed = [(r["kernel"], r["m"], r["check"], r["note"]) for r in bench.rows if r["kernel"] not in gluon_kernels
              and (r["ok"] is False or (r["ms"] is None and not r["kernel"].startswith("torch_")))]
    from slimfx.quant.numerics import int_mm_exact
    if not int_mm_exact():     # a CPU without VNNI: torch's own int8 GEMM (the baseline) saturates; the bench says so
        failed = [f for f in failed if f[0] != "torch_int_mm_dequant"]
    assert not failed


def test_a_sweep_split_over_runs_merges(tmp_path):
    """--m picks shapes by M; --merge keeps the other shapes of the earlier run and reports them all."""
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_bench.py"), "--fake", "--quick",
                                     "--out-dir", str(tmp_path), *a], capture_output=True, text=True, timeout=120)
    assert run("--m", "1,16").returncode == 0
    p = run("--m", "2048", "--merge")
    assert p.returncode == 0, p.stderr
    data = json.loads((tmp_path / "kernels-fake-card-fake.json").read_text())
    assert {(r["m"], r["n"], r["k"]) for r in data["results"]} == {(1, 4096, 4096), (16, 4096, 4096),
                                                                   (2048, 4096, 4096)}
    assert len(data["meta"]["merged_runs"]) == 2
    assert "| 2048 | 4096 | 4096 |" in (tmp_path / "kernels-fake-card-fake.md").read_text()
    full = subprocess.run([sys.executable, str(ROOT / "bench" / "kernel_bench.py"), "--fake", "--m", "1", "--merge",
                           "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert full.returncode != 0 and "merge like with like" in full.stderr     # full sweep rows into a quick file


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter smoke run of the GPU check")
def test_gpu_checks_script_runs_interpreted(tmp_path):
    """bench/gpu_checks.py on small shapes under the interpreter: the script works and finds the kernels
    (every int8_gemm implementation included) exact against the numpy spec. Without TRITON_INTERPRET set: the
    script sets it itself where there is no GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_checks.py"), "--out", str(tmp_path / "c.json")],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["all_exact"] is True
    assert {r["case"].split(",")[0] for r in data["rows"]} >= {"int8_gemm tiled", "int8_gemm tma", "int8_gemm split-K 4"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter smoke run of the end-to-end bench")
def test_llama_bench_smoke():
    """bench/llama_gpu.py --smoke: a tiny bf16 Llama through every scheme on the triton backend
    (interpreted): the script runs, the pruned layers reach the sparse ops, and slimfx's logits stay close
    to torch's (to the pruned model's, for the sparse schemes)."""
    schemes = "w8a8,w8a16,2:4,bsr50,w8a8-bsr50,w4a16"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "llama_gpu.py"), "--smoke", "--schemes", schemes],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("| slimfx")]
    assert len(rows) == 6                                     # each scheme, eager
    cosines = {line.split()[2]: [float(c) for c in re.findall(r"cos (\d\.\d+)", line)] for line in rows}
    assert all(len(c) == 2 for c in cosines.values())
    # int8 weights on a random model: ~0.9999; int4 in groups of 32 (RTN): ~0.989
    assert min(min(c) for k, c in cosines.items() if k != "w4a16") > 0.999 and min(cosines["w4a16"]) > 0.98
    # 1 layer x (q/k/v merged, o, gate/up merged, down) = 4 linears, every one pruned (the smoke run's
    # 32x32 blocks divide all of them) and lowered; lm_head stays dense
    counts = dict(re.findall(r"Layers on sparse kernels, ([\w:-]+): (\d+)", p.stdout))
    assert counts == {"2:4": "4", "bsr50": "4", "w8a8-bsr50": "4"}, counts
    # the weights held: int8 / int4 / packed sparse layers below bf16's, and no dense copies kept (the
    # interpreter always takes the kernel); embeddings and lm_head (bf16 in all) bound how far below
    held = dict(re.findall(r"(torch bf16|slimfx [\w:-]+) ([\d.]+)[,.]", p.stdout.split("Weights on the device")[1]))
    assert set(held) == {"torch bf16", *(f"slimfx {s}" for s in schemes.split(","))}, held
    assert all(float(v) < float(held["torch bf16"]) for k, v in held.items() if k != "torch bf16"), held
    assert "dense copies" not in p.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter smoke run of the generation bench")
def test_llama_generate_bench_smoke():
    """bench/llama_generate.py --smoke: a tiny bf16 Llama generating through compile_causal_lm on the triton
    backend (interpreted) beside transformers' generate: the script runs and the prompt logits stay close."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "llama_generate.py"), "--smoke", "--schemes",
                        "none,w8a16"], capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, TRITON_INTERPRET="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line.split("|") for line in p.stdout.splitlines() if line.startswith("| slimfx")]
    assert len(rows) == 2, p.stdout[-2000:]
    cos = [float(r[5]) for r in rows]
    # none: the same bf16 ops as eager (cos ~1); w8a16: int8 weights of a random model: ~0.9999
    assert min(cos) > 0.999, cos
    same = [int(r[6]) for r in rows]
    assert same[0] == 4, same                  # no passes: transformers' greedy tokens, all 4
    hf = [line.split("|") for line in p.stdout.splitlines() if line.startswith("| transformers generate bf16 |")]
    weights = {"bf16": float(hf[0][7]), "none": float(rows[0][7]), "w8a16": float(rows[1][7])}
    # the same bf16 weights (and the rotary buffer) with no passes; int8 linears below (embeddings, lm_head bf16)
    assert abs(weights["none"] - weights["bf16"]) <= 0.001 and weights["w8a16"] < 0.9 * weights["bf16"], weights


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter smoke run of the MoE bench")
def test_moe_bench_smoke():
    """bench/moe_gpu.py --smoke: the five expert-GEMM paths (int8 and int4) on tiny shapes (interpreted) agree
    with the fp32 reference and the table has a row per case."""
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "moe_gpu.py"), "--smoke"], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2 and not any(" !" in r for r in rows), p.stdout[-2000:]
