#!/usr/bin/env bash
# The GPU checks themselves, for bench/gpu.sh (its venv) and bench/gpu_device.sh (an offline
# GPU machine's python3): versions, tests/test_gpu.py, the kmeans benchmark at N items with
# --device cuda (both sides when faiss imports, else the product alone) and one tiger epoch
# over the N items on the GPU. Every result is a file in OUT.
#
#   bash bench/gpu_run.sh PYTHON OUT          (N from the environment, default 1,000,000)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$1"
OUT="$2"
N="${N:-1000000}"
DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu: a dry run of this script on a machine without a GPU
mkdir -p "$OUT"
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1

"$PY" - <<'PYEOF' | tee "$OUT/versions.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import ray
print("ray", ray.__version__)
try:
    import faiss
    print("faiss", faiss.__version__, "gpus", faiss.get_num_gpus())
except Exception as e:  # the benchmark then runs the product side only
    print("faiss: not importable:", e)
PYEOF

# --- GPU tests -------------------------------------------------------------------------------
set +e
"$PY" -m pytest -q tests/test_gpu.py -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" 2>&1 \
  | tee "$OUT/pytest-gpu.txt"
rc=${PIPESTATUS[0]}
set -e
case $rc in
  0) echo "GPU tests passed" ;;
  *) echo "GPU tests FAILED (exit $rc; 5 means none ran); running the benchmarks anyway" ;;
esac

# --- benchmarks ------------------------------------------------------------------------------
SIDES=product,baseline
"$PY" -c "import faiss" 2>/dev/null || SIDES=product
"$PY" bench/kmeans_bench.py --n "$N" --device "$DEVICE" --sides "$SIDES" --out "$OUT"
# One tiger epoch over every item on the one GPU (the H100 target is <= 20 s per epoch).
"$PY" bench/tiger_bench.py --n "$N" --items "$N" --epochs 1 --workers 1 --references 1 --device "$DEVICE" --out "$OUT"
echo "== bench-gpu done: $(ls "$OUT")"
exit $rc
