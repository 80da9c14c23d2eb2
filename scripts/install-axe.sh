#!/usr/bin/env bash
# Installs axe-core for the dashboard's accessibility test (tests/test_dashboard_a11y.py)
# exactly as tests/a11y/package-lock.json pins it.
set -euo pipefail
here="$(dirname "$0")"
source "$here/npm-ci-once.sh"
npm_ci_once "$here/../tests/a11y" install-axe "the dashboard's accessibility test"
