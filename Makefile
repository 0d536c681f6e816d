# The two commands a new user runs (see README.md). Each installs what it needs into .venv first.
VENV ?= .venv
RUN ?= demo

.PHONY: demo test install install-test lint clean

install:
	@scripts/install.sh

install-test:
	@scripts/install.sh test
	@scripts/install_browser.sh

demo: install
	$(VENV)/bin/steerray pipeline --config jobs/configs/demo/pipeline.yaml --run $(RUN)

test: install-test
	$(VENV)/bin/python -m pytest -q tests

lint: install-test
	$(VENV)/bin/ruff check steerray jobs tests bench

clean:
	rm -rf runs .pytest_cache
