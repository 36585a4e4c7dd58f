# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing and installs dsdm into it. Where no NVIDIA GPU is present the CPU build of
# torch is pinned (torch==2.13.0), and the pin is repeated in the same pip call so no dependency can upgrade it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dsdm-installed
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch" || echo "torch==2.13.0")
EXTRAS ?= test
export HF_HUB_OFFLINE=1
export HF_DATASETS_OFFLINE=1

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[$(EXTRAS)]" "$(TORCH)"
	$(PY) -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if '$(TORCH)' == 'torch' or v.startswith('2.13.0') else 'torch was upgraded to ' + v)"
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dsdm demo --out runs/demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check dsdm tests benchmarks && $(VENV)/bin/ruff format --check dsdm tests

# Every benchmark script at its documented settings, one after another (tables on stdout; docs/benchmarks.md holds the
# recorded ones). The `bench` extra adds the reference packages (traker, data-selection) and psutil. Long: the dense
# and traker featurize arms take minutes on a CPU.
bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[bench]" "$(TORCH)"
	$(PY) benchmarks/signs.py
	$(PY) benchmarks/models.py
	$(PY) benchmarks/pool_memory.py
	$(PY) benchmarks/baselines.py
	$(PY) benchmarks/featurize.py

clean:
	rm -rf $(VENV) runs .pytest_cache
