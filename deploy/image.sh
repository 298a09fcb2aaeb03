#!/bin/sh
# Builds the agent's image from Containerfile: FROM scratch, the binary and what it links.
#
#   deploy/image.sh                      # cargo build --release, then the image
#   deploy/image.sh TAG                  # the same, tagged TAG (default localhost/switchyard:VERSION)
#   SWITCHYARD_IMAGE_BIN=path deploy/image.sh TAG   # package this binary instead (tests)
#
# Uses podman, else buildah, else docker (CONTAINER_TOOL=… to choose).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n1)
tag=${1:-localhost/switchyard:$version}

bin=${SWITCHYARD_IMAGE_BIN:-}
if [ -z "$bin" ]; then
    (cd "$root" && cargo build --release -p switchyard)
    bin=${CARGO_TARGET_DIR:-$root/target}/release/switchyard
fi
[ -x "$bin" ] || { echo "image.sh: no binary at $bin" >&2; exit 1; }

tool=${CONTAINER_TOOL:-}
if [ -z "$tool" ]; then
    for t in podman buildah docker; do
        if command -v "$t" >/dev/null 2>&1; then tool=$t; break; fi
    done
fi
[ -n "$tool" ] || { echo "image.sh: needs podman, buildah or docker" >&2; exit 1; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/usr/bin" "$ctx/rootfs/tmp"
cp "$bin" "$ctx/rootfs/usr/bin/switchyard"
# Debug info off (the release profile keeps it for profiling: 130 MB of 150), symbols kept so
# that a panic's backtrace still names functions.
if command -v strip >/dev/null 2>&1; then
    strip --strip-debug "$ctx/rootfs/usr/bin/switchyard"
fi
# Each shared library at the path the loader looks for it (the loader's own path too).
for lib in $(ldd "$bin" | sed -n 's/.*=> \(\/[^ ]*\).*/\1/p; s/^[[:space:]]*\(\/[^ ]*\) (.*/\1/p'); do
    mkdir -p "$ctx/rootfs$(dirname "$lib")"
    cp -L "$lib" "$ctx/rootfs$lib"
done
cp "$root/Containerfile" "$ctx/Containerfile"

case $tool in
    buildah) buildah bud --quiet -f "$ctx/Containerfile" -t "$tag" "$ctx" ;;
    *) "$tool" build --quiet -f "$ctx/Containerfile" -t "$tag" "$ctx" ;;
esac
echo "built $tag with $tool ($(du -sh "$ctx/rootfs" | cut -f1) of files)"
