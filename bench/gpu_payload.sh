#!/usr/bin/env bash
# Build .device-whl/: what a GPU machine without a package index lacks for `bench/gpu_device.sh`,
# small enough to copy in.
#
#   bash bench/gpu_payload.sh          # here, where PyPI answers; then carry .device-whl there
#
# Its own folder, not .whl/ (bench/gpu.sh's wheels): a rebuild empties it.
#
# Such a machine runs an image whose python3 (3.12) already has torch with CUDA, numpy,
# pyarrow, pandas, fsspec, psutil, pytest, grpcio, protobuf, aiohttp, click, pyyaml and
# requests, and nothing can be fetched there. Missing: Ray and a few small packages. What
# travels with a call is at most 64 MiB, and Ray's wheel alone is larger, so Ray travels as a
# tar.xz of the wheel's files without the parts this project never loads (the Java jars, RLlib,
# Serve). faiss does not travel (its GPU wheel would not fit as well): on the device the kmeans
# benchmark runs the product side only.
set -euo pipefail
cd "$(dirname "$0")/.."

RAY_VERSION="$(sed -n 's/.*"ray\[[a-z,]*\]==\([0-9.]*\)".*/\1/p' pyproject.toml | head -1)"
[ -n "$RAY_VERSION" ] || { echo "gpu_payload: cannot read Ray's pinned version from pyproject.toml" >&2; exit 2; }
PY="${PYTHON:-python3}"
PYVER="${PYVER:-3.12}"  # that machine's python3; another only to rehearse elsewhere
TAG="cp${PYVER/./}"
OUT="${WHEELS:-.device-whl}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$OUT"
rm -f "$OUT"/*.whl "$OUT"/ray-*.tar.xz

download() {
  "$PY" -m pip download --quiet --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$@"
}

# Ray's own requirements and its train extra that the image lacks (the wheel's Requires-Dist
# against the image's package list), resolved together so their versions fit; then the wheels of
# packages the image already has are dropped (two versions of one package would shadow its own).
download "$OUT" jsonschema tensorboardX "pydantic>=2.5,<3"
for have in numpy protobuf packaging attrs typing_extensions; do rm -f "$OUT/$have"-*.whl; done

download "$TMP" --no-deps "ray==$RAY_VERSION"
mkdir "$TMP/ray"
unzip -q -d "$TMP/ray" "$TMP"/ray-*.whl  # unzip keeps the executables' modes (raylet, gcs_server)
rm -rf "$TMP/ray/ray/jars" "$TMP/ray/ray/rllib" "$TMP/ray/ray/serve"
tar -C "$TMP/ray" -cf - . | xz -9 -T0 > "$OUT/ray-$RAY_VERSION-$TAG-trimmed.tar.xz"

du -ch "$OUT"/* | tail -1
ls -l "$OUT"
