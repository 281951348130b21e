"""Every kernel x every autotune config compiles for sm_90 (H100/H200) on this GPU-less machine, with
Triton's own ptxas: the code paths only a GPU runs (TMA descriptors, wgmma tiles, split-K atomics, the
epilogue halves) are compiled here, and the cubins' resource use is checked."""
import json
import os
import subprocess
import sys

import pytest

from slimfx.kernels import aot

# make test runs pytest-xdist with --dist loadgroup: the tests reading the compile of every variant (a session
# fixture, ~2 minutes of ptxas) stay on one worker, so it happens once; the other specializations' compiles
# (their own subprocesses) go to any worker
one_compile = pytest.mark.xdist_group("aot")

SPILL_BYTES_OK = 128     # a few spilled registers (the TMA kernel's widest tiles with a heavy epilogue);
                         # more means an epilogue or tile change blew the register budget


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """(return code, per-variant results) of one compile of every variant, kept in a file of this pytest run
    that its xdist workers share: should the tests using it ever land on two workers (xdist's grouping
    silently stopped working with pytest 9.2, pytest-dev/pytest-xdist#1386), the second reads the first's."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root    # this run's, not an earlier one's
    out, run = root / "aot.json", root / "aot-run.json"
    if not run.exists():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}   # the compiler, not the interpreter
        p = subprocess.run([sys.executable, "-m", "slimfx.kernels.aot", "--json", str(out)], env=env,
                           capture_output=True, text=True, timeout=900)
        run.write_text(json.dumps([p.returncode, p.stderr[-3000:]]))
    returncode, stderr = json.loads(run.read_text())
    assert out.exists(), stderr
    return returncode, json.loads(out.read_text())


@pytest.mark.parametrize("flag", ["--aligned-m", "--m1"])
def test_every_variant_compiles_as_other_m_specialize(flag):
    """Triton compiles M = 16, 2048, ... with M known to be a multiple of 16, and M = 1 as a constant: a
    config that fails to compile only then would crash the autotuner on the GPU (it skips only resource
    errors; seen: 2:4 tiles that compiled one way only). Without the disassembly, which would take 40% of the
    time and which only the SASS tests below read."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-m", "slimfx.kernels.aot", flag, "--no-sass"], env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0 and " 0 failed to compile" in p.stdout, p.stdout[-3000:]


@one_compile
def test_every_variant_compiles_for_sm90(compiled):
    returncode, results = compiled
    failed = [(r["family"], r["config"], r["error"]) for r in results if not r["ok"]]
    assert not failed and returncode == 0
    families = {r["family"] for r in results}
    assert {"int8_gemm tiled", "int8_gemm tma", "int8_gemm gluon", "block_sparse i8 64x64 gluon",
            "weight_only int8 gemv", "weight_only int8 dot",
            "block_sparse bf16 64x64 tma", "block_sparse i8 128x128 tma", "sparse24 gemv", "sparse24 dot",
            "grouped weight_only int8", "grouped weight_only int4"} <= families


@one_compile
def test_resources(compiled):
    _, results = compiled
    spills = [(r["family"], r["config"], r["stack"]) for r in results if (r["stack"] or 0) > SPILL_BYTES_OK]
    assert not spills
    assert all(r["shared"] <= aot.SHARED_LIMIT for r in results)   # 227 KB: the most one sm_90 block may use


@one_compile
def test_the_instructions_the_designs_rely_on(compiled):
    _, results = compiled
    for r in results:
        if r["family"].endswith(" tma"):
            assert {"tma", "wgmma"} <= set(r["uses"]), r        # TMA copies feeding Hopper's async MMA
        if "SPLIT_K=" in r["config"] and "SPLIT_K=1" not in r["config"]:
            assert "atomics" in r["uses"], r                    # the split-K fix-up's tile counters
        if r["family"] == "weight_only int8 gemv":             # the magic-number conversion has no I2F
            assert ("I2F" in r["uses"]) == ("FAST_CVT=False" in r["config"]), r
        if r["family"].startswith("block_sparse bf16") and "wgmma" in r["uses"]:
            assert "sync-wgmma" not in r["uses"], r             # fp32 accumulators: wgmma stays in flight
        if r["family"].endswith(" gluon"):                     # the point of those kernels: wgmma in flight
            assert {"tma", "wgmma"} <= set(r["uses"]) and "sync-wgmma" not in r["uses"], r
        elif r["family"].startswith("int8_gemm") and "wgmma" in r["uses"]:
            # int32 accumulators: Triton 3.6 waits for each K step's wgmmas (why the TMA configs include
            # BLOCK_K = 256 and two programs per SM); when a Triton lifts that, this says to revisit them
            assert "sync-wgmma" in r["uses"], r


@one_compile
def test_xdist_keeps_the_group_together(request):
    """Under `make test` (pytest-xdist, --dist loadgroup) a grouped test's id carries its group, which is how
    xdist sends a group to one worker; pytest 9.2 broke that silently (see ``compiled``)."""
    if os.environ.get("PYTEST_XDIST_WORKER") and request.config.getoption("dist", "no") == "loadgroup":
        assert request.node.nodeid.endswith("@aot"), request.node.nodeid
