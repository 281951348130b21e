"""What the benchmarks share: the machine's name, median timing, --help descriptions, and writing results."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def description(doc: str) -> str:
    """The first paragraph of a module docstring, on one line: an argparse description that ends where its
    sentence does (``doc.split("\\n")[0]`` cut sentences that wrap)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").lower()[:60]


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def paired_median_ms(fa, fb, repeats: int, rounds: int = 3) -> tuple[float, float]:
    """Medians of fa and fb timed in alternating blocks (``rounds`` blocks each, warmed up), so drift in
    the machine's speed hits both alike. Blocks, not single calls: torch's OpenMP threads and OpenBLAS's
    spinning workers slow each other for a while after a switch (interleaving single calls made torch
    eager 1.5x slower here)."""
    ta, tb = [], []
    for _ in range(rounds):
        for fn, times in ((fa, ta), (fb, tb)):
            for i in range(repeats + 2):
                t = time.perf_counter()
                fn()
                if i >= 2:                 # the first calls after a switch are the contaminated ones
                    times.append(time.perf_counter() - t)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def provenance(machine: str | None = None) -> dict:
    """Where a result came from: the date, the machine, the command, slimfx's git revision (``+dirty`` with
    uncommitted changes) and the versions of the libraries that decide the numbers."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        rev = (rev + ("+dirty" if dirty else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        rev = "unknown"
    versions = {}
    for lib in ("torch", "transformers", "numpy", "triton"):
        try:
            versions[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine or cpu_name(),
            "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "git": rev, **versions}


def save(name: str, machine: str, res: dict, md: str, out_dir: Path = RESULTS) -> Path:
    """Write <out_dir>/<name>-<machine>.json (with its provenance) and .md; returns the stem."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {**res, "provenance": provenance(machine)}
    stem = out_dir / f"{name}-{slug(machine)}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2) + "\n")
    stem.with_suffix(".md").write_text(md + "\n")
    print(f"wrote {stem}.json and .md")
    return stem
