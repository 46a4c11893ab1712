# Tiered image duplicate detection. `make install` then `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared
WEIGHTS_DIR ?= $(SHARED)/models
KERAS_HOME ?= $(HOME)/.keras
DATA ?=
OUT ?= out
PRESET ?= default
CONFIG ?=
ARGS ?=
export SHARED

.PHONY: install test reliability dedupe dedupe-usage bench eval weights browser clean airflow-example fastdup azurite

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

# the bad-input and fault suite alone (it is part of make test too)
reliability: install
	$(PY) -m pytest -q -m reliability

# (the usage checked first: a missing DATA= is said before any install)
dedupe-usage:
	@test -n "$(DATA)" || { echo "usage: make dedupe DATA=path/to/images [OUT=out] [PRESET=default|fast|high-recall|strict] [CONFIG=my.yaml] [ARGS='--set key=value']" >&2; exit 2; }

dedupe: dedupe-usage install weights
	DEDUPE_PROG=make $(PY) -m pipeline dedupe "$(DATA)" --out "$(OUT)" --preset "$(PRESET)" $(if $(CONFIG),--config "$(CONFIG)") $(ARGS)

# Seed the Keras cache from a local mirror of the weights, when there is one (offline machines).
weights: install
	@if [ -d "$(WEIGHTS_DIR)" ]; then DEDUPE_PROG=make $(PY) -m pipeline weights --from "$(WEIGHTS_DIR)"; \
	else echo "no weights mirror at $(WEIGHTS_DIR): Keras downloads the weights on first use (needs network)"; fi

# Chromium for the report's browser test (tests/test_report_browser.py skips without it): Debian's
# package, installed with apt when missing (needs root, as CI has).
browser:
	@if command -v chromium >/dev/null 2>&1; then echo "chromium: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else echo "chromium is missing: run 'sudo apt-get install chromium' (the browser test skips without it)" >&2; exit 1; fi

# Azurite (Azure's blob storage emulator, from npm) for tests/test_storage.py's az:// run; the test
# skips with a message without it
AZURITE_VERSION ?= 3.37.0
azurite: .azurite/.installed

.azurite/.installed:
	@command -v npm >/dev/null 2>&1 || { echo "npm is missing: the az:// test skips (apt-get install npm)" >&2; exit 1; }
	npm install --prefix .azurite --no-audit --no-fund --loglevel=error "azurite@$(AZURITE_VERSION)"
	touch $@

# make bench also compares with fastdup (bench/fastdup.py); without network for PyPI that one skips
bench: install weights
	-@$(MAKE) --no-print-directory fastdup
	$(PY) -m bench.run --out docs/benchmarks.md $(ARGS)

# fastdup, the peer in bench/fastdup.py, in its own virtualenv (its pinned dependencies stay out of
# ours); it runs offline-safe: SENTRY_OPT_OUT=1 FASTDUP_PRODUCTION=1 (no telemetry, no update check)
FASTDUP_VENV ?= .venv-fastdup
FASTDUP_VERSION ?= 2.54
fastdup: $(FASTDUP_VENV)/.installed

$(FASTDUP_VENV)/.installed:
	$(PYTHON) -m venv $(FASTDUP_VENV)
	$(FASTDUP_VENV)/bin/pip install -q "fastdup==$(FASTDUP_VERSION)"
	SENTRY_OPT_OUT=1 FASTDUP_PRODUCTION=1 $(FASTDUP_VENV)/bin/python -c "import fastdup"
	touch $@

eval: install
	$(PY) -m bench.eval --out docs/benchmarks.md $(ARGS)
	$(PY) -m bench.edit_types --out docs/benchmarks.md

# The Airflow DAG example (examples/airflow_dedupe_dag.py) run with dag.test(): twice over the same
# OUT (the second run is incremental), then over a missing folder (exit 2: the task must fail at
# once, its retries unused). Airflow lives in its own virtualenv (from PyPI, ~2 min).
AIRFLOW_VENV ?= .venv-airflow
AIRFLOW_VERSION ?= 2.10.5
AIRFLOW_DATA ?= $(SHARED)/data/labelled/imagededup_tests
AIRFLOW_OUT ?= out/airflow-example
airflow-example: install weights
	@test -x $(AIRFLOW_VENV)/bin/airflow || { $(PYTHON) -m venv $(AIRFLOW_VENV) && \
		$(AIRFLOW_VENV)/bin/pip install -q "apache-airflow==$(AIRFLOW_VERSION)"; }
	@home=$$(mktemp -d) && export AIRFLOW_HOME=$$home AIRFLOW__CORE__LOAD_EXAMPLES=False \
		AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=sqlite:///$$home/airflow.db \
		AIRFLOW_VAR_DEDUPE_BIN="$(abspath $(VENV))/bin/dedupe" AIRFLOW_VAR_DEDUPE_DATA="$(abspath $(AIRFLOW_DATA))" \
		AIRFLOW_VAR_DEDUPE_OUT="$(abspath $(AIRFLOW_OUT))" && \
		$(AIRFLOW_VENV)/bin/airflow db migrate > $$home/db.log 2>&1 && \
		for i in 1 2; do \
			$(AIRFLOW_VENV)/bin/python examples/run_airflow_example.py examples/airflow_dedupe_dag.py \
				> $$home/run-$$i.out 2> $$home/run-$$i.log || { tail -20 $$home/run-$$i.log; rm -rf $$home; exit 1; }; \
			tail -1 $$home/run-$$i.out; \
		done && \
		AIRFLOW_VAR_DEDUPE_DATA="$(abspath $(AIRFLOW_OUT))/no such folder" \
			$(AIRFLOW_VENV)/bin/python examples/run_airflow_example.py examples/airflow_dedupe_dag.py no-retry \
			> $$home/run-3.out 2> $$home/run-3.log || { tail -20 $$home/run-3.log; rm -rf $$home; exit 1; }; \
		tail -1 $$home/run-3.out; rm -rf $$home

clean:
	rm -rf $(VENV) $(AIRFLOW_VENV) $(FASTDUP_VENV) out .pytest_cache
