# Development entry points. `make setup` builds .venv from nothing (fast when nothing changed).
#   make demo   set up, then run the built-in demo on real Landsat-8 imagery
#   make test   set up, then run the whole test suite (what CI runs)
#   make test-fast  set up, then run the unit tier only (no node processes, training or demo)
#   make bench  set up, then measure speed against the plain fp32 baseline
#   make lint   flake8 and pep257 as ament runs them

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.taco-requirements

.PHONY: setup demo test test-fast bench lint clean

setup: $(STAMP) $(VENV)/.taco-install
	@bash scripts/build_interfaces.sh $(VENV)
	@$(PY) -m taco_cvgl.demo.scene --fetch

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check pip==26.3

$(STAMP): requirements.txt requirements-nodeps.txt $(VENV)/bin/python
	$(PY) -m pip install --disable-pip-version-check --progress-bar off -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check --progress-bar off --no-deps \
		-r requirements-nodeps.txt
	@touch $@

# Editable install: console scripts (taco-cvgl, cvgl_node, ...) on the venv's PATH.
$(VENV)/.taco-install: setup.py $(STAMP)
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $@

demo: setup
	$(PY) -m taco_cvgl.cli.main demo

test: setup
	TACO_REQUIRE_GEOGRAPHIC_MSGS=1 $(PY) -m pytest -q test

test-fast: setup
	$(PY) -m pytest -q -m "not integration and not e2e" test

bench: setup
	$(PY) benchmarks/bench.py

lint: setup
	$(PY) -m pytest -q test/test_lint.py

clean:
	rm -rf build install log $(VENV)
