"""The streamed k-means fit against the sample fit, on one catalog, over several seeds.

    python bench/stream_bench.py --data items.parquet [--seeds 42,1,2,3] \
        [--flags "--n_layers 3 --n_clusters 256"]

Runs ``semid train --mode kmeans`` once per seed with ``--kmeans_fit sample`` and once with
``--kmeans_fit stream`` (one local Ray for all of them, in this process), and prints per seed
and on average the collision rate, the relative reconstruction error and the wall time of each,
with the ratios stream / sample. Writes <out>/stream_<name>_<timestamp>.json and .md.
(At catalog scale, where the memory of the whole process tree matters, run
bench/kmeans_bench.py --sides product --product-flags "--kmeans_fit stream ..." instead.)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from semid_dist.cli import parse_config  # noqa: E402
from semid_dist.commands import train  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--seeds", default="42,1,2,3")
    ap.add_argument("--flags", default="--n_layers 3 --n_clusters 256")
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT") or os.path.join(REPO, "bench_out"))
    a = ap.parse_args()
    work = tempfile.mkdtemp(prefix="stream-bench-")
    rows = []
    try:
        for seed in [int(s) for s in a.seeds.split(",")]:
            row = {"seed": seed}
            for fit in ("sample", "stream"):
                argv = [
                    "train",
                    "--data_path",
                    a.data,
                    "--output_dir",
                    os.path.join(work, f"{fit}{seed}"),
                    "--mode",
                    "kmeans",
                    "--seed",
                    str(seed),
                    "--kmeans_fit",
                    fit,
                    "--log_level",
                    "WARNING",
                    *shlex.split(a.flags),
                ]
                cfg, extra = parse_config(argv)
                t0 = time.time()
                r = train.run(cfg, log_dir=os.path.join(work, "logs"))
                m = r["metrics"]
                row[fit] = {
                    "collision_rate": m["collision_rate"],
                    "error": m["relative_reconstruction_error"],
                    "wall_s": round(time.time() - t0, 2),
                    "passes": len(r["training"].get("stream", {}).get("passes", [])),
                }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def mean(fit, key):
        return sum(r[fit][key] for r in rows) / len(rows)

    name = os.path.splitext(os.path.basename(a.data.rstrip("/")))[0]
    lines = [
        f"stream vs sample fit, {name}, flags '{a.flags}', seeds {a.seeds}",
        "",
        "| seed | collisions sample | collisions stream | error sample | error stream | wall sample (s) "
        "| wall stream (s) | stream passes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, t = r["sample"], r["stream"]
        lines.append(
            f"| {r['seed']} | {100 * s['collision_rate']:.2f}% | {100 * t['collision_rate']:.2f}% "
            f"| {s['error']:.4f} | {t['error']:.4f} | {s['wall_s']} | {t['wall_s']} | {t['passes']} |"
        )
    ratios = {k: mean("stream", k) / mean("sample", k) for k in ("collision_rate", "error", "wall_s")}
    lines.append(
        f"| mean | {100 * mean('sample', 'collision_rate'):.3f}% "
        f"| {100 * mean('stream', 'collision_rate'):.3f}% "
        f"| {mean('sample', 'error'):.4f} | {mean('stream', 'error'):.4f} | {mean('sample', 'wall_s'):.1f} "
        f"| {mean('stream', 'wall_s'):.1f} | |"
    )
    lines.append("")
    lines.append(
        "stream / sample: collisions {collision_rate:.3f}x, error {error:.4f}x, wall {wall_s:.2f}x".format(
            **ratios
        )
    )
    md = "\n".join(lines)
    print(md)
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"stream_{name}_{time.strftime('%Y%m%d_%H%M%S')}")
    with open(base + ".json", "w") as f:
        json.dump({"data": a.data, "flags": a.flags, "rows": rows, "ratios": ratios}, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(md + "\n")


if __name__ == "__main__":
    main()
