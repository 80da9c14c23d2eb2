#!/usr/bin/env bash
# `make image-check`: builds deploy/Dockerfile and runs the image, without Docker.
#
#  1. A Debian bookworm base with Python 3.11 (debootstrap minbase), imported as the
#     local image localhost/jobwire-base:bookworm. Its root filesystem is cached as a
#     tarball under ~/.cache/jobwire, and the image stays in buildah's store, so a
#     machine pays for debootstrap once.
#  2. `buildah bud --isolation chroot --build-arg PYTHON_IMAGE=<that base>` of the
#     unchanged Dockerfile (--layers: an unchanged step is reused on the next run). The
#     host's CA bundle is bind-mounted into the build steps (for a network that
#     intercepts TLS) and never written into the image.
#  3. `jobwire serve` and `jobwire bridge`, each in its own container of the built image
#     (`buildah run --isolation chroot --network host --user 10001:10001`), then from the
#     host: gRPC health SERVING, a job created over gRPC, one callback of each contract
#     through the bridge (scripts/image_check_probe.py), the image's own HEALTHCHECK
#     command exits 0 in both containers, both stop on SIGTERM, and the containers'
#     root filesystems changed only under the data directory.
#
# Needs root (as CI runs). Installs buildah and debootstrap with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=bookworm
INCLUDE=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
MIRROR="${JOBWIRE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
CACHE="${JOBWIRE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/jobwire}"
BASE_TAR="$CACHE/image-base-$SUITE-minbase.tar"
# Bump the tag when the import recipe below changes (the tarball stays valid).
BASE_IMAGE="localhost/jobwire-base:$SUITE-2"
IMAGE="localhost/jobwire:image-check"
CA_BUNDLE="${JOBWIRE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
PY="${PYTHON:-.venv/bin/python}"
DATA_DIR=var/lib/jobwire/data # the image's JOBWIRE_DATA_DIR, relative to its root
RUN=(buildah run --isolation chroot --network host --user 10001:10001)

START=$(date +%s)
say() { echo "image-check: $* (+$(($(date +%s) - START)) s)"; }
fail() {
  echo "image-check: FAILED: $*" >&2
  exit 1
}

WORK=$(mktemp -d /tmp/jobwire-image-check.XXXXXX)
PIDS=()
CTRS=()
# Each container runs in its own session (setsid below). buildah's chroot runtime puts
# the container's processes in process groups of their own inside that session, so a
# signal to buildah's group misses them: signal, and wait for, the whole session.
session_pids() { ps -eo pid=,sid= | awk -v s="$1" '$2 == s { print $1 }'; }
signal_session() {
  local pids
  pids=$(session_pids "$2")
  [ -z "$pids" ] || kill "-$1" $pids 2>/dev/null || true
}
cleanup() {
  local pid ctr
  for pid in "${PIDS[@]}"; do signal_session KILL "$pid"; done
  for ctr in "${CTRS[@]}"; do buildah rm "$ctr" >/dev/null 2>&1 || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# ----------------------------------------------------------------------- tools
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || fail "install ${missing[*]} (Debian packages) or run as root"
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -x "$PY" ] || fail "$PY missing: run make install first"

# -------------------------------------------------------------------- the base
if buildah inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  say "base $BASE_IMAGE: cached image"
else
  if [ ! -s "$BASE_TAR" ]; then
    say "debootstrap $SUITE ($INCLUDE): once per machine"
    mkdir -p "$CACHE"
    debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$WORK/rootfs" "$MIRROR" \
      >"$WORK/debootstrap.log" 2>&1 || {
      tail -n 30 "$WORK/debootstrap.log" >&2
      fail "debootstrap"
    }
    rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"*
    tar -C "$WORK/rootfs" --numeric-owner -cf "$BASE_TAR.tmp" .
    mv "$BASE_TAR.tmp" "$BASE_TAR"
    rm -rf "$WORK/rootfs"
  fi
  say "importing $BASE_TAR as $BASE_IMAGE"
  ctr=$(buildah from scratch)
  CTRS+=("$ctr")
  buildah add --quiet "$ctr" "$BASE_TAR" / >/dev/null
  # python:3.11-slim's Python (in /usr/local) carries no PEP 668 marker, Debian's does:
  # without it, pip in the Dockerfile behaves as it does on python:3.11-slim.
  buildah run --isolation chroot "$ctr" -- sh -c 'rm -f /usr/lib/python3*/EXTERNALLY-MANAGED'
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd '["python3"]' "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
  CTRS=()
