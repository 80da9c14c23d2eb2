#!/usr/bin/env bash
# Builds Prometheus' promtool (for `promtool check rules`) from the Go module proxy into
# a cache outside the repository, once per machine. `--path` prints the binary's path
# and builds nothing.
#
# Prometheus v3 publishes its Go module as v0.3xx.y (v0.316.0 is Prometheus 3.16). We
# `go get` that exact version into a scratch module and build cmd/promtool from it, so
# no version listing is needed (some module proxies refuse it).
set -euo pipefail
VERSION=v0.316.0
CACHE="${JOBWIRE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jobwire}"
DEST="$CACHE/promtool-$VERSION"
BIN="$DEST/promtool"

if [ "${1:-}" = "--path" ]; then echo "$BIN"; exit 0; fi
if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then exit 0; fi
if ! command -v go >/dev/null 2>&1; then
  echo "install-promtool: Go is not installed; the alert-rule check cannot run (CI=true fails it)" >&2
  exit 0
fi

mkdir -p "$DEST"
echo "install-promtool: building promtool ($VERSION) into $DEST (a few minutes, once)" >&2
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"
go mod init jobwire-promtool-build >/dev/null 2>&1
go get "github.com/prometheus/prometheus/cmd/promtool@$VERSION"
go build -o "$BIN.tmp" github.com/prometheus/prometheus/cmd/promtool
mv "$BIN.tmp" "$BIN"
"$BIN" --version | head -n 1 >&2
