#!/usr/bin/env bash
# Installs examples/node's dependencies exactly as its package-lock.json pins them.
set -euo pipefail
here="$(dirname "$0")"
source "$here/npm-ci-once.sh"
npm_ci_once "$here/../examples/node" install-node-example "the Node example test"
