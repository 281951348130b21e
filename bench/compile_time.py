"""Compile time on SmolLM2-135M (30 layers, dynamic batch and sequence): where it goes (capture, the passes,
shape propagation) with incremental shape propagation against a full rerun after every edit, both in this
process, and the compiled models' logits compared between the two (they must be equal). Writes
bench/results/compile_time-<cpu>.json and .md.

    python bench/compile_time.py
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cpu_name, description, save  # noqa: E402
from models import load_smollm2  # noqa: E402

import slimfx  # noqa: E402
from slimfx import passes as P  # noqa: E402
from slimfx.ir import propagate  # noqa: E402
from slimfx.ir.printer import format_table  # noqa: E402

PIPELINES = {
    "clean-up": lambda: list(P.CLEANUP),
    "W8A8 dynamic + Fuse": lambda: [P.Quantize(weights="int8", activations="dynamic"), P.Fuse()],
    "heads 25% + clean-up": lambda: [P.Prune(sparsity=0.25, pattern="heads"), *P.CLEANUP],
}


class _Counting:
    """Counts the nodes each propagation runs and times it; ``full`` makes every propagation that runs rerun
    every node (what slimfx did before propagation was incremental: an unchanged graph is still skipped)."""

    def __init__(self):
        self.full, self.nodes, self.seconds, self.runs = False, 0, 0.0, 0
        self._init, self._run = propagate._Prop.__init__, propagate._Prop.propagate_dont_convert_inputs
        counter = self

        def init(prop, module, mode, last=None, key=None):
            counter._init(prop, module, mode, None if counter.full else last, key)

        def run(prop, *args):
            t = time.perf_counter()
            out = counter._run(prop, *args)
            counter.seconds += time.perf_counter() - t
            counter.nodes += prop.ran
            counter.runs += 1
            return out
        propagate._Prop.__init__, propagate._Prop.propagate_dont_convert_inputs = init, run

    def reset(self, full: bool):
        self.full, self.nodes, self.seconds, self.runs = full, 0, 0.0, 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--pipelines", nargs="*", default=list(PIPELINES), choices=list(PIPELINES))
    ap.add_argument("--no-save", action="store_true")
    a = ap.parse_args(argv)

    model, tok = load_smollm2()
    enc = tok(["The quick brown fox jumps over the lazy dog because", "Compilers turn"], padding=True,
              return_tensors="pt")
    kw = dict(input_ids=enc.input_ids, attention_mask=enc.attention_mask, use_cache=False)
    counter = _Counting()
    res = {"cpu": cpu_name(), "torch": torch.__version__, "model": "SmolLM2-135M", "rows": []}
    rows = []
    for name in a.pipelines:
        logits = {}
        for full in (True, False):       # the baseline first: a warm process favours the second, a little
            counter.reset(full)
            t = time.perf_counter()
            cm = slimfx.compile(model, (), kw, dynamic=True, passes=PIPELINES[name](), backend="torch",
                                measure=False, progress=False)
            total = time.perf_counter() - t
            with torch.no_grad():
                logits[full] = cm(**kw).logits
            report = cm.report()
            passes_s = sum(r.seconds for r in report.records)
            row = {"pipeline": name, "propagation": "full" if full else "incremental", "compile_s": total,
                   "capture_s": report.capture_s, "passes_s": passes_s, "propagations": counter.runs,
                   "nodes_run": counter.nodes, "propagation_s": counter.seconds,
                   "graph_nodes": len(cm.graph.graph.nodes)}
            res["rows"].append(row)
            rows.append([name, row["propagation"], f"{total:.1f}", f"{report.capture_s:.1f}", f"{passes_s:.1f}",
                         str(counter.runs), str(counter.nodes), f"{counter.seconds:.2f}", str(row["graph_nodes"])])
        same = torch.equal(logits[True], logits[False])
        res["rows"][-1]["logits_equal_to_full"] = same
        if not same:
            raise SystemExit(f"{name}: incremental propagation changed the compiled model's logits")
    md = (f"SmolLM2-135M compile (torch.export with dynamic batch and sequence, then the passes, torch backend), "
          f"{res['cpu']}, torch {torch.__version__}. 'full' reruns every node whenever the graph changed "
          f"(slimfx before incremental propagation); 'incremental' reruns the nodes that changed and those "
          f"whose inputs' shapes did. The logits of the two compiles are equal.\n\n"
          + format_table(["pipeline", "propagation", "compile s", "capture s", "passes s", "propagations",
                          "nodes run", "propagation s", "graph nodes"], rows, "llrrrrrrr"))
    print(md)
    if not a.no_save:
        save("compile_time", res["cpu"], res, md)


if __name__ == "__main__":
    main()
