#!/usr/bin/env bash
# Debian's chromium for the dashboard's browser tests (Playwright drives it through
# executable_path; Playwright's own browser download is not used). Installed with apt
# when missing and we are root (CI); otherwise says so and leaves it: the browser
# tests then skip locally and fail under CI=true. `--path` prints the binary's path.
set -euo pipefail
if [ "${1:-}" = "--path" ]; then command -v chromium || echo /usr/bin/chromium; exit 0; fi
if command -v chromium >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "install-chromium: chromium is missing; install it (apt-get install -y chromium) for the dashboard tests" >&2
  exit 0
fi
echo "install-chromium: apt-get install -y chromium (once per machine)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
command -v chromium >/dev/null
