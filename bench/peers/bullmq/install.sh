#!/usr/bin/env bash
# Installs what the BullMQ peer of `make bench` needs: redis-server (Debian) and Node
# when missing (apt-get, as root), and the pinned npm packages (package-lock.json,
# `npm ci`) into a cache outside the repository, once per lock file.
# On success prints the node_modules directory (the peer's NODE_PATH); otherwise
# prints why on stderr and exits 1, and the bench records that reason.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE="${JOBWIRE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jobwire}"

apt_install() {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || return 1
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"; } >&2
}

if ! command -v redis-server >/dev/null 2>&1 && ! apt_install redis-server; then
  echo "redis-server is not installed and could not be (apt-get install -y redis-server needs root and apt)" >&2
  exit 1
fi
if ! { command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; } && ! apt_install nodejs npm; then
  echo "node/npm are not installed and could not be (apt-get install -y nodejs npm needs root and apt)" >&2
  exit 1
fi

DEST="$CACHE/bullmq-peer-$(sha256sum "$HERE/package-lock.json" | cut -c1-16)"
if [ ! -f "$DEST/.installed" ]; then
  mkdir -p "$DEST"
  cp "$HERE/package.json" "$HERE/package-lock.json" "$DEST/"
  if ! (cd "$DEST" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error >&2); then
    echo "npm ci of bench/peers/bullmq failed (npm registry unreachable?)" >&2
    exit 1
  fi
  touch "$DEST/.installed"
fi
echo "$DEST/node_modules"
