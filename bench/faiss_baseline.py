"""The baseline the benchmark compares against: RQ-KMeans the way one writes it with FAISS alone.

The whole catalog in memory, ``faiss.Kmeans`` per level on the residuals (its defaults: a
sample of max_points_per_centroid = 256 points per centroid, niter = 20) and
``index.search`` to assign every item, then dedup and a Parquet mapping. Self-contained on
purpose (no semid_dist import), so its memory is only what this recipe needs.

    python bench/faiss_baseline.py --data DIR --out OUT_DIR --result result.json [--device cuda]

Writes ``result`` as JSON: per-stage seconds, quality metrics and the codes' checksum.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHUNK = 65536  # rows per step for the reads and the residual update (16k+ keeps each step efficient)


def read_matrix(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All rows into one preallocated (N, D) float32 matrix, 64k rows at a time."""
    n = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    first = pq.ParquetFile(files[0]).read_row_group(0, columns=["embedding"]).column(0)
    d = len(first[0])
    ids = np.empty(n, np.int64)
    x = np.empty((n, d), np.float32)
    row = 0
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=CHUNK, columns=["ItemID", "embedding"]):
            b = batch.num_rows
            ids[row : row + b] = batch.column(0).to_numpy()
            x[row : row + b] = batch.column(1).flatten().to_numpy().reshape(b, d)
            row += b
    assert row == n
    return ids, x


def dedup(ids: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """Rank within each group of equal code tuples, by ItemID."""
    n = len(ids)
    order = np.lexsort([ids] + [codes[:, j] for j in range(codes.shape[1] - 1, -1, -1)])
    s = codes[order]
    new = np.ones(n, bool)
    new[1:] = np.any(s[1:] != s[:-1], axis=1)
    start = np.maximum.accumulate(np.where(new, np.arange(n), 0))
    out = np.empty(n, np.int64)
    out[order] = np.arange(n) - start
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--n_layers", type=int, default=3)
    p.add_argument("--n_clusters", type=int, default=256)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    a = p.parse_args()

    t_start = time.perf_counter()
    import faiss  # imported inside the timed run, as a script would

    stages: dict[str, float] = {}
    files = sorted(glob.glob(os.path.join(a.data, "*.parquet")))
    t = time.perf_counter()
    ids, x = read_matrix(files)
    stages["read"] = time.perf_counter() - t
    n, d = x.shape
    sq_norm = float(np.einsum("nd,nd->", x, x, dtype=np.float64))
    use_gpu = a.device == "cuda" and faiss.get_num_gpus() > 0

    resid = x.copy()  # x stays for the reconstruction error; resid is updated level by level
    codes = np.empty((n, a.n_layers), np.int64)
    fit_s = assign_s = 0.0
    for level in range(a.n_layers):
        t = time.perf_counter()
        km = faiss.Kmeans(d, a.n_clusters, niter=a.niter, seed=a.seed + level, gpu=use_gpu)
        km.train(resid)
        fit_s += time.perf_counter() - t
        t = time.perf_counter()
        _, idx = km.index.search(resid, 1)
        codes[:, level] = idx[:, 0]
        for s in range(0, n, CHUNK):
            resid[s : s + CHUNK] -= km.centroids[idx[s : s + CHUNK, 0]]
        assign_s += time.perf_counter() - t
    stages["fit"], stages["assign"] = fit_s, assign_s
    sq_err = float(np.einsum("nd,nd->", resid, resid, dtype=np.float64))

    t = time.perf_counter()
    _, counts = np.unique(codes, axis=0, return_counts=True)
    dd = dedup(ids, codes)
    stages["dedup"] = time.perf_counter() - t
    t = time.perf_counter()
    os.makedirs(a.out, exist_ok=True)
    sid = np.concatenate([codes, dd[:, None]], 1).astype(np.int32)
    order = np.argsort(ids)
    table = pa.table(
        {
            "ItemID": pa.array(ids[order]),
            "semantic_id": pa.FixedSizeListArray.from_arrays(pa.array(sid[order].ravel()), sid.shape[1]),
        }
    )
    pq.write_table(
        table, os.path.join(a.out, "semantic_id_mappings.parquet"), row_group_size=CHUNK, compression="zstd"
    )
    stages["export"] = time.perf_counter() - t
    stages["total"] = time.perf_counter() - t_start
    used = [int(np.unique(codes[:, j]).size) for j in range(a.n_layers)]
    result = {
        "stages_s": {k: round(v, 3) for k, v in stages.items()},
        "metrics": {
            "collision_rate": float(1 - len(counts) / n),
            "max_bucket": int(counts.max()),
            "relative_reconstruction_error": sq_err / sq_norm,
            "codes_used": used,
        },
        "n": n,
        "dim": d,
        "faiss": faiss.__version__,
        "faiss_gpu": use_gpu,
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    with open(a.result, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
