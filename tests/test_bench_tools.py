"""The benchmark tools' own behaviour, on the CPU: what kernel_bench reports when a baseline fails, that --merge
is checked before measuring, gpu_checks' and gpu_session.sh's exit statuses, kernel_report's command line and
plot legend, where --fake writes, and --help descriptions that end where their paragraph does."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import kernel_bench as KB  # noqa: E402
import kernel_report as R  # noqa: E402


def test_failed_baseline_leaves_its_shape_without_speedups():
    """A cuBLAS baseline that fails makes no speedups for its shape (they read 1.00x and met goals on them)."""
    bench = KB.Bench(set())
    bench.time_ms = lambda fn: 0.5                       # do_bench stand-in: every case takes 0.5 ms

    def oom():
        raise RuntimeError("CUDA out of memory")
    shape = (2048, 4096, 4096)
    base = bench.case(shape, "cublas_bf16", lambda: None, oom, None)
    assert base["ms"] is None and "out of memory" in base["note"]
    for kernel in ("w8a8_fused", "block_sparse_90"):
        row = bench.case(shape, kernel, lambda: None, lambda: (True, "ok"), base["ms"])
        assert row["ms"] == 0.5 and row["speedup_vs_bf16"] is None
    md = R.markdown(bench.rows, {"card": "x"})
    assert "| 2048 | 4096 | 4096 | - | - | - |" in md
    goals = {g["goal"]: g for g in R.check_goals(bench.rows)}
    assert goals["W8A8 fused >= 1.3x at M=2048, N=K=4096"]["met"] is None
    assert "| W8A8 fused >= 1.3x at M=2048, N=K=4096 | 0 | - | not run |" in md
    ok = KB.Bench(set())                                  # a baseline that ran: speedups against it, itself 1.0
    ok.time_ms = lambda fn: 0.5
    b = ok.case(shape, "cublas_bf16", lambda: None, lambda: (True, "ok"), None)
    assert b["speedup_vs_bf16"] == 1.0
    assert ok.case(shape, "w8a8_fused", lambda: None, lambda: (True, "ok"), 1.0)["speedup_vs_bf16"] == 2.0


def test_plot_legend_names_every_bar_group(tmp_path, monkeypatch):
    """matplotlib leaves labels that start with '_' out of a legend: torch._int_mm's bars had no entry."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figs, close = [], plt.close
    monkeypatch.setattr(plt, "close", figs.append)
    assert R.plot(R.fake_results([(1, 4096, 4096), (2048, 4096, 4096)]), {"card": "fake"}, tmp_path / "p.png") is None
    ax = figs[0].axes[0]
    drawn = [c.get_label() for c in ax.containers]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == drawn
    assert drawn == [t for _, t in R.KERNELS[1:]]
    close(figs[0])


def fake_bench(tmp_path, *args) -> int:
    return KB.main(["--fake", "--out-dir", str(tmp_path), *args])


def test_merge_is_checked_before_measuring(tmp_path, monkeypatch, capsys):
    """A --merge that cannot merge is refused before anything is timed (on a GPU the session's measurements
    were lost to a ValueError after them), and one that fails after measuring writes the results unmerged."""
    assert fake_bench(tmp_path, "--quick") == 0
    earlier = (tmp_path / "kernels-fake-card-fake.json").read_text()
    measure = R.fake_results

    def must_not_measure(shapes):
        pytest.fail("measured before the merge was checked")
    monkeypatch.setattr(R, "fake_results", must_not_measure)
    capsys.readouterr()
    assert fake_bench(tmp_path, "--m", "128", "--merge") == 2          # a full-sweep run into a quick file
    err = capsys.readouterr().err
    assert "merge like with like" in err and "nothing was measured" in err
    assert (tmp_path / "kernels-fake-card-fake.json").read_text() == earlier

    def measure_then_change_earlier(shapes):    # the earlier file turns into a full run's while this one times
        path = tmp_path / "kernels-fake-card-fake.json"
        data = json.loads(path.read_text())
        data["meta"]["quick"] = False
        path.write_text(json.dumps(data))
        return measure(shapes)
    monkeypatch.setattr(R, "fake_results", measure_then_change_earlier)
    assert fake_bench(tmp_path, "--quick", "--m", "1", "--merge") == 1
    assert "written unmerged" in capsys.readouterr().err
    unmerged = json.loads((tmp_path / "kernels-fake-card-fake-unmerged.json").read_text())
    assert {r["m"] for r in unmerged["results"]} == {1}
    assert (tmp_path / "kernels-fake-card-fake-unmerged.md").exists()
    assert json.loads((tmp_path / "kernels-fake-card-fake.json").read_text())["meta"]["quick"] is False  # untouched