fi
BASE_DONE=$(date +%s)

# ------------------------------------------------------------------- the build
say "buildah bud deploy/Dockerfile (PYTHON_IMAGE=$BASE_IMAGE)"
buildah bud --quiet --isolation chroot --layers --format docker --pull=never \
  --build-arg "PYTHON_IMAGE=$BASE_IMAGE" \
  --volume "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" \
  -f deploy/Dockerfile -t "$IMAGE" . >"$WORK/build.log" 2>&1 || {
  tail -n 40 "$WORK/build.log" >&2
  fail "buildah bud"
}
BUILD_DONE=$(date +%s)
say "built $IMAGE in $((BUILD_DONE - BASE_DONE)) s"

# The CA bundle stayed out of the image: the image's bundle is Debian's own.
ctr=$(buildah from --pull=never "$IMAGE")
CTRS+=("$ctr")
mnt=$(buildah mount "$ctr")
if cmp -s "$CA_BUNDLE" "$mnt/etc/ssl/certs/ca-certificates.crt"; then
  say "note: the host's CA bundle is Debian's own here, so its absence cannot be shown"
else
  echo "image-check: the host's CA bundle is not in the image: ok"
fi
buildah umount "$ctr" >/dev/null
buildah rm "$ctr" >/dev/null
CTRS=()

# --------------------------------------------------------------------- the run
read -r GRPC_PORT HTTP_PORT METRICS_PORT < <("$PY" - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
EOF
)
secret() { "$PY" -c 'import secrets; print(secrets.token_urlsafe(24))'; }
export BATCH_CALLBACK_SECRET API_KEY TRANSCODE_CALLBACK_TOKEN
BATCH_CALLBACK_SECRET=$(secret)
API_KEY=$(secret)
TRANSCODE_CALLBACK_TOKEN=$(secret)

serve_ctr=$(buildah from --pull=never "$IMAGE")
CTRS+=("$serve_ctr")
bridge_ctr=$(buildah from --pull=never "$IMAGE")
CTRS+=("$bridge_ctr")
serve_root=$(buildah mount "$serve_ctr")
bridge_root=$(buildah mount "$bridge_ctr")
# A first run in each container lets buildah create what it mounts at run time
# (/etc/hosts, /etc/resolv.conf, ...) before the marker: only jobwire's writes count.
"${RUN[@]}" "$serve_ctr" -- true
"${RUN[@]}" "$bridge_ctr" -- true
listing() { (cd "$1" && find . -xdev | sort); }
listing "$serve_root" >"$WORK/serve.before"
listing "$bridge_root" >"$WORK/bridge.before"
touch "$WORK/marker"
sleep 1.1 # mtime granularity: anything written from here on is newer than the marker

say "starting jobwire serve (127.0.0.1:$GRPC_PORT) and jobwire bridge (127.0.0.1:$HTTP_PORT)"
# setsid: each container's processes form their own group, stopped by that group id.
setsid "${RUN[@]}" \
  --env "JOBWIRE_GRPC_ADDR=127.0.0.1:$GRPC_PORT" \
  --env "JOBWIRE_METRICS_ADDR=127.0.0.1:$METRICS_PORT" \
  "$serve_ctr" -- /usr/bin/tini -- jobwire serve >"$WORK/serve.log" 2>&1 &
PIDS+=($!)
SERVE_PID=$!
setsid "${RUN[@]}" \
  --env "JOBWIRE_HTTP_ADDR=127.0.0.1:$HTTP_PORT" \
  --env "JOBWIRE_SERVICE_TARGET=127.0.0.1:$GRPC_PORT" \
  --env "JOBWIRE_PUBLIC_URL=http://127.0.0.1:$HTTP_PORT" \
  --env "BATCH_CALLBACK_SECRET=$BATCH_CALLBACK_SECRET" \
  --env "API_KEY=$API_KEY" \
  --env "TRANSCODE_CALLBACK_TOKEN=$TRANSCODE_CALLBACK_TOKEN" \
  "$bridge_ctr" -- /usr/bin/tini -- jobwire bridge >"$WORK/bridge.log" 2>&1 &
