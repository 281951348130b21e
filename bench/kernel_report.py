"""Writing bench/kernel_bench.py's results: JSON, a markdown table, a png plot, and the issue's goals checked.

Pure Python + matplotlib, no GPU needed: ``fake_results`` lets the CPU tier exercise all of it.
A result row is a dict:
    {"m": int, "n": int, "k": int, "kernel": str, "ms": float | None,
     "speedup_vs_bf16": float | None, "ok": bool | None, "check": str, "note": str}
"kernel" == "cublas_bf16" is the baseline row of its shape; "ms" is None when the case could not run
(the reason in "note"), "speedup_vs_bf16" None also when its shape's baseline could not.

    python bench/kernel_report.py bench/results/kernels-<card>.json --out-dir DIR   # its .md and .png again
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# Column order of the table; the names are the "kernel" field of the rows.
KERNELS = [
    ("cublas_bf16", "cuBLAS bf16"),
    ("torch_int_mm_dequant", "torch._int_mm+dequant"),   # (matplotlib leaves labels that start with _ out of legends)
    ("torch_compile_w8a8", "compiled W8A8"),
    ("w8a8_fused", "W8A8 fused"),
    ("w8a8_fused_with_act_quant", "W8A8 +act quant"),
    ("weight_only_int8", "W-only int8"),
    ("weight_only_int4", "W-only int4"),
    ("block_sparse_50", "BSR 50%"),
    ("block_sparse_90", "BSR 90%"),
    ("block_sparse_int8_90", "BSR int8 90%"),
    ("torch_semi_structured_24", "torch 2:4"),
    ("sparse24", "2:4 ours"),
]

# The implementations behind "auto" (each kernel's impl= argument), timed on their own: a second table,
# so a run shows which one auto should pick and by how much.
VARIANTS = [
    ("w8a8_tiled", "W8A8 tiled"),
    ("w8a8_tma", "W8A8 TMA"),
    ("w8a8_gluon", "W8A8 Gluon"),
    ("weight_only_int8_gemv", "W-only int8 gemv"),
    ("weight_only_int8_dot", "W-only int8 dot"),
    ("block_sparse_50_tiled", "BSR 50% tiled"),
    ("block_sparse_50_tma", "BSR 50% TMA"),
    ("block_sparse_50_b128x64", "BSR 50% 128x64 blocks"),
    ("block_sparse_50_b128x128", "BSR 50% 128x128 blocks"),
    ("block_sparse_50_b32x32", "BSR 50% 32x32 blocks"),
    ("block_sparse_90_tiled", "BSR 90% tiled"),
    ("block_sparse_90_tma", "BSR 90% TMA"),
    ("block_sparse_90_b128x64", "BSR 90% 128x64 blocks"),
    ("block_sparse_90_b128x128", "BSR 90% 128x128 blocks"),
    ("block_sparse_90_b32x32", "BSR 90% 32x32 blocks"),
    ("block_sparse_int8_90_gluon", "BSR int8 90% Gluon"),
    ("sparse24_gemv", "2:4 gemv"),
    ("sparse24_dot", "2:4 dot"),
]

# The performance goals: (description, kernel or alternatives (the fastest correct one per shape
# counts), predicate on (m, n, k), minimum speedup vs bf16).
GOALS = [
    # W8A8: auto, or the Gluon kernel (explicit until measured; a win there is the next default)
    ("W8A8 fused >= 1.8x at 8192^3", ("w8a8_fused", "w8a8_gluon"), lambda m, n, k: (m, n, k) == (8192, 8192, 8192),
     1.8),
    ("W8A8 fused >= 1.3x at M=2048, N=K=4096", ("w8a8_fused", "w8a8_gluon"),
     lambda m, n, k: (m, n, k) == (2048, 4096, 4096), 1.3),
    ("W8A8 incl. act quant never slower than bf16 at M>=16", "w8a8_fused_with_act_quant",
     lambda m, n, k: m >= 16, 1.0),
    ("weight-only int8 >= 2x at M<=16, 4096x4096", "weight_only_int8",
     lambda m, n, k: m <= 16 and (n, k) == (4096, 4096), 2.0),
    # the block shape is the format's meta-parameter (the user picks it per model): the best one counts
    ("block-sparse 50% >= 1.6x at M=2048 (best block shape)",
     ("block_sparse_50", "block_sparse_50_b128x64", "block_sparse_50_b128x128", "block_sparse_50_b32x32"),
     lambda m, n, k: m == 2048, 1.6),
    ("block-sparse 90% >= 5x at M=2048 (bf16 BSR, best block shape)",
     ("block_sparse_90", "block_sparse_90_b128x64", "block_sparse_90_b128x128", "block_sparse_90_b32x32"),
     lambda m, n, k: m == 2048, 5.0),
    ("block-sparse 90% >= 5x at M=2048 (int8 BSR, W8A8)", ("block_sparse_int8_90", "block_sparse_int8_90_gluon"),
     lambda m, n, k: m == 2048, 5.0),
    ("2:4 >= 1.4x at M<=16", "sparse24", lambda m, n, k: m <= 16, 1.4),
]


# Bytes of weight each kernel reads per weight element (its data, plus the scales or indices it needs): at
# decode shapes a linear layer is bound by reading its weight, so ms -> GB/s says how close a kernel gets to
# the card's memory bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s). Kernels not listed are not modelled.
WEIGHT_BYTES = [
    (r"cublas_bf16$", 2.0),
    (r"(w8a8|torch_int_mm|torch_compile).*", 1.0),
    (r"weight_only_int8.*", 1.0),
    (r"weight_only_int4.*", 0.5 + 4 / 128),           # nibbles + an fp32 scale per group of 128
    (r"block_sparse_50.*", 2.0 * 0.5),
    (r"block_sparse_90.*", 2.0 * 0.1),
    (r"block_sparse_int8_90", 1.0 * 0.1),
    (r"(sparse24|torch_semi_structured_24).*", 2.0 * 0.5 + 1 / 8),   # kept values + 4 bits per group of 4
]


def gbps(row: dict) -> float | None:
    """Achieved GB/s of a row: its weight (WEIGHT_BYTES) plus bf16 x and y, over its time."""
    per = next((b for pat, b in WEIGHT_BYTES if re.match(pat, row["kernel"])), None)
    if per is None or not row.get("ms"):
        return None
    m, n, k = row["m"], row["n"], row["k"]
    return (n * k * per + 2 * m * k + 2 * m * n) / (row["ms"] * 1e-3) / 1e9


def _gbps_table(rows: list[dict]) -> list[str]:
    """Markdown lines: GB/s per decode shape (M <= 16) and modelled kernel, the baseline first."""
    decode = [r for r in rows if r["m"] <= 16 and gbps(r) is not None]
    if not decode:
        return []
    names = [k for k, _ in KERNELS + VARIANTS if any(r["kernel"] == k for r in decode)]
    titles = dict(KERNELS + VARIANTS)
    cell = {(r["m"], r["n"], r["k"], r["kernel"]): r for r in decode}
    shapes = sorted({(r["m"], r["n"], r["k"]) for r in decode})
    lines = ["", "## Bytes at decode", "",
             "M <= 16: achieved GB/s (the weight in the kernel's format, plus x and y in bf16, over the median "
             "time). A memory-bound kernel should approach the card's bandwidth.", "",
             "| M | N | K | " + " | ".join(titles[k] for k in names) + " |",
             "|---:|---:|---:|" + "---:|" * len(names)]
    for m, n, k in shapes:
        cells = [f"{gbps(cell[(m, n, k, kn)]):.0f}" if (m, n, k, kn) in cell and cell[(m, n, k, kn)]["ok"] is not False
                 else "-" for kn in names]
        lines.append(f"| {m} | {n} | {k} | " + " | ".join(cells) + " |")
    return lines


def card_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def check_goals(rows: list[dict]) -> list[dict]:
    """One entry per goal: the rows it covers, the worst speedup among them, and whether it is met."""
    out = []
    for desc, kernels, where, floor in GOALS:
        kernels = (kernels,) if isinstance(kernels, str) else kernels
        best: dict = {}                          # shape -> its fastest correct alternative's row
        for r in rows:
            if r["kernel"] in kernels and where(r["m"], r["n"], r["k"]) and r["speedup_vs_bf16"] is not None \
                    and r["ok"] is not False:
                shape = (r["m"], r["n"], r["k"])
                if shape not in best or r["speedup_vs_bf16"] > best[shape]["speedup_vs_bf16"]:
                    best[shape] = r
        wrong = any(r["kernel"] in kernels and where(r["m"], r["n"], r["k"]) and r["ok"] is False
                    and (r["m"], r["n"], r["k"]) not in best for r in rows)
        worst = min(best.values(), key=lambda r: r["speedup_vs_bf16"]) if best else None
        met = None if worst is None and not wrong else bool(worst and worst["speedup_vs_bf16"] >= floor
                                                               and not wrong)
        out.append({"goal": desc, "kernel": kernels[0] if len(kernels) == 1 else list(kernels),
                    "cases": len(best), "worst_speedup": worst and worst["speedup_vs_bf16"],
                    "via": worst and worst["kernel"], "met": met})
    return out


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    """Markdown lines: a row per shape that has any of ``columns``; cells are speedups vs bf16."""
    present = [(k, t) for k, t in columns if any(r["kernel"] == k for r in rows)]
    cell = {(r["m"], r["n"], r["k"], r["kernel"]): r for r in rows}
    shapes = sorted({(r["m"], r["n"], r["k"]) for r in rows if any(r["kernel"] == k for k, _ in present)},
                    key=lambda s: (s[1], s[2], s[0]))
    lines = ["| M | N | K | " + " | ".join(t for _, t in present) + " |", "|---:|---:|---:|" + "---:|" * len(present)]
    for m, n, k in shapes:
        cells = []
        for kern, _ in present:
            r = cell.get((m, n, k, kern))
            if r is None or r["ms"] is None:
                cells.append("-")
            elif kern == "cublas_bf16":
                cells.append(f"{r['ms']:.4f} ms")
            elif r["speedup_vs_bf16"] is None:          # timed, but its shape's baseline did not run
                cells.append("-")
            else:
                cells.append(f"{r['speedup_vs_bf16']:.2f}x" + ("" if r["ok"] is not False else " !"))
        lines.append(f"| {m} | {n} | {k} | " + " | ".join(cells) + " |")
    return lines


def timer(meta: dict) -> str:
    """What kernel_bench timed each case with, by the run's timing."""
    cudagraph = meta.get("timing", "").startswith("CUDA")
    return "triton.testing.do_bench_cudagraph" if cudagraph else "triton.testing.do_bench"


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"# Kernel benchmark: {meta.get('card', '?')}", "",
             f"torch {meta.get('torch', '?')}, triton {meta.get('triton', '?')}, {meta.get('date', '')}"
             f"{' (quick subset)' if meta.get('quick') else ''}{' (FAKE numbers)' if meta.get('fake') else ''}.",
             f"Timing: {meta.get('timing', 'eager launches')}. "
             f"Cells: speedup vs cuBLAS bf16 in the same run (median of {timer(meta)}); the bf16 "
             "column is its time in ms. `!` marks a failed correctness check, `-` a case that did not run "
             "(or whose shape's bf16 baseline did not).",
             "", *_table(rows, KERNELS)]
    if any(r["kernel"] in dict(VARIANTS) for r in rows):
        lines += ["", "## Implementations behind auto", "",
                  "Each kernel's `impl=` choices timed on their own (the table above is `impl=\"auto\"`, which "
                  "times them once per shape and keeps the faster).", "", *_table(rows, VARIANTS)]
    lines += _gbps_table(rows)
    lines += ["", "## Goals", "", "| goal | cases | worst speedup | met |", "|---|---:|---:|:---:|"]
    for g in check_goals(rows):
        worst = "-" if g["worst_speedup"] is None else f"{g['worst_speedup']:.2f}x"
        if g["worst_speedup"] is not None and not isinstance(g["kernel"], str):
            worst += f" ({g['via']})"
        met = {True: "yes", False: "NO", None: "not run"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['cases']} | {worst} | {met} |")
    notes = [r for r in rows if r["note"] or r["ok"] is False]
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {r['kernel']} at {r['m']}x{r['n']}x{r['k']}: "
                  f"{'CHECK FAILED: ' + r['check'] + '; ' if r['ok'] is False else ''}{r['note']}" for r in notes]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], meta: dict, path: Path) -> str | None:
    """Grouped bars of speedup vs bf16 per shape (log scale). Returns None, or why no plot was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: {e}"
    shapes = sorted({(r["m"], r["n"], r["k"]) for r in rows}, key=lambda s: (s[1], s[2], s[0]))
    kernels = [(k, t) for k, t in KERNELS[1:] if any(r["kernel"] == k and r["ms"] for r in rows)]
    cell = {(r["m"], r["n"], r["k"], r["kernel"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(shapes) + 2), 5))
    width = 0.8 / max(1, len(kernels))
    for i, (kern, title) in enumerate(kernels):
        xs, ys = [], []
        for j, s in enumerate(shapes):
            r = cell.get((*s, kern))
            if r and r["speedup_vs_bf16"]:
                xs.append(j + (i - (len(kernels) - 1) / 2) * width)
                ys.append(r["speedup_vs_bf16"])
        ax.bar(xs, ys, width=width, label=title, color=plt.cm.tab20(i % 20))
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(shapes)), [f"{m}x{n}x{k}" for m, n, k in shapes], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("speedup vs cuBLAS bf16 (same run)")
    ax.set_title(f"slimfx kernels on {meta.get('card', '?')}{' (FAKE)' if meta.get('fake') else ''}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _stem(meta: dict, out_dir: Path) -> Path:
    graph = "-cudagraph" if meta.get("timing", "").startswith("CUDA") else ""
    return out_dir / f"kernels-{card_slug(meta.get('card', 'unknown'))}{graph}{'-fake' if meta.get('fake') else ''}"


def _earlier(meta: dict, out_dir: Path) -> tuple[Path, dict | None]:
    """The path of the JSON a run of ``meta``'s card and timing writes to ``out_dir``, and its contents if it
    exists; ValueError, naming the file, where a run of this one cannot merge into it."""
    path = _stem(meta, out_dir).with_suffix(".json")
    if not path.exists():
        return path, None
    try:
        old = json.loads(path.read_text())
        old_meta, _ = old["meta"], old["results"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--merge: {path} is not a kernel_bench results file ({type(e).__name__}: {e})") from None
    if old_meta.get("quick") != meta.get("quick"):
        raise ValueError(f"--merge: {path} is from a {'quick' if old_meta.get('quick') else 'full'} run, this "
                         f"one is not; merge like with like")
    return path, old


def merge_problem(meta: dict, out_dir: Path) -> str | None:
    """Why a run of ``meta`` (card, timing, quick, fake: what it is known by before it measures) could not
    --merge into ``out_dir``, or None: checked before measuring, so a GPU session does not time a sweep
    it then cannot merge."""
    try:
        _earlier(meta, out_dir)
    except ValueError as e:
        return str(e)
    return None


def merge_earlier(rows: list[dict], meta: dict, out_dir: Path) -> tuple[list[dict], dict]:
    """rows plus the rows of other shapes in the JSON an earlier run of the same card and timing wrote to
    ``out_dir`` (a sweep split over several runs); meta records the runs merged. ValueError (merge_problem's)
    where the earlier file does not fit."""
    _, old = _earlier(meta, out_dir)
    if old is None:
        return rows, meta
    mine = {(r["m"], r["n"], r["k"]) for r in rows}
    kept = [r for r in old["results"] if (r["m"], r["n"], r["k"]) not in mine]
    merged = dict(meta, merged_runs=old["meta"].get("merged_runs", [old["meta"].get("date")]) + [meta.get("date")])
    return kept + rows, merged


def write_all(rows: list[dict], meta: dict, out_dir: Path, tag: str = "") -> list[Path]:
    """<out_dir>/kernels-<card>[-cudagraph][-fake]<tag>.{json,md,png}; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = _stem(meta, out_dir)
    stem = stem.with_name(stem.name + tag)
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps({"meta": meta, "goals": check_goals(rows), "results": rows}, indent=1) + "\n")
    paths[1].write_text(markdown(rows, meta))
    why = plot(rows, meta, stem.with_suffix(".png"))
    if why is None:
        paths.append(stem.with_suffix(".png"))
    else:
        print(why)
    return paths