def test_fake_run_without_out_dir_stays_out_of_the_results(tmp_path, monkeypatch, capsys):
    """--fake without --out-dir writes into a new temporary folder, never among bench/results' measurements."""
    import tempfile
    results = ROOT / "bench" / "results"
    before = set(results.iterdir())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    try:
        assert KB.main(["--fake", "--quick", "--only", "sparse24"]) == 0
        assert set(results.iterdir()) == before
        written = list(tmp_path.glob("kernel_bench-fake-*/kernels-fake-card-fake.json"))
        assert len(written) == 1 and str(written[0]) in capsys.readouterr().out
    finally:                                  # (before the fix it wrote there: leave the folder as it was)
        for p in set(results.iterdir()) - before:
            p.unlink()


def test_gpu_checks_exit_status(tmp_path, monkeypatch):
    """bench/gpu_checks.py exits 1 where a case mismatches (gpu_session.sh's step said 'exit 0'), 0 where all are
    exact, and writes its JSON either way."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    import gpu_checks
    rows = [{"case": "act_quant", "q_vs_numpy": 0, "scale_vs_numpy": 0},
            {"case": "int8_gemm tiled", "mismatches": 0, "max_abs_diff": 0.0}]
    monkeypatch.setattr(gpu_checks, "checks", lambda dev: rows)
    assert gpu_checks.main(["--out", str(tmp_path / "ok.json")]) == 0
    rows[1]["mismatches"] = 3
    assert gpu_checks.main(["--out", str(tmp_path / "bad.json")]) == 1
    assert json.loads((tmp_path / "bad.json").read_text())["all_exact"] is False


def test_kernel_report_command_line(tmp_path, capsys):
    """kernel_report.py writes a committed JSON's report again into a chosen folder (it had no command line:
    --help printed nothing); under CUDA-graph timing the cells name do_bench_cudagraph."""
    src = ROOT / "bench" / "results" / "kernels-nvidia-h200-cudagraph.json"
    with pytest.raises(SystemExit) as e:
        R.main(["--help"])
    assert e.value.code == 0 and "--out-dir" in capsys.readouterr().out
    assert R.main([str(src), "--out-dir", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kernels-nvidia-h200-cudagraph.md",
                                                          "kernels-nvidia-h200-cudagraph.png"]
    data = json.loads(src.read_text())
    md = (tmp_path / "kernels-nvidia-h200-cudagraph.md").read_text()
    assert md == R.markdown(data["results"], data["meta"])
    assert "Timing: CUDA-graph replay" in md and "(median of triton.testing.do_bench_cudagraph)" in md
    assert "| 8192 | 8192 | 8192 |" in md and "## Goals" in md
    assert "(median of triton.testing.do_bench)" in R.markdown(data["results"], {**data["meta"], "timing": "eager"})
    (tmp_path / "bad.json").write_text("{}")
    assert R.main([str(tmp_path / "bad.json"), "--out-dir", str(tmp_path / "x")]) == 2
    assert "not a kernel_bench results file" in capsys.readouterr().err


# (script, how its parser is reached): "argv" takes parse_args/main(argv), "sys.argv" reads sys.argv
HELP = [("kernel_bench", "parse_args"), ("llama_gpu", "parse_args"), ("llama_generate", "parse_args"),
        ("moe_gpu", "parse_args"), ("gpu_checks", "main"), ("minilm_cpu", "main"), ("smollm2_numpy", "main"),
        ("smollm2_quant", "sys.argv"), ("smollm2_moe_quant", "sys.argv"), ("smollm2_hessian_runs", "sys.argv"),
        ("smollm2_memory", "sys.argv"), ("smollm2_save", "sys.argv"), ("compile_time", "main"),
        ("smollm2_beams", "main"), ("seq2seq_cpu", "sys.argv"), ("whisper_cpu", "sys.argv"),
        ("cpu_int8", "main")]


def test_help_descriptions_are_whole_paragraphs(monkeypatch, capsys):
    """Each bench script's --help describes it with its docstring's whole first paragraph (the first line cut
    sentences in half; some had no description), and the scripts that wrote over committed results take
    --out-dir and --name."""
    import importlib
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    for name, how in HELP:
        mod = importlib.import_module(name)
        with pytest.raises(SystemExit) as e:
            if how == "sys.argv":
                monkeypatch.setattr(sys, "argv", [f"{name}.py", "--help"])
                mod.main()
            else:
                getattr(mod, how)(["--help"])
        assert e.value.code == 0, name
        out = " ".join(capsys.readouterr().out.split())
        first = " ".join(mod.__doc__.strip().split("\n\n")[0].split())
        assert first in out, (name, out[:400])
        if name in ("smollm2_memory", "smollm2_save", "smollm2_hessian_runs"):
            assert "[--out-dir OUT_DIR] [--name NAME]" in out, name


def test_smollm2_generate_calls_one_at_a_time_drop_each_prompts_padding():
    """--one-at-a-time runs each prompt alone: its left padding dropped, its mask all ones; without it, the batch
    as one call."""
    from types import SimpleNamespace

    import smollm2_generate
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13]])
    mask = (ids != 0).long()
    enc = SimpleNamespace(input_ids=ids, attention_mask=mask)
    ((i, m),) = smollm2_generate.generate_calls(enc, False)
    assert i is ids and m is mask
    calls = smollm2_generate.generate_calls(enc, True)
    assert [c[0].tolist() for c in calls] == [[[5, 6]], [[7, 8, 9, 10]], [[11, 12, 13]]]
    assert all(m.tolist() == [[1] * i.shape[1]] and m.dtype == mask.dtype for i, m in calls)


def test_cpu_int8_quick_run(capsys):
    """bench/cpu_int8.py --quick times both int8 paths (each checked exact inside) and writes nothing."""
    import cpu_int8
    if not cpu_int8.numerics.int_mm_exact():
        pytest.skip("torch._int_mm is not exact on this CPU: the bench refuses to run")
    before = sorted(p.name for p in cpu_int8.Path(cpu_int8.__file__).parent.joinpath("results").iterdir())
    cpu_int8.main(["--quick", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| SmolLM2-135M | gate/up | 128 | 1536 | 576 |" in out and "W8A8 linear, _int_mm" in out
    assert "| fp32 sgemm | fp32 linear |" in out
    assert sorted(p.name for p in cpu_int8.Path(cpu_int8.__file__).parent.joinpath("results").iterdir()) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals on a machine without a GPU")
def test_gpu_session_refuses_up_front(tmp_path):
    """gpu_session.sh rejects an unknown part before creating OUT_DIR, and refuses without a CUDA device
    (it ran its steps into their time limits and exited 0)."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    script = str(ROOT / "bench" / "gpu_session.sh")
    p = subprocess.run(["bash", script, str(tmp_path / "out"), "bogus"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert p.returncode == 2 and "unknown part 'bogus'" in p.stderr and not (tmp_path / "out").exists()
    p = subprocess.run(["bash", script, str(tmp_path / "out"), "e2e"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert p.returncode == 2 and "no CUDA device" in p.stderr, p.stdout + p.stderr
    assert not (tmp_path / "out").exists()
