#!/usr/bin/env bash
# Installs examples/node's dependencies exactly as its package-lock.json pins them
# (`npm ci`), once per change of the lock. Without node and npm it warns and exits 0:
# the example's test then skips (fails under CI=true), like the MongoDB tests
# without FerretDB.
set -euo pipefail
cd "$(dirname "$0")/../examples/node"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "install-node-example: node/npm not installed; the Node example test will be skipped (CI=true fails it)" >&2
  exit 0
fi
stamp=node_modules/.jobwire-lock-stamp
if [ -f "$stamp" ] && cmp -s package-lock.json "$stamp"; then exit 0; fi
# --ignore-scripts: no dependency needs an install script (protobufjs' only checks
# versions of its own CLI); npm ci fails when package-lock.json and package.json differ.
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
cp package-lock.json "$stamp"