def fake_results(shapes, seed: int = 0) -> list[dict]:
    """Plausible-looking made-up rows, for exercising the report writers without a GPU."""
    import random
    rnd = random.Random(seed)
    rows = []
    for m, n, k in shapes:
        base = 1e-3 + 2 * m * n * k / 700e12 * 1e3
        rows.append(dict(m=m, n=n, k=k, kernel="cublas_bf16", ms=base, speedup_vs_bf16=1.0, ok=True,
                         check="", note=""))
        for kern, _ in KERNELS[1:] + VARIANTS:
            sp = rnd.uniform(0.5, 3.0)
            rows.append(dict(m=m, n=n, k=k, kernel=kern, ms=base / sp, speedup_vs_bf16=sp, ok=True,
                             check="fake", note=""))
    rows[-1].update(ms=None, speedup_vs_bf16=None, ok=None, note="skipped (fake)")
    return rows


def main(argv=None) -> int:
    """The report of a results JSON written again (after a change to the report, or into another folder)."""
    import argparse
    p = argparse.ArgumentParser(description="Write the markdown report (and the png plot) of a bench/kernel_bench.py "
                                            "results JSON again, from its rows: <out-dir>/<the JSON's name>.md and "
                                            ".png. The JSON itself is not rewritten.")
    p.add_argument("json", type=Path, help="a results file kernel_bench.py wrote (kernels-<card>*.json)")
    p.add_argument("--out-dir", type=Path, required=True,
                   help="where to write; the JSON's own folder overwrites its committed .md and .png")
    p.add_argument("--no-plot", action="store_true", help="the markdown only")
    a = p.parse_args(argv)
    try:
        data = json.loads(a.json.read_text())
        rows, meta = data["results"], data["meta"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"bench/kernel_report.py: {a.json}: not a kernel_bench results file ({type(e).__name__}: {e})",
              file=sys.stderr)
        return 2
    a.out_dir.mkdir(parents=True, exist_ok=True)
    stem = a.out_dir / a.json.stem
    stem.with_suffix(".md").write_text(markdown(rows, meta))
    written = [stem.with_suffix(".md")]
    if not a.no_plot:
        why = plot(rows, meta, stem.with_suffix(".png"))
        if why is None:
            written.append(stem.with_suffix(".png"))
        else:
            print(why)
    print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
