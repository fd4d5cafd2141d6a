"""The nightly job at catalog scale, from S3 to S3: three nights through a local SeaweedFS.

    python bench/nightly_bench.py --n 1000000 [--out DIR]   (or BENCH_OUT=DIR; make bench-nightly)

A SeaweedFS S3 server (tests/s3server.py, the one the tests use) is started on 127.0.0.1 and the
synthetic catalog (bench/synth.py) uploaded to it; then ``semid nightly`` runs three times with
``--output_dir s3://.../semids``, each a subprocess whose whole process tree is sampled for peak
memory (kmeans_bench.run_side):
- night 1: the catalog; no tokenizer yet, so it fits one (kmeans, 3 x 256) and every item is new;
- night 2: the same objects again: every item must keep its semantic ID (stable);
- night 3: a changed catalog: 10% of the first shard's rows get a perturbed embedding, the last
  shard is gone, and a new shard brings --new items (the synthetic catalog's next rows).

After night 3 the published mappings are read back from S3 and checked against the policy:
stable items keep their ID, changed items keep theirs only where the report says so, removed
items are gone, new items are there, every ID is unique and no retired ID was handed out again.

    python bench/nightly_bench.py --n 10000000 --shards 160 --churn 0.01 --flags "--collision_policy relocate"

``--churn F``: local files instead of S3 (a 10M catalog does not fit twice in a small disk), two
nights: the catalog, then the catalog with the first F x n rows' embeddings perturbed (changed),
the next F x n rows gone (removed) and F x n new rows; shards holding none of those rows are
linked, not copied. The checks then read the mappings with numpy. ``--flags``: more
``semid nightly`` flags, both nights.

Writes <out>/nightly_<n>_<timestamp>.json and .md and prints the table; exits non-zero if a
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
import synth  # noqa: E402
from kmeans_bench import machine, machine_line, pythonpath, run_side  # noqa: E402

from s3server import S3Server  # noqa: E402

BUCKET = "nightly-bench"
NIGHTS = ("2026-01-01", "2026-01-02", "2026-01-03")


def night3_files(data: str, n: int, new: int, work: str) -> list[str]:
    """The first shard with 10% of its rows perturbed, the middle shards as they are, no last
    shard, and one shard of `new` items (the catalog's rows n .. n + new)."""
    shards = sorted(p for p in os.listdir(data) if p.endswith(".parquet"))
    first = pq.read_table(os.path.join(data, shards[0]))
    x = first.column("embedding").combine_chunks().flatten().to_numpy().reshape(first.num_rows, -1).copy()
    rng = np.random.default_rng(3)
    rows = np.sort(rng.choice(len(x), len(x) // 10, replace=False))
    x[rows] += 0.05 * rng.standard_normal((len(rows), x.shape[1]), dtype=np.float32)
    x[rows] /= np.linalg.norm(x[rows], axis=1, keepdims=True)
    changed = os.path.join(work, shards[0])
    pq.write_table(
        synth._table(first.column("ItemID").to_numpy(), x), changed, row_group_size=synth.ROW_GROUP
    )
    fresh = os.path.join(work, f"part-{len(shards):05d}.parquet")
    cat = synth.Catalog(x.shape[1], 0)
    pq.write_table(
        synth._table(synth.item_ids(n, n + new), synth.rows(cat, n, n + new)),
        fresh,
        row_group_size=synth.ROW_GROUP,
    )
    return [changed] + [os.path.join(data, s) for s in shards[1:-1]] + [fresh]


def churn_files(data: str, n: int, frac: float, out: str) -> dict[str, int]:
    """Night 2 of --churn in out/: rows [0, m) perturbed, rows [m, 2m) gone, m new rows (m = frac
    x n); the shards past row 2m are links to night 1's. Returns the expected counts."""
    m = int(frac * n)
    os.makedirs(out)
    shards = sorted(p for p in os.listdir(data) if p.endswith(".parquet"))
    rng, start = np.random.default_rng(3), 0
    for name in shards:
        src = os.path.join(data, name)
        lo = start
        start += pq.ParquetFile(src).metadata.num_rows
        if lo >= 2 * m:
            os.symlink(src, os.path.join(out, name))
            continue
        t = pq.read_table(src)
        x = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1).copy()
        dim = x.shape[1]
        row = np.arange(lo, start)
        chg = row < m
        x[chg] += 0.05 * rng.standard_normal((int(chg.sum()), x.shape[1]), dtype=np.float32)
        x[chg] /= np.linalg.norm(x[chg], axis=1, keepdims=True)
        keep = (row < m) | (row >= 2 * m)
        ids = t.column("ItemID").to_numpy()[keep]
        pq.write_table(synth._table(ids, x[keep]), os.path.join(out, name), row_group_size=synth.ROW_GROUP)
    cat = synth.Catalog(dim, 0)  # the first shard always holds changed rows (m > 0)
    for i, lo in enumerate(range(n, n + m, synth.ROW_GROUP * 4)):
        hi = min(n + m, lo + synth.ROW_GROUP * 4)
        path = os.path.join(out, f"part-{len(shards) + i:05d}.parquet")
        pq.write_table(
            synth._table(synth.item_ids(lo, hi), synth.rows(cat, lo, hi)),
            path,
            row_group_size=synth.ROW_GROUP,
        )
    return {"changed": m, "removed": m, "new": m}


def local_mapping(root: str, night: str) -> tuple[np.ndarray, np.ndarray]:
    """A night's published (ItemIDs sorted, semantic IDs) from local files, as numpy."""
    t = pq.read_table(os.path.join(root, "generations", night, "semantic_id_mappings.parquet"))
    ids = t.column("ItemID").to_numpy()
    sid = t.column("semantic_id").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    o = np.argsort(ids)
    return ids[o], sid[o]


def churn(a, data: str, work: str, env: dict, res: dict) -> None:
    """--churn: two nights on local files (module docstring), checked with numpy."""
    root, logs = os.path.join(work, "semids"), os.path.join(work, "logs")
    expect = churn_files(data, a.n, a.churn, os.path.join(work, "night2"))
    flags = a.flags.split()
    for night, path, extra in (
        (NIGHTS[0], data, ["--mode", "kmeans", "--n_layers", "3", "--n_clusters", "256"]),
        (NIGHTS[1], os.path.join(work, "night2"), []),
    ):
        cmd = [sys.executable, "-m", "semid_dist", "nightly", "--data_path", path, "--output_dir", root]
        cmd += ["--generation", night, "--log_dir", logs, *extra, *flags]
        side = run_side(night, cmd, os.path.join(work, f"{night}.log"), env)
        side.pop("processes_at_peak")
        with open(os.path.join(root, "generations", night, "training_results.json")) as f:
            r = json.load(f)
        side.update(
            stages_s=r["timings_s"], counts=r["counts"], collision_rate=r["metrics"]["collision_rate"]
        )
        side["driver"] = r.get("driver")
        res["nights"][night] = side
    (i1, s1), (i2, s2) = local_mapping(root, NIGHTS[0]), local_mapping(root, NIGHTS[1])
    c = res["nights"][NIGHTS[1]]["counts"]
    common = np.intersect1d(i1, i2, assume_unique=True)
    same = (s1[np.searchsorted(i1, common)] == s2[np.searchsorted(i2, common)]).all(axis=1)
    res["checks"] = {
        "counts as made": all(c[k] == v for k, v in expect.items()),
        "stable + changed-and-kept IDs unchanged": int(same.sum()) == c["stable"] + c["changed_kept_id"],
        "IDs unique": len(np.unique(s2, axis=0)) == len(s2),
    }


def upload(s3: pafs.S3FileSystem, files: list[str], prefix: str) -> float:
    t0 = time.perf_counter()
    for f in files:
        pafs.copy_files(f, f"{BUCKET}/{prefix}/{os.path.basename(f)}", destination_filesystem=s3)
    return round(time.perf_counter() - t0, 1)


def mapping(s3: pafs.S3FileSystem, night: str) -> dict[int, tuple]:
    t = pq.read_table(f"{BUCKET}/semids/generations/{night}/semantic_id_mappings.parquet", filesystem=s3)
    return dict(
        zip(
            t.column("ItemID").to_numpy().tolist(),
            map(tuple, t.column("semantic_id").to_pylist()),
            strict=True,
        )
    )


def results(s3: pafs.S3FileSystem, night: str) -> dict:
    with s3.open_input_stream(f"{BUCKET}/semids/generations/{night}/training_results.json") as f:
        return json.loads(f.read())


def checks(s3: pafs.S3FileSystem, gen3: dict) -> dict[str, bool]:
    """The policy, checked on what night 3 published against night 2."""
    before, after = mapping(s3, NIGHTS[1]), mapping(s3, NIGHTS[2])
    counts = gen3["counts"]
    common = before.keys() & after.keys()
    kept = sum(before[i] == after[i] for i in common)
    retired = {before[i] for i in before.keys() - after.keys()}
    ids = list(after.values())
    return {
        "night 2 kept every ID": mapping(s3, NIGHTS[0]) == before,
        "stable + changed-and-kept IDs unchanged": kept == counts["stable"] + counts["changed_kept_id"],
        "removed items gone": len(before.keys() - after.keys()) == counts["removed"],
        "new items present": len(after.keys() - before.keys()) == counts["new"],
        "IDs unique": len(set(ids)) == len(ids),
        "no retired ID handed out again": not retired & set(ids),
    }


def s3_nights(a, data: str, work: str, res: dict) -> None:
    """Three nights from and to a local SeaweedFS (module docstring)."""
    with tempfile.TemporaryDirectory(prefix="nightly_bench_s3_") as s3dir:
        server = S3Server(bucket=BUCKET, base_dir=s3dir)
        server.start()
        try:
            env = dict(server.subprocess_env(), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=pythonpath(REPO))
            s3 = pafs.S3FileSystem(
                endpoint_override=server.endpoint_url,
                access_key=server.access_key,
                secret_key=server.secret_key,
                scheme="http",
                region=server.region,
            )
            shards = sorted(os.path.join(data, p) for p in os.listdir(data) if p.endswith(".parquet"))
            res["upload_s"] = {
                "night1": upload(s3, shards, "night1"),
                "night3": upload(s3, night3_files(data, a.n, a.new, work), "night3"),
            }
            for night, prefix, extra in (
                (NIGHTS[0], "night1", ["--mode", "kmeans", "--n_layers", "3", "--n_clusters", "256"]),
                (NIGHTS[1], "night1", []),
                (NIGHTS[2], "night3", []),
            ):
                cmd = [
                    sys.executable,
                    "-m",
                    "semid_dist",
                    "nightly",
                    "--data_path",
                    f"s3://{BUCKET}/{prefix}/",
                    "--output_dir",
                    f"s3://{BUCKET}/semids",
                    "--generation",
                    night,
                    "--log_dir",
                    os.path.join(work, "logs"),
                    *extra,
                    *a.flags.split(),
                ]
                side = run_side(night, cmd, os.path.join(work, f"{night}.log"), env)
                side.pop("processes_at_peak")
                r = results(s3, night)
                side.update(
                    stages_s=r["timings_s"], counts=r["counts"], collision_rate=r["metrics"]["collision_rate"]
                )
                res["nights"][night] = side
            res["checks"] = checks(s3, results(s3, NIGHTS[2]))
        finally:
            server.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description="nightly job at catalog scale through a local S3 server")
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--new", type=int, default=20_000, help="new items on night 3")
    ap.add_argument("--data", default=None, help="catalog dir (default /tmp/bench/catalog_<n>)")
    ap.add_argument("--shards", type=int, default=16, help="the catalog's files (bench/synth.py)")
    ap.add_argument(
        "--churn", type=float, default=0.0, help="two local nights, this share changed/removed/new"
    )
    ap.add_argument("--flags", default="", help="more semid nightly flags, every night")
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT") or os.path.join(REPO, "bench_out"))
    a = ap.parse_args()

    data = synth.ensure(a.n, a.data or f"/tmp/bench/catalog_{a.n}", shards=a.shards)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    work = os.path.join(a.out, f"nightly_work_{a.n}_{stamp}")
    os.makedirs(work)
    res = {
        "n": a.n,
        "new": a.new,
        "timestamp": stamp,
        "machine": machine(),
        "nights": {},
        "command": " ".join([os.path.relpath(sys.executable, REPO)] + sys.argv),
    }
    if a.churn:
        churn(a, data, work, dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=pythonpath(REPO)), res)
    else:
        s3_nights(a, data, work, res)
    md = table(res)
    with open(os.path.join(a.out, f"nightly_{a.n}_{stamp}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(a.out, f"nightly_{a.n}_{stamp}.md"), "w") as f:
        f.write(md + "\n")
    where = (
        f"from and to S3 (SeaweedFS on 127.0.0.1), uploads {res['upload_s']['night1']} s (night 1), "
        f"{res['upload_s']['night3']} s (night 3)"
        if "upload_s" in res
        else f"local files, {a.churn:.1%} changed / removed / new on night 2, flags '{a.flags}'"
    )
    print(f"\nnightly benchmark: N={a.n}, {machine_line(res['machine'])}; {where}")
    print(md)
    for k, ok in res["checks"].items():
        print(f"  check {k}: {'ok' if ok else 'FAILED'}")
    print(f"results: {os.path.join(a.out, f'nightly_{a.n}_{stamp}.json')}")
    sys.exit(0 if all(res["checks"].values()) else 1)


def table(res: dict) -> str:
    lines = [
        "| night | items | stable / new / changed (kept ID) / removed | wall (s) | peak memory (GB) | "
        "stages (s) |",
        "|---|---|---|---|---|---|",
    ]
    for night, r in res["nights"].items():
        c = r["counts"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items() if k != "total")
        lines.append(
            f"| {night} | {c['items']:,} | {c['stable']:,} / {c['new']:,} / {c['changed']:,} "
            f"({c['changed_kept_id']:,}) / {c['removed']:,} | {r['wall_s']:.1f} | {r['peak_gb']:.2f} "
            f"| {stages} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
