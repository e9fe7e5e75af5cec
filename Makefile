# skillgate — two commands: `make run` (the local stack) and `make test` (lint, types, unit, integration).
# Both install what they need on a fresh machine: .venv/ (Python deps pinned in requirements.lock)
# and the Kafka jars (resolved from Maven Central by deploy/kafka/pom.xml on first start).
# The integration tests also fetch Keycloak (deploy/keycloak/pom.xml, ~177 MB once, cached in
# .cache/keycloak/) and run it with a Java 21+ JDK (found under /usr/lib/jvm, or
# SKILLGATE_KEYCLOAK_JAVA_HOME); see tests/integration/keycloak.py.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit integration bench clean lock install

install: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	@command -v java >/dev/null || { echo "error: java (17+) is required to run Kafka" >&2; exit 1; }
	@command -v mvn >/dev/null || { echo "error: mvn is required to fetch Kafka from Maven Central" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "uv==0.9.*"
	$(BIN)/uv pip install -q --python $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

# Regenerate the pinned lock after changing dependencies in pyproject.toml.
lock:
	$(BIN)/uv pip compile -q pyproject.toml --extra dev -o requirements.lock

run: $(STAMP)
	$(BIN)/skillgate stack

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

test: lint typecheck unit integration

bench: $(STAMP)
	$(BIN)/python -m bench.overhead

clean:
	rm -rf $(VENV) .cache .mypy_cache .ruff_cache .pytest_cache
