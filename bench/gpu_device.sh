#!/usr/bin/env bash
# The GPU checks on a GPU machine without a package index: its python3 (3.12) already holds
# torch with CUDA, numpy, pyarrow, pandas and pytest; nothing can be fetched there and at most
# 64 MiB is copied in. Ray and a few small packages come from .device-whl/, built here
# beforehand by bench/gpu_payload.sh. Then bench/gpu_run.sh runs the GPU tests and the
# benchmarks at N items into a local folder, and what comes back is a handful of small files
# in $OUT (at most 8 files of 16 MiB are copied back): the log, the tables, the
# test report and a tar.gz of every JSON, table and log of the run.
#
#   bash bench/gpu_payload.sh                                  # here, once
#   device run, carry [".device-whl"], timeout_s 600:  bash bench/gpu_device.sh
#
# Knobs: N (default 1,000,000), PYTHON (default python3), WHEELS (default .device-whl), SITE (where
# they unpack), GPU_WORK (the run's local folder), DEVICE=cpu (a rehearsal without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-${BENCH_OUT:-bench_out/gpu}}"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-.device-whl}"
SITE="${SITE:-/tmp/semid_site}"
WORK="${GPU_WORK:-/tmp/semid_gpu_run}"
mkdir -p "$DEST" "$SITE" "$WORK"
DEST="$(cd "$DEST" && pwd)"
exec > >(tee -a "$DEST/gpu_bench.log") 2>&1
echo "== gpu_device $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
nvidia-smi > "$WORK/nvidia-smi.txt" 2>&1 || { echo "gpu_device: nvidia-smi failed: no NVIDIA GPU"; exit 2; }
head -12 "$WORK/nvidia-smi.txt"

payload=("$WHEELS"/ray-*-trimmed.tar.xz)
[ -f "${payload[0]}" ] || { echo "gpu_device: no $WHEELS/ray-*-trimmed.tar.xz (run bench/gpu_payload.sh here and carry $WHEELS)"; exit 2; }
tar -C "$SITE" -xJf "${payload[0]}"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"

set +e
bash bench/gpu_run.sh "$PY" "$WORK"
rc=$?
set -e
# What comes back: small files only (the run's outputs hold 100+ MB of mappings).
(cd "$WORK" && find . -maxdepth 3 -type f \( -name '*.json' -o -name '*.md' -o -name '*.txt' \
   -o -name '*.xml' -o -name '*.log' \) -size -4M -print0 | tar --null -czf "$DEST/results.tar.gz" -T -)
for f in "$WORK"/kmeans_*.md "$WORK"/tiger_*.md "$WORK/pytest-gpu.txt" "$WORK/versions.txt"; do
  [ -f "$f" ] && cp "$f" "$DEST/"
done
echo "== gpu_device done (exit $rc): $(ls "$DEST")"
exit $rc
