# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv and install what they need; nothing has to be installed by hand.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test chaos soak lint bench clean

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

## chaos: the extended scenarios (`-m extended`, ~6 minutes), then the long chaos profile: >= 104 faults
## of 13 kinds, >= 200,000 writes, every one accounted for (45-60 minutes on two cores; stops by itself).
## Report: .chaos/long/chaos-report.md and .json
CHAOS_SEED ?= random
CHAOS_BROKER ?= redis
chaos: $(STAMP)
	@status=0; \
	$(PY) -m pytest -q -m extended || status=1; \
	CRR_CHAOS_PROFILE=long CRR_CHAOS_SEED=$(CHAOS_SEED) CRR_CHAOS_BROKER=$(CHAOS_BROKER) \
		CRR_CHAOS_REPORT=$(CURDIR)/.chaos/long $(PY) -m pytest -q -s tests/test_chaos.py || status=1; \
	exit $$status

## soak: 500 writes/s for 30 minutes with a fault every minute or so; memory drift and latency per 5 minutes
## Report: .chaos/soak/chaos-report.md and .json
soak: $(STAMP)
	CRR_CHAOS_PROFILE=soak CRR_CHAOS_SEED=$(CHAOS_SEED) CRR_CHAOS_BROKER=redis \
		CRR_CHAOS_REPORT=$(CURDIR)/.chaos/soak $(PY) -m pytest -q -s tests/test_chaos.py

## lint: ruff and mypy --strict on the package
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

## bench: benchmarks against raw confluent-kafka, Celery and redis-py (never part of `make test`)
## One drain curve: make bench BENCH_ARGS="--only bench_drain --kafka apache --curve size" (size, batch,
## targets, non-idempotent, safety; see docs/performance.md "How to run")
bench: $(STAMP)
	$(PY) -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
