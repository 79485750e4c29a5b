# The two commands: `make demo` and `make test` (each runs the idempotent setup first).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-all bench clean lab-down

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/nodemesh demo

# pytest exits 5 when it collects no test: say so instead of failing.
test: setup
	@$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests were collected"; exit 0; fi; exit $$rc

test-all: setup
	$(PY) -m pytest -q -m '' tests

bench: setup
	$(VENV)/bin/nodemesh bench

lab-down:
	-$(VENV)/bin/nodemesh lab down

clean: lab-down
	rm -rf $(VENV) build *.egg-info fastpath/*.c fastpath/*.so
