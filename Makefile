# kvmesh developer tasks. `make run` and `make test` work on a fresh Debian machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install integrations protos run test test-fast lint bench clean

install:
	./scripts/bootstrap.sh

# The real third-party software the integration tests run (vLLM, Envoy, LMCache, ...), each in its
# own virtualenv under .venvs/ (or $$KVMESH_VENVS): see scripts/integration_env.sh.
integrations: install
	./scripts/integration_env.sh $(basename $(notdir $(wildcard requirements/integrations/*.txt)))

protos: install
	$(PY) scripts/gen_protos.py

run: install
	$(PY) -m kvmesh up --demo

test: install integrations
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check kvmesh services tests bench scripts
	$(VENV)/bin/mypy kvmesh bench tests
	$(VENV)/bin/lint-imports

bench: install
	$(PY) -m bench.all $(BENCH_ARGS)

clean:
	rm -rf build .pytest_cache .mypy_cache .ruff_cache