PIDS+=($!)
BRIDGE_PID=$!

show_logs() {
  echo "--- serve log" >&2
  tail -n 30 "$WORK/serve.log" >&2
  echo "--- bridge log" >&2
  tail -n 30 "$WORK/bridge.log" >&2
}
"$PY" scripts/image_check_probe.py "127.0.0.1:$GRPC_PORT" "http://127.0.0.1:$HTTP_PORT" || {
  show_logs
  fail "the running image did not answer as expected"
}

# The image's HEALTHCHECK command, as Docker would run it (CMD-SHELL), in each container.
healthcheck=$(buildah inspect --type image "$IMAGE" | "$PY" -c '
import json, sys
test = json.load(sys.stdin)["Docker"]["config"]["Healthcheck"]["Test"]
assert test[0] == "CMD-SHELL" and len(test) == 2, test
print(test[1])')
"${RUN[@]}" --env "JOBWIRE_HEALTHCHECK_ARGS=--target 127.0.0.1:$GRPC_PORT" \
  "$serve_ctr" -- /bin/sh -c "$healthcheck" || fail "HEALTHCHECK ($healthcheck) in the serve container"
echo "image-check: HEALTHCHECK '$healthcheck' (serve): exit 0"
"${RUN[@]}" --env "JOBWIRE_HEALTHCHECK_ARGS=--http http://127.0.0.1:$HTTP_PORT/readyz" \
  "$bridge_ctr" -- /bin/sh -c "$healthcheck" || fail "HEALTHCHECK ($healthcheck) in the bridge container"
echo "image-check: HEALTHCHECK '$healthcheck' (bridge --http .../readyz): exit 0"

# SIGTERM to each container's process group: both must stop cleanly within the grace.
stop() {
  local pid=$1 name=$2 i
  signal_session TERM "$pid"
  for i in $(seq 1 150); do
    [ -n "$(session_pids "$pid")" ] || break
    sleep 0.1
  done
  [ -n "$(session_pids "$pid")" ] && {
    show_logs
    fail "$name still running 15 s after SIGTERM"
  }
  wait "$pid" || true
  echo "image-check: $name stopped on SIGTERM"
}
stop "$BRIDGE_PID" bridge
stop "$SERVE_PID" serve
PIDS=()

# What the containers wrote: only under the data directory (the bridge: nothing).
# Written = a file or link modified after the marker, or any new path. (A directory's
# own mtime does not count: every `buildah run` touches /run for its mount points.)
changed() {
  {
    (cd "$1" && find . -xdev ! -type d -newer "$WORK/marker")
    listing "$1" | comm -13 "$WORK/$2.before" -
  } | sort -u | grep -v -E "^\./$DATA_DIR(/|\$)" || true
}
outside=$( {
  changed "$serve_root" serve | sed 's/^/serve: /'
  changed "$bridge_root" bridge | sed 's/^/bridge: /'
})
[ -z "$outside" ] || fail "files written outside $DATA_DIR:"$'\n'"$outside"
# The check can fail: a file the runtime user writes beside the data directory is seen.
"${RUN[@]}" "$bridge_ctr" -- sh -c ': > /var/lib/jobwire/image-check-canary'
changed "$bridge_root" bridge | grep -qx './var/lib/jobwire/image-check-canary' ||
  fail "the write check missed a canary file outside $DATA_DIR"
echo "image-check: the write check sees a canary written beside $DATA_DIR: ok"
written=$(cd "$serve_root" && find "./$DATA_DIR" -newer "$WORK/marker" -type f | wc -l)
[ "$written" -gt 0 ] || fail "the service wrote nothing under $DATA_DIR (is the embedded store elsewhere?)"
echo "image-check: files written only under /$DATA_DIR ($written files there)"

END=$(date +%s)
say "passed: base $((BASE_DONE - START)) s, build $((BUILD_DONE - BASE_DONE)) s, run and checks $((END - BUILD_DONE)) s, total $((END - START)) s"
