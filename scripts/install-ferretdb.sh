#!/usr/bin/env bash
# Builds FerretDB v1.24.2 (MongoDB wire protocol over SQLite) into a cache outside
# the repository, once. `--path` prints the binary's path and builds nothing.
#
# Plain `go install github.com/FerretDB/FerretDB/cmd/ferretdb@v1.24.2` is not enough:
# the published module lacks build/version/version.txt (a generated file), so that
# binary panics at start, and some module proxies refuse the version listing that
# `go install` asks for. So we fetch the same module with `go get` into a scratch
# module, write version.txt, and build it: the identical v1.24.2 code.
set -euo pipefail
VERSION=v1.24.2
CACHE="${JOBWIRE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jobwire}"
DEST="$CACHE/ferretdb-$VERSION"
BIN="$DEST/ferretdb"

if [ "${1:-}" = "--path" ]; then echo "$BIN"; exit 0; fi
if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then exit 0; fi
if ! command -v go >/dev/null 2>&1; then
  echo "install-ferretdb: Go is not installed; the MongoDB tests will be skipped (CI=true fails them)" >&2
  exit 0
fi

mkdir -p "$DEST"
echo "install-ferretdb: building FerretDB $VERSION into $DEST (about a minute, once)" >&2
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cd "$work"
go mod init jobwire-ferretdb-build >/dev/null 2>&1
go get "github.com/FerretDB/FerretDB/cmd/ferretdb@$VERSION" >/dev/null 2>&1 \
  || go get "github.com/FerretDB/FerretDB@$VERSION"
src=$(go list -m -f '{{.Dir}}' github.com/FerretDB/FerretDB)
cp -r "$src" ./ferretdb-src
chmod -R u+w ./ferretdb-src
echo "$VERSION" > ./ferretdb-src/build/version/version.txt
go mod edit -replace "github.com/FerretDB/FerretDB=./ferretdb-src"
go build -o "$BIN.tmp" github.com/FerretDB/FerretDB/cmd/ferretdb
mv "$BIN.tmp" "$BIN"
"$BIN" --version | head -n 1 >&2
