# jobwire: every target installs what it needs into .venv first (Python >= 3.11).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard proto/jobwire/v1/*.proto)
GEN    := proto
# protoc finds its mypy plugins (protoc-gen-mypy*) in the venv.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install proto proto-check run serve bridge test lint fmt bench ferretdb promtool clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Regenerates the committed Python stubs and .pyi type stubs from proto/.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=$(GEN) --mypy_out=quiet:$(GEN) $(PROTOS)
	$(BIN)/python -m grpc_tools.protoc -Iproto --grpc_python_out=$(GEN) --mypy_grpc_out=quiet:$(GEN) proto/jobwire/v1/job_service.proto

# Fails when the committed stubs do not match proto/.
proto-check: $(STAMP)
	@tmp=$$(mktemp -d); \
	{ $(BIN)/python -m grpc_tools.protoc -Iproto --python_out=$$tmp --mypy_out=quiet:$$tmp $(PROTOS) && \
	  $(BIN)/python -m grpc_tools.protoc -Iproto --grpc_python_out=$$tmp --mypy_grpc_out=quiet:$$tmp proto/jobwire/v1/job_service.proto; } || \
	  { echo "protoc failed"; rm -rf $$tmp; exit 1; }; \
	for f in $$(cd $$tmp && find . -type f); do \
	  cmp -s "$$tmp/$$f" "$(GEN)/$$f" || { echo "stale stub: $(GEN)/$$f (run make proto)"; rm -rf $$tmp; exit 1; }; \
	done; rm -rf $$tmp; echo "stubs match proto/"

# The service and the HTTP bridge together, embedded store in ./data by default.
run: $(STAMP)
	$(BIN)/jobwire run

serve: $(STAMP)
	$(BIN)/jobwire serve

bridge: $(STAMP)
	$(BIN)/jobwire bridge

# FerretDB (MongoDB wire protocol, SQLite backend) for the MongoDB adapter's tests.
ferretdb:
	@bash scripts/install-ferretdb.sh

# promtool (Prometheus) for `promtool check rules` on deploy/observability, built once.
promtool:
	@bash scripts/install-promtool.sh

test: $(STAMP) ferretdb promtool
	JOBWIRE_FERRETDB_BIN=$$(bash scripts/install-ferretdb.sh --path) \
	JOBWIRE_PROMTOOL_BIN=$$(bash scripts/install-promtool.sh --path) \
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ferretdb
	JOBWIRE_FERRETDB_BIN=$$(bash scripts/install-ferretdb.sh --path) $(BIN)/python -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
