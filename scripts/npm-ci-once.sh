#!/usr/bin/env bash
# Sourced by the install-*.sh scripts: `npm_ci_once DIR WHO TEST` installs DIR's
# dependencies exactly as its package-lock.json pins them (`npm ci`), once per change
# of the lock. Without node and npm it warns and returns 0: TEST then skips (fails
# under CI=true), like the MongoDB tests without FerretDB.
npm_ci_once() {
  local dir=$1 who=$2 test=$3
  cd "$dir"
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    echo "$who: node/npm not installed; $test will be skipped (CI=true fails it)" >&2
    return 0
  fi
  local stamp=node_modules/.jobwire-lock-stamp
  if [ -f "$stamp" ] && cmp -s package-lock.json "$stamp"; then return 0; fi
  # --ignore-scripts: no dependency needs an install script (protobufjs' only checks
  # versions of its own CLI; axe-core has none); npm ci fails when package-lock.json
  # and package.json differ.
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
  cp package-lock.json "$stamp"
}
