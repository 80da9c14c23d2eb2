#!/usr/bin/env bash
# Installs Prometheus' promtool (for `promtool check rules`) into a cache outside the
# repository, once per machine. `--path` prints the binary's path and installs nothing.
#
# Fast path (seconds): on Debian, promtool is taken out of Debian's `prometheus` package
# (`apt-get download` + `dpkg-deb -x`: no service installed, nothing started). Otherwise
# (or with JOBWIRE_PROMTOOL_FROM=go) it is built from the Go module proxy: a cold build
# of Prometheus takes many minutes on 2 cores, too long for every fresh CI machine.
#
# Prometheus v3 publishes its Go module as v0.3xx.y (v0.316.0 is Prometheus 3.16). We
# `go get` that exact version into a scratch module and build cmd/promtool from it, so
# no version listing is needed (some module proxies refuse it).
set -euo pipefail
VERSION=v0.316.0
CACHE="${JOBWIRE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jobwire}"
DEST="$CACHE/promtool-$VERSION"
BIN="$DEST/promtool"
DEB_BIN="$CACHE/promtool-debian/promtool"

usable() { [ -x "$1" ] && "$1" --version >/dev/null 2>&1; }
if [ "${1:-}" = "--path" ]; then
  if usable "$BIN" || ! usable "$DEB_BIN"; then echo "$BIN"; else echo "$DEB_BIN"; fi
  exit 0
fi
if usable "$BIN" || usable "$DEB_BIN"; then exit 0; fi

if [ "${JOBWIRE_PROMTOOL_FROM:-debian}" = debian ] && command -v apt-get >/dev/null 2>&1; then
  deb=$(mktemp -d)
  ( cd "$deb" && { apt-get download prometheus >/dev/null 2>&1 ||
      { apt-get update -qq >/dev/null 2>&1 && apt-get download prometheus >/dev/null 2>&1; }; } &&
    dpkg-deb -x prometheus_*.deb root ) || true
  if usable "$deb/root/usr/bin/promtool"; then
    mkdir -p "$(dirname "$DEB_BIN")"
    mv "$deb/root/usr/bin/promtool" "$DEB_BIN"
    rm -rf "$deb"
    "$DEB_BIN" --version | head -n 1 >&2
    exit 0
  fi
  rm -rf "$deb"
  echo "install-promtool: Debian's prometheus package not available; building from Go" >&2
fi
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
