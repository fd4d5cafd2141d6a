"""Beam-search encoding: semid_dist's residual k-means against faiss's ResidualQuantizer at the
same beam sizes, in one process, on the same rows.

    python bench/beam_bench.py --data items.parquet [--beams 1,4,8] [--n_clusters 256]
    python bench/beam_bench.py --n 1000000          (the synthetic benchmark catalog)

Both sides train on the same hash sample (the product's: --sample_per_centroid x --n_clusters
rows, all rows when the catalog is smaller) and encode every row:
- semid_dist: the kmeans mode's fit as `semid train --beam_size B` runs it: progressive-dimension
  k-means (modes/kmeans.fit_levels), then for B > 1 Lloyd iterations on the sample with beam
  assignments (modes/kmeans.beam_refine); every row encoded with beam search (math/beam.py);
- faiss: ResidualQuantizer(dim, levels, log2 K) trained with max_beam_size = the beam, then
  compute_codes on every row with the same beam.
Reports, per beam, the relative reconstruction error, the collision rate before dedup, and the
encode time; writes <out>/beam_<name>_<timestamp>.json and .md.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
import time

import numpy as np
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

from semid_dist.catalog.schema import batch_to_arrays  # noqa: E402
from semid_dist.config import Config  # noqa: E402
from semid_dist.math import sampling  # noqa: E402
from semid_dist.math.beam import beam_encode_np  # noqa: E402
from semid_dist.math.metrics import quality_report  # noqa: E402
from semid_dist.modes.kmeans import beam_refine, fit_levels  # noqa: E402


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
    files = sorted(glob.glob(os.path.join(path, "*.parquet"))) if os.path.isdir(path) else [path]
    ids, rows = [], []
    for f in files:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=65536, columns=["ItemID", "embedding"]):
            i, x = batch_to_arrays(batch, len(batch.column(1)[0]))
            ids.append(i)
            rows.append(np.array(x))
    return np.concatenate(ids), np.concatenate(rows)


CHUNK = 65536  # rows encoded at a time: a beam search's working set grows with the beam


def _chunked(encode, x_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, squared errors) of every row, CHUNK rows at a time."""
    parts = [encode(x_ND[s : s + CHUNK]) for s in range(0, len(x_ND), CHUNK)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _faiss_encode(rq, x_BD: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    packed = rq.compute_codes(x_BD)
    sq = ((x_BD - rq.decode(packed)) ** 2).sum(1)
    return packed[:, :levels].astype(np.int64), sq  # 8-bit codes: one byte per level


def report(codes_NL: np.ndarray, x_ND: np.ndarray, x_hat_or_sq, k: int) -> dict:
    sq = x_hat_or_sq if x_hat_or_sq.ndim == 1 else ((x_ND - x_hat_or_sq) ** 2).sum(1)
    q = quality_report(
        codes_NL,
        k,
        float(sq.sum(dtype=np.float64)),
        float(np.einsum("nd,nd->n", x_ND, x_ND).sum(dtype=np.float64)),
    )
    return {
        "relative_reconstruction_error": q["relative_reconstruction_error"],
        "collision_rate": q["collision_rate"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="parquet file or directory (default: the synthetic catalog of --n)")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--beams", default="1,4,8")
    ap.add_argument("--n_layers", type=int, default=3)
    ap.add_argument("--n_clusters", type=int, default=256)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT") or os.path.join(REPO, "bench_out"))
    a = ap.parse_args()
    import faiss

    if a.data is None:
        import synth

        a.data = synth.ensure(a.n, f"/tmp/bench/catalog_{a.n}", 16, 768)
    t0 = time.time()
    ids, x = load(a.data)
    cfg = Config(
        data_path=a.data,
        output_dir="-",
        mode="kmeans",
        n_layers=a.n_layers,
        n_clusters=a.n_clusters,
        seed=a.seed,
    )
    target = cfg.sample_per_centroid * cfg.n_clusters
    keep = sampling.hash_unit(ids, cfg.seed) < min(1.0, target / len(ids))
    sample = x[keep]
    print(
        f"{len(ids)} rows x {x.shape[1]} read in {time.time() - t0:.1f} s; sample {len(sample)} rows",
        flush=True,
    )
    nbits = int(math.log2(a.n_clusters))
    assert 2**nbits == a.n_clusters, "faiss's ResidualQuantizer needs a power-of-two codebook"

    t0 = time.time()
    greedy_books = fit_levels(sample.copy(), cfg, None)[0].numpy()
    fit_s = time.time() - t0
    res = {
        "data": a.data,
        "rows": len(ids),
        "sample": int(len(sample)),
        "levels": a.n_layers,
        "codes": a.n_clusters,
        "seed": a.seed,
        "ours_fit_s": round(fit_s, 2),
        "beams": {},
    }
    for beam in [int(b) for b in a.beams.split(",")]:
        t0 = time.time()
        books = (
            greedy_books if beam == 1 else beam_refine(sample, greedy_books, cfg.replace(beam_size=beam))[0]
        )
        refine_s = round(time.time() - t0, 2)
        t0 = time.time()
        codes, sq = beam_encode_np(x, books, beam)
        ours = {
            **report(codes, x, sq, a.n_clusters),
            "refine_s": refine_s,
            "encode_s": round(time.time() - t0, 2),
        }
        rq = faiss.ResidualQuantizer(x.shape[1], a.n_layers, nbits)
        rq.max_beam_size = beam
        t0 = time.time()
        rq.train(sample)
        train_s = time.time() - t0
        t0 = time.time()
        f_codes, f_sq = _chunked(lambda xb, q=rq: _faiss_encode(q, xb, a.n_layers), x)
        enc_s = time.time() - t0
        theirs = {
            **report(f_codes, x, f_sq, a.n_clusters),
            "train_s": round(train_s, 2),
            "encode_s": round(enc_s, 2),
        }
        res["beams"][beam] = {"semid_dist": ours, "faiss": theirs}
        print(f"beam {beam}: semid_dist {ours}  faiss {theirs}", flush=True)

    name = os.path.splitext(os.path.basename(a.data.rstrip("/")))[0]
    lines = [
        f"beam search, {name}: {len(ids)} rows, {a.n_layers} x {a.n_clusters}, "
        f"sample {len(sample)} rows, seed {a.seed}",
        "",
        "| beam | semid_dist rel. error | faiss RQ rel. error | semid_dist collisions | faiss RQ collisions "
        "| semid_dist encode (s) | faiss encode (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for beam, r in res["beams"].items():
        o, f = r["semid_dist"], r["faiss"]
        lines.append(
            f"| {beam} | {o['relative_reconstruction_error']:.4f} | {f['relative_reconstruction_error']:.4f} "
            f"| {100 * o['collision_rate']:.2f}% | {100 * f['collision_rate']:.2f}% "
            f"| {o['encode_s']} | {f['encode_s']} |"
        )
    md = "\n".join(lines)
    print(md)
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"beam_{name}_{time.strftime('%Y%m%d_%H%M%S')}")
    with open(base + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    main()
