# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv and install what is missing; a torch that is already installed is kept.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all test-fast test-gpu lint bench clean

$(STAMP): pyproject.toml
	# Without ensurepip (Debian/Ubuntu pythons lacking python3-venv) the venv borrows the pip found below.
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV) \
	    || $(PYTHON) -m venv --system-site-packages --without-pip $(VENV)
	# Where $(PYTHON) is itself a virtualenv (the python3 of many GPU images), --system-site-packages skips its
	# packages: a .pth adds them after our own, so a CUDA torch installed there is found and kept.
	$(PYTHON) -c "import site; print('\n'.join(site.getsitepackages()))" \
	    > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/_parent_site.pth"
	# Keep any torch the machine already has (CUDA builds included); otherwise take 2.13.0.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	# DeepSpeed's setup.py imports torch, so it must build against the torch installed above.
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	# Every DeepSpeed process on CPU loads a C++ communication op, JIT-compiled on first use (about 2 minutes);
	# build it now, once, into this venv (not the user-wide ~/.cache that other clones share and lock), so no rank
	# builds it under a collective timeout or is killed holding its build lock. Bounded: a hung build never hangs make.
	timeout 1200 $(PY) -m pretrain.runtime.deepspeed_env \
	    || echo "warning: DeepSpeed's CPU communication op did not build (no C++ compiler?): each run will try again"
	touch $(STAMP)

demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" bash launch/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not long" tests

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu" tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	# the layers of docs/architecture.md, as import-linter contracts in pyproject.toml: an import that climbs fails
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) benchmarks/prep_throughput.py

clean:
	rm -rf demo outputs
