# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv and install what they need; nothing has to be installed by hand.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test chaos lint bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "Python 3.10+ is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,lint,bench]'
	@touch $(STAMP)

## demo: the main job end to end, with a Redis outage and its recovery
demo: $(STAMP)
	$(PY) -m celery_redis_retry.demo $(DEMO_ARGS)

## test: the whole suite, against real redis-server, Kafka-protocol brokers and Celery workers
test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

## chaos: the seeded chaos test on CHAOS_RUNS random seeds (default 20) on a Redis Celery broker (long)
CHAOS_RUNS ?= 20
CHAOS_BROKER ?= redis
chaos: $(STAMP)
	@for run in $$(seq $(CHAOS_RUNS)); do \
		echo "chaos run $$run of $(CHAOS_RUNS)"; \
		CRR_CHAOS_SEED=random CRR_CHAOS_BROKER=$(CHAOS_BROKER) $(PY) -m pytest -q -s tests/test_chaos.py \
			> .chaos-run.log 2>&1; status=$$?; \
		grep -E "chaos seed|passed|failed" .chaos-run.log; \
		if [ $$status -ne 0 ]; then echo "chaos run $$run failed: see .chaos-run.log"; exit 1; fi; \
	done

## lint: ruff and mypy --strict on the package
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## bench: benchmarks against raw confluent-kafka, Celery and redis-py (never part of `make test`)
bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
