#!/usr/bin/env bash
# Installs uv (the installer that reads uv.lock) from PyPI into a cache outside the
# repository, once, with the machine's python3 and pip. `--path` prints the binary's
# path and installs nothing. uv is pinned here, not in uv.lock: it reads the lock.
set -euo pipefail
VERSION=0.13.9
PYTHON="${PYTHON:-python3}"
CACHE="${JOBWIRE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jobwire}"
DEST="$CACHE/uv-$VERSION"
BIN="$DEST/bin/uv"

if [ "${1:-}" = "--path" ]; then echo "$BIN"; exit 0; fi
if [ -x "$BIN" ] && "$BIN" --version >/dev/null 2>&1; then exit 0; fi

echo "install-uv: installing uv $VERSION into $DEST (once)" >&2
tmp="$DEST.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
PIP_ROOT_USER_ACTION=ignore "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
  --target "$tmp" "uv==$VERSION"
rm -rf "$DEST"
mv "$tmp" "$DEST"
"$BIN" --version >&2
