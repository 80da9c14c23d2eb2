#!/usr/bin/env bash
# Installs axe-core for the dashboard's accessibility test (tests/test_dashboard_a11y.py)
# exactly as tests/a11y/package-lock.json pins it (`npm ci`), once per change of the lock.
# Without npm it warns and exits 0: the test then skips (fails under CI=true).
set -euo pipefail
cd "$(dirname "$0")/../tests/a11y"
if ! command -v npm >/dev/null 2>&1; then
  echo "install-axe: npm not installed; the dashboard's accessibility test will be skipped (CI=true fails it)" >&2
  exit 0
fi
stamp=node_modules/.jobwire-lock-stamp
if [ -f "$stamp" ] && cmp -s package-lock.json "$stamp"; then exit 0; fi
# --ignore-scripts: axe-core has no install script; npm ci fails when the lock and
# package.json differ.
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
cp package-lock.json "$stamp"
