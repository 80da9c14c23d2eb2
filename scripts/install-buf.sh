#!/usr/bin/env bash
# Builds buf (protobuf lint and breaking-change checks) into a cache outside the
# repository, once, from the Go module proxy. `--path` prints the binary's path and
# builds nothing. Unlike FerretDB, buf's published module builds as it is, so a
# plain `go install <module>@<version>` is enough (one exact version: no listing).
set -euo pipefail
VERSION=v1.75.0
CACHE="${JOBWIRE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jobwire}"
DEST="$CACHE/buf-$VERSION"
BIN="$DEST/buf"

if [ "${1:-}" = "--path" ]; then echo "$BIN"; exit 0; fi
if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then exit 0; fi
GO=$(command -v go || true)
[ -n "$GO" ] || { [ -x /usr/local/go/bin/go ] && GO=/usr/local/go/bin/go; }
if [ -z "$GO" ]; then
  echo "install-buf: Go is not installed; it is needed to build buf (make lint runs buf)" >&2
  exit 1
fi

mkdir -p "$DEST"
echo "install-buf: building buf $VERSION into $DEST (a few minutes, once)" >&2
# GOBIN into a scratch folder first, so an interrupted build never leaves a half binary.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
GOBIN="$tmp" GOFLAGS="${GOFLAGS:--buildvcs=false}" "$GO" install "github.com/bufbuild/buf/cmd/buf@$VERSION"
mv "$tmp/buf" "$BIN"
"$BIN" --version >&2
