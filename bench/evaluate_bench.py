"""`semid evaluate` on a real catalog with real interactions: its speed, and the tokenizer grid.

    python bench/evaluate_bench.py speed --catalog ITEMS.parquet --interactions EVENTS.parquet
    python bench/evaluate_bench.py grid  --catalog ITEMS.parquet --interactions EVENTS.parquet [--seeds 3]

speed: one kmeans 3 x 256 run, then `semid evaluate` with its defaults (the run, its IDs
       shuffled, one token per item, popularity; 3 seeds; loo and dense), timed as a user runs
       it (the whole process); the figures and the wall time against a 15-minute budget.
grid:  kmeans and tiger, x suffix and relocate, x 3 x 256 and 4 x 256 (eight runs), evaluated
       in one command, so every run is paired with the first (kmeans 3 x 256 suffix) and with the
       baselines; the proxies and the downstream figures side by side.

Runs are trained once and reused (under --out, default $BENCH_OUT or bench_out). Nothing derived
from the inputs belongs in the repository: point --out outside it for data you may not publish.
Writes <out>/evaluate_<what>_<timestamp>.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIGER = ["--latent_dim", "32", "--epochs", "50", "--batch_size", "256", "--eval_every", "10"]


def semid(args: list[str], log: str) -> float:
    """Run `python -m semid_dist ...` as a user would; returns its wall time."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        cmd = [sys.executable, "-m", "semid_dist", *args]
        p = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): semid {' '.join(args)}; see {log}")
    return time.perf_counter() - t0


def train(catalog: str, out: str, mode: str, levels: int, policy: str, logs: str) -> str:
    name = f"{mode}_{levels}x256_{policy}"
    path = os.path.join(out, "runs", name)
    if os.path.exists(os.path.join(path, "_SUCCESS")):
        return path
    size = ["--n_clusters", "256"] if mode == "kmeans" else ["--n_embed", "256", *TIGER]
    args = ["train", "--data_path", catalog, "--output_dir", path, "--mode", mode, "--n_layers", str(levels)]
    args += [*size, "--collision_policy", policy, "--log_dir", logs]
    secs = semid(args, os.path.join(out, f"{name}.log"))
    print(f"trained {name} in {secs:.0f} s", flush=True)
    return path


def table(e: dict) -> list[str]:
    desc = {d["name"]: d for d in e["variants"]}
    lines = []
    for p, fig in e["protocols"].items():
        lines += [
            f"\n{p}: {fig['targets']:,} targets, {fig['users']} users",
            "| variant | what | collisions | recon. err | R@10 [95%] | N@10 | R@5 | N@5 |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for v, m in fig["variants"].items():
            d = desc[v]
            what = os.path.basename(d["run"].rstrip("/")) if d.get("run") else d.get("what", "")
            coll = f"{100 * d['collision_rate']:.2f}%" if d.get("collision_rate") is not None else ""
            rel = d.get("relative_reconstruction_error")
            err = f"{rel:.4f}" if rel is not None else ""
            r10, lo, hi = m["recall@10"]["value"], *m["recall@10"]["ci95"]
            rest = " | ".join(f"{m[k]['value']:.4f}" for k in ("ndcg@10", "recall@5", "ndcg@5"))
            lines.append(f"| {v} | {what} | {coll} | {err} | {r10:.4f} [{lo:.4f}, {hi:.4f}] | {rest} |")
        lines += ["", "| a - b | R@10 diff [95%] |", "|---|---|"]
        for d in fig["differences"]:
            if d["metric"] == "recall@10":
                lines.append(f"| {d['a']} - {d['b']} | {d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}] |")
        lines += ["", "| target's training interactions | targets | " + " | ".join(fig["variants"]) + " |"]
        lines.append("|---|---|" + "---|" * len(fig["variants"]))
        for c in fig["cold"]:
            if c.get("targets"):
                cells = [
                    f"{c['recall@10'][v]['value']:.3f} [{c['recall@10'][v]['ci95'][0]:.3f}, "
                    f"{c['recall@10'][v]['ci95'][1]:.3f}]"
                    for v in fig["variants"]
                ]
                lines.append(f"| {c['bucket']} | {c['targets']:,} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["speed", "grid"])
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--interactions", required=True)
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT", "bench_out"))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--flags", default="", help="more flags for semid evaluate")
    a = ap.parse_args()
    out = os.path.abspath(a.out)
    logs = os.path.join(out, "logs")
    os.makedirs(logs, exist_ok=True)
    if a.what == "speed":
        runs = [train(a.catalog, out, "kmeans", 3, "suffix", logs)]
    else:
        runs = [
            train(a.catalog, out, mode, levels, policy, logs)
            for mode in ("kmeans", "tiger")
            for levels in (3, 4)
            for policy in ("suffix", "relocate")
        ]
    stamp = time.strftime("%Y%m%d_%H%M%S")
    ev = os.path.join(out, f"evaluate_{a.what}_{stamp}")
    args = ["evaluate", "--run", *runs, "--interactions", a.interactions, "--output_dir", ev]
    args += ["--log_dir", logs]
    args += ["--seeds", str(a.seeds), *a.flags.split()]
    wall = semid(args, ev + ".log")
    e = json.load(open(os.path.join(ev, "evaluation.json")))
    models = e["training"]["models"]
    head = [
        f"# semid evaluate {a.what}: {len(runs)} run(s), {len(models)} models, {a.seeds} seed(s); "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        f"wall time of `semid evaluate` (whole process): {wall:.0f} s = {wall / 60:.1f} min; "
        f"budget 15 min: ratio {wall / 900:.2f}",
        "stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in e["timings_s"].items()),
        f"epochs run per model: {sorted(m['epochs_run'] for m in models)}",
    ]
    lines = head + table(e)
    print("\n".join(lines))
    with open(ev + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(ev + "_bench.json", "w") as f:
        json.dump({"wall_s": wall, "runs": runs, "evaluation": ev}, f, indent=2)


if __name__ == "__main__":
    main()
