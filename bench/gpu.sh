#!/usr/bin/env bash
# make bench-gpu: on a machine with one NVIDIA GPU, install what is needed into a venv, then run
# bench/gpu_run.sh: the GPU tests (tests/test_gpu.py), the kmeans benchmark at N = 1,000,000
# with --device cuda and one tiger epoch over the N items on the GPU; every result is a file in
# $BENCH_OUT (default bench_out/gpu). On a GPU machine without a package index whose python3
# already holds CUDA torch (and where little can be copied in) use bench/gpu_device.sh instead.
#
#   BENCH_OUT=/some/dir make bench-gpu            # or: BENCH_OUT=... bash bench/gpu.sh
#
# Works offline: wheels in $WHEELS (default .whl/, brought along with the repository) are
# used first, and when no package index answers, only they are used (pip --no-index).
# Knobs: N (items), PYTHON (interpreter for the venv), GPU_VENV (default .venv-gpu),
# TORCH_SPEC (default "torch": PyPI's CUDA build), FAISS_SPEC (default "faiss-gpu"; the
# official 1.15.1 wheel is a CUDA 12 build with Hopper kernels; the benchmark's baseline
# falls back to faiss on CPU when faiss sees no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${BENCH_OUT:-bench_out/gpu}"
N="${N:-1000000}"
WHEELS="${WHEELS:-.whl}"
VENV="${GPU_VENV:-.venv-gpu}"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch}"
FAISS_SPEC="${FAISS_SPEC:-faiss-gpu}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
exec > >(tee -a "$OUT/gpu_bench.log") 2>&1
echo "== bench-gpu $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname), results -> $OUT"

if ! nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; then
  echo "bench-gpu: nvidia-smi failed: no NVIDIA GPU/driver on this machine" | tee "$OUT/ERROR.txt"
  exit 2
fi
head -15 "$OUT/nvidia-smi.txt"

# --- install ---------------------------------------------------------------------------------
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
FIND=()
[ -d "$WHEELS" ] && FIND=(--find-links "$WHEELS")
if "${PIP[@]}" download --no-deps --quiet --dest "$(mktemp -d)" --timeout 15 --retries 0 pip >/dev/null 2>&1; then
  echo "package index reachable${FIND:+; also using wheels in $WHEELS}"
  INDEX=()
else
  echo "no package index: installing from $WHEELS only"
  [ -d "$WHEELS" ] || { echo "bench-gpu: no index and no $WHEELS folder" | tee "$OUT/ERROR.txt"; exit 2; }
  INDEX=(--no-index)
fi
install() { "${PIP[@]}" install --quiet ${INDEX[@]+"${INDEX[@]}"} ${FIND[@]+"${FIND[@]}"} "$@"; }
install --upgrade pip || true
install "$TORCH_SPEC"
# faiss-cpu and faiss-gpu both install the module `faiss`: never both, or one overwrites the
# other's files.
"${PIP[@]}" uninstall --yes --quiet faiss-cpu >/dev/null 2>&1 || true
install "$FAISS_SPEC" || echo "bench-gpu: could not install $FAISS_SPEC; the baseline will lack faiss"
install -e ".[test]"
"${PIP[@]}" freeze > "$OUT/pip-freeze.txt"
exec bash bench/gpu_run.sh "$VENV/bin/python" "$OUT"
