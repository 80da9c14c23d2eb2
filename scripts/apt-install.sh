#!/usr/bin/env bash
# apt-install.sh COMMAND PACKAGE...: installs Debian PACKAGEs when COMMAND is missing
# and we are root (CI); otherwise says so and leaves it: the tests that need COMMAND
# then skip locally and fail under CI=true.
set -euo pipefail
command=$1; shift
if command -v "$command" >/dev/null 2>&1; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "apt-install: $command is missing; install it (apt-get install -y $*) for the tests" >&2
  exit 0
fi
echo "apt-install: apt-get install -y $* (once per machine)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "$@" >/dev/null
command -v "$command" >/dev/null
