#!/usr/bin/env bash
# Debian's chromium for the dashboard's browser tests (Playwright drives it through
# executable_path; Playwright's own browser download is not used). Installed with apt
# when missing and we are root (CI); otherwise says so and leaves it: the browser
# tests then skip locally and fail under CI=true. `--path` prints the binary's path.
set -euo pipefail
if [ "${1:-}" = "--path" ]; then command -v chromium || echo /usr/bin/chromium; exit 0; fi
exec bash "$(dirname "$0")/apt-install.sh" chromium chromium fonts-dejavu-core
