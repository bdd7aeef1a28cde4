#!/usr/bin/env bash
# Builds the product image from the repository's unchanged Dockerfile, without a Docker engine:
#
#   1. a base image standing in for the Dockerfile's FROM (python:3.11-slim-bookworm): Debian
#      bookworm's own python3.11 (with venv and pip), made by mmdebstrap from Debian packages
#      and tagged locally under exactly the name the Dockerfile asks for;
#   2. the Dockerfile, built by Debian's buildah (vfs storage: no overlay mounts needed) with
#      `--pull-never`, so FROM finds that local base and nothing is fetched from a registry.
#
# Both are cached in buildah's own storage under $ISDR_IMAGE_CACHE (default
# ~/.cache/isdr/images): the base is made again only when its recipe below changes, and the
# build reuses every layer whose inputs did not change (`--layers`). A cold run takes a few
# minutes (the base, then pip installing the dependencies); a warm one takes seconds.
#
# Usage: hack/image/build.sh [--check]
#   prints, as its last line, the image name (ISDR_IMAGE, default localhost/isdr:test).
#   --check builds nothing: exits 1 when buildah or mmdebstrap is missing.
# Other scripts and the tests run buildah with the same storage: `hack/image/build.sh --print-storage`
# prints the options (--root ... --runroot ... --storage-driver vfs).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${ISDR_IMAGE_CACHE:-$HOME/.cache/isdr/images}"
IMAGE="${ISDR_IMAGE:-localhost/isdr:test}"
STORAGE=(--root "$CACHE/storage" --runroot "$CACHE/run" --storage-driver vfs)

case "${1:-}" in
  --print-storage) echo "${STORAGE[*]}"; exit 0 ;;
  --check)
    for tool in buildah mmdebstrap; do
      command -v "$tool" >/dev/null 2>&1 || { echo "missing: $tool (scripts/install-system-deps.sh)"; exit 1; }
    done
    exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--check|--print-storage]" >&2; exit 2 ;;
esac

for tool in buildah mmdebstrap; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "hack/image/build.sh: $tool is not installed (run scripts/install-system-deps.sh)" >&2
    exit 1
  fi
done

# The Dockerfile's external base image(s): every FROM that is not an earlier stage's name.
mapfile -t BASES < <(awk 'toupper($1) == "FROM" {
    base = $2; for (i = 2; i <= NF; i++) if ($i !~ /^--/) { base = $i; break }
    if (!(base in stages)) print base
    for (i = 2; i < NF; i++) if (toupper($i) == "AS") stages[$(i + 1)] = 1
  }' "$ROOT/Dockerfile" | sort -u)
if [ "${#BASES[@]}" -ne 1 ]; then
  echo "hack/image/build.sh: expected one base image in the Dockerfile, found: ${BASES[*]}" >&2
  exit 1
fi
BASE="${BASES[0]}"
case "$BASE" in
  */*) BASE_REF="$BASE" ;;
  *) BASE_REF="docker.io/library/$BASE" ;;  # how buildah resolves a short name like python:3.11-...
esac

# Debian's sources as this machine's apt has them (its mirror, and its security suite).
SOURCES="${ISDR_DEBIAN_SOURCES:-}"
if [ -z "$SOURCES" ]; then
  for candidate in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$candidate" ]; then SOURCES="$candidate"; break; fi
  done
fi
if [ -z "$SOURCES" ]; then
  echo "hack/image/build.sh: no Debian sources found; set ISDR_DEBIAN_SOURCES to a sources file" >&2
  exit 1
fi

# The base image's recipe. Everything that changes what mmdebstrap makes is in it, so that a
# change here makes the base again (its hash is a label of the base image).
SUITE=bookworm
PACKAGES=python3.11,python3-venv,python3-pip,python-is-python3,ca-certificates
BASE_RECIPE="v1 $SUITE minbase $PACKAGES nodoc host-ca-bundle $(sha256sum < "$SOURCES" | cut -c1-16)"
RECIPE_HASH="$(printf '%s' "$BASE_RECIPE" | sha256sum | cut -c1-16)"
LABEL=io.isdr.base-recipe

buildah_() { buildah "${STORAGE[@]}" "$@"; }
mkdir -p "$CACHE"

have_base() {
  [ "$(buildah_ inspect --type image --format "{{index .OCIv1.Config.Labels \"$LABEL\"}}" "$BASE_REF" \
        2>/dev/null || true)" = "$RECIPE_HASH" ]
}

if have_base; then
  echo "base image $BASE_REF: cached (recipe $RECIPE_HASH)"
else
  started=$SECONDS
  work="$(mktemp -d "$CACHE/base.XXXXXX")"
  trap 'rm -rf "$work"' EXIT
  echo "making the base image $BASE_REF with mmdebstrap ($SUITE: $PACKAGES)"
  # No documentation or man pages (as the slim images); apt's lists are removed by mmdebstrap.
  # The build machine's CA bundle goes in, so that pip in the Dockerfile's RUN reaches the
  # package index through whatever TLS-inspecting proxy the machine itself trusts.
  mmdebstrap --quiet --mode=root --variant=minbase --format=tar --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='copy-in /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs' \
    "$SUITE" "$work/rootfs.tar" "$SOURCES"
  container="$(buildah_ from scratch)"
  buildah_ add --quiet "$container" "$work/rootfs.tar" / >/dev/null
  buildah_ config \
    --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 \
    --cmd python3 \
    --label "$LABEL=$RECIPE_HASH" \
    --label "io.isdr.base-stands-in-for=$BASE" \
    "$container"
  buildah_ commit --quiet --rm "$container" "$BASE_REF" >/dev/null
  rm -rf "$work"
  trap - EXIT
  echo "base image $BASE_REF made in $((SECONDS - started))s"
fi

# The build's inputs: the Dockerfile, the context .dockerignore lets through, and the base.
BASE_ID="$(buildah_ inspect --type image --format '{{.FromImageID}}' "$BASE_REF")"
INPUTS="$( { python3 "$ROOT/hack/image/build_context.py" --digest; echo "$BASE_ID"; } | sha256sum | cut -c1-32)"
INPUTS_LABEL=io.isdr.build-inputs
if [ "$(buildah_ inspect --type image --format "{{index .OCIv1.Config.Labels \"$INPUTS_LABEL\"}}" "$IMAGE" \
        2>/dev/null || true)" = "$INPUTS" ]; then
  echo "image $IMAGE: cached (inputs $INPUTS)"
  echo "$IMAGE"
  exit 0
fi

started=$SECONDS
# --network host: the builder stage's pip reaches the package index as this machine does.
# --isolation chroot: RUN needs no OCI runtime and no cgroups (crun refuses hybrid cgroup set-ups).
# --layers: a change to the sources rebuilds from COPY on; the runtime stage's user stays cached.
# The label records the inputs, so that the next run with the same inputs builds nothing.
buildah_ build --quiet --layers --pull-never --network host --isolation chroot \
  --label "$INPUTS_LABEL=$INPUTS" \
  --file "$ROOT/Dockerfile" --tag "$IMAGE" "$ROOT" >/dev/null
echo "image $IMAGE built from the Dockerfile in $((SECONDS - started))s"
echo "$IMAGE"
