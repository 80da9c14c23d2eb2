# jobwire: every target installs what it needs into .venv first (Python >= 3.11).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PROTOS := $(wildcard proto/jobwire/v1/*.proto)
GEN    := proto
# protoc finds its mypy plugins (protoc-gen-mypy*) in the venv.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install lock lock-upgrade proto proto-check proto-lint proto-release run serve bridge test lint fmt bench faults ferretdb promtool image-check examples-node axe chromium tmux curl clean

install: $(STAMP)

# Installs exactly what uv.lock pins (every dependency, direct and transitive, with
# hashes; the project itself editable, with its dev extra). A uv.lock that no longer
# matches pyproject.toml fails here, it is never re-resolved behind your back: run
# `make lock` and commit uv.lock. `--inexact` keeps what is in the venv but not in
# the lock (pip, tools a developer added by hand) instead of removing it.
UV := $(shell bash scripts/install-uv.sh --path)
$(STAMP): pyproject.toml uv.lock
	@bash scripts/install-uv.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(UV) lock --check --quiet || { echo "uv.lock is out of date with pyproject.toml: run 'make lock' and commit uv.lock" >&2; exit 1; }
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --inexact --extra dev --quiet
	touch $(STAMP)

# Updates uv.lock after a change to pyproject.toml's dependencies, keeping every pin
# that still fits; `make lock-upgrade` moves every pin to the newest allowed version.
lock:
	@bash scripts/install-uv.sh
	$(UV) lock

lock-upgrade:
	@bash scripts/install-uv.sh
	$(UV) lock --upgrade

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

# Proto hygiene with buf (built once from the Go module proxy, see buf.yaml): style
# lint, and no breaking change against the API as last released. The released API is
# the committed image proto/last-release.binpb, not the previous commit: CI checks a
# whole session's commits at once, and fields added since the release may still change.
BUF := $(shell bash scripts/install-buf.sh --path)
proto-lint:
	@bash scripts/install-buf.sh
	$(BUF) lint
	$(BUF) breaking --against proto/last-release.binpb
	@echo "buf: proto/ lint-clean, no breaking change since the last release"

# Run when a release is cut: the current proto/ becomes the breaking-change baseline.
proto-release:
	@bash scripts/install-buf.sh
	$(BUF) build --exclude-source-info -o proto/last-release.binpb

# The service, the HTTP bridge and the dashboard together, embedded store in ./data by default.
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

# Debian's chromium for the dashboard's browser tests (apt-get, as root, when missing).
chromium:
	@bash scripts/install-chromium.sh

# tmux, for the tests that read the CLI's output as a terminal shows it.
tmux:
	@bash scripts/apt-install.sh tmux tmux

# curl, for the README's quick start run as written (tests/test_examples.py).
curl:
	@bash scripts/apt-install.sh curl curl

# examples/node's npm dependencies, exactly as its package-lock.json pins them.
examples-node:
	@bash scripts/install-node-example.sh

# axe-core for the dashboard's accessibility test, exactly as tests/a11y/package-lock.json pins it.
axe:
	@bash scripts/install-axe.sh

test: $(STAMP) ferretdb promtool examples-node axe chromium tmux curl
	JOBWIRE_FERRETDB_BIN=$$(bash scripts/install-ferretdb.sh --path) \
	JOBWIRE_PROMTOOL_BIN=$$(bash scripts/install-promtool.sh --path) \
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Builds deploy/Dockerfile with buildah on a debootstrapped Debian base (no Docker) and
# runs serve + bridge from the image: health, a job, one callback per contract,
# HEALTHCHECK, writes only under the data dir. Root; see README "Image check".
image-check: $(STAMP)
	bash scripts/image-check.sh

lint: $(STAMP) proto-lint
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy examples/python  # scripts, not a package: checked on their own

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ferretdb chromium
	JOBWIRE_FERRETDB_BIN=$$(bash scripts/install-ferretdb.sh --path) $(BIN)/python -m bench

# Kills, freezes and starves the service, the bridge and the store under load (loopback
# only, about 2 minutes); fails when an acknowledged callback is lost or applied twice.
faults: $(STAMP) ferretdb
	JOBWIRE_FERRETDB_BIN=$$(bash scripts/install-ferretdb.sh --path) $(BIN)/python -m faults

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
