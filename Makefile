# The two commands: `make demo` and `make test` (each runs the idempotent setup first).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all bench clean lab-down

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/nodemesh demo

test: setup
	$(PY) -m pytest -q tests

test-all: setup
	$(PY) -m pytest -q -m '' tests

bench: setup
	$(VENV)/bin/nodemesh bench

lab-down:
	-$(VENV)/bin/nodemesh lab down

clean: lab-down
	rm -rf $(VENV) build *.egg-info fastpath/*.c fastpath/*.so
