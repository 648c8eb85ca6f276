# `make run` sets up (if needed) and runs `anomaly up`; `make test` sets up (if needed) and runs every test;
# `make setup` only installs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup run test test-fast benchmark clean

$(STAMP): pyproject.toml deploy/setup.sh
	bash deploy/setup.sh $(VENV)
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything (torch==2.13.0 first)

run: $(STAMP)  ## the main job: `anomaly up` (broker, MLflow UI, worker, scheduler, a replayed SKAB fleet)
	$(BIN)/anomaly up

test: $(STAMP)  ## the whole test suite: unit, integration (real MLflow/Kafka), end to end (+ a real browser)
	-bash deploy/install-chromium.sh
	bash deploy/test.sh

test-fast: $(STAMP)  ## unit tests only
	$(BIN)/python -m pytest -q tests/unit

benchmark: $(STAMP)  ## the accuracy benchmark on SKAB, NAB and the SMD subset; rewrites the README table
	$(BIN)/python -m pipelines.benchmark --update-readme

clean:
	rm -rf $(VENV) .pytest_cache
