"""tiger benchmark: training throughput with 1 and 2 workers, and the data-pipeline overhead.

Runs over the same items (the first --items rows of the synthetic catalog of
bench/synth.py), the same model, seed and --epochs:

- in-memory: this process, no Ray: the rows are loaded into a tensor first (not timed), then
  the product's own loop (semid_dist.tiger.steps: codebook init, train_epoch, evaluate) runs
  over it. The reference throughput. It runs before the product runs and, with
  --references 2 (the default), once more after them: the same loop's speed moves between
  runs on a shared machine, so the overhead is printed against the mean of the two and against
  each (the range says how far the noise alone moves it).
- product, 1 worker and 2 workers: ``semid train --mode tiger`` as a subprocess. Each Ray Train
  worker streams its shard through Ray Data once (read_shard) and then runs the same loop. Its
  first epoch record holds the time the shard read took (data_read_s).

Throughput = training items x epochs / (seconds of the training loop). "Fed by Ray Data" adds
the worker's data intake (data_read_s) to the loop time; the data-pipeline overhead is
1 - (fed by Ray Data, 1 worker) / (in memory), checked against the target (at most 15%,
OVERHEAD_TARGET). The loop's own slowdown in the Ray Train worker, 1 - (loop, 1 worker) /
(in memory), is printed with it: over many epochs it is what remains.
Ray and Ray Train start-up is reported apart (wall of the whole run), since it does not grow
with the data.

Writes <out>/tiger_<items>_<device>_<timestamp>.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, REPO)

import synth  # noqa: E402
from kmeans_bench import machine, machine_line, pythonpath, save  # noqa: E402


def flags(a) -> list[str]:
    return [
        "--mode",
        "tiger",
        "--epochs",
        str(a.epochs),
        "--batch_size",
        str(a.batch_size),
        "--n_layers",
        "3",
        "--n_embed",
        str(a.n_embed),
        "--latent_dim",
        str(a.latent_dim),
        "--max_items",
        str(a.items),
        "--patience",
        str(a.epochs + 1),
        "--device",
        a.device,
    ]


def in_memory(a, data: str) -> dict:
    """The product's training loop over tensors already in memory (one process, no Ray)."""
    import numpy as np
    import pyarrow.dataset as pds
    import torch

    from semid_dist.catalog import schema as datalib
    from semid_dist.cli import parse_config
    from semid_dist.math.rqvae import RQVAE
    from semid_dist.tiger import steps
    from semid_dist.tiger.collectives import Collectives

    cfg = parse_config(["train", "--data_path", data, "--output_dir", "unused", *flags(a)])[0]
    device = torch.device("cuda" if a.device == "cuda" else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    files = sorted(os.path.join(data, f) for f in os.listdir(data) if f.endswith(".parquet"))
    table = pds.dataset(files).head(a.items, columns=[datalib.ID_COL, datalib.EMB_COL])
    ids_N, x_ND = datalib.batch_to_arrays(table, a.dim)
    comm = Collectives(device)
    rank_data = steps.RankData.build(ids_N, np.array(x_ND), cfg, comm, device, consume=True)
    load_s = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)
    model = RQVAE(**steps.model_args(cfg, a.dim))
    steps.init_weights(model)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    t1 = time.perf_counter()
    steps.init_codebooks(model, rank_data, cfg, comm)
    init_s = time.perf_counter() - t1
    epochs, step = [], 0
    for epoch in range(cfg.epochs):
        t = time.perf_counter()
        _, step = steps.train_epoch(model, model, opt, rank_data, epoch, step, cfg, comm, 10**9)
        metrics, _ = steps.evaluate(model, rank_data, comm, catalog=steps.catalog_eval_due(epoch + 1, cfg))
        epochs.append(round(time.perf_counter() - t, 3))
    return {
        "n_train": rank_data.n_train,
        "load_s": round(load_s, 3),
        "codebook_init_s": round(init_s, 3),
        "epoch_s": epochs,
        "steps": step,
        "val_recon": metrics.get("val_recon"),
    }


def product(a, data: str, workers: int, work: str) -> dict:
    out = os.path.join(work, f"product_{workers}w")
    cmd = [
        sys.executable,
        "-m",
        "semid_dist",
        "train",
        "--data_path",
        data,
        "--output_dir",
        out,
        "--log_dir",
        os.path.join(work, f"logs_{workers}w"),
        "--num_workers",
        str(workers),
        *flags(a),
    ]
    print(f"[product {workers}w] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(os.path.join(work, f"product_{workers}w.log"), "w") as log:
        rc = subprocess.run(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=pythonpath(REPO), RAY_USAGE_STATS_ENABLED="0"),
        ).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"product run with {workers} worker(s) failed (exit {rc}); see {log.name}")
    with open(os.path.join(out, "training_results.json")) as f:
        res = json.load(f)
    hist = res["training"]["history"]
    return {
        "wall_s": round(wall, 2),
        "fit_s": res["timings_s"]["fit"],
        "data_read_s": hist[0].get("data_read_s"),
        "codebook_init_s": hist[0].get("codebook_init_s"),
        "epoch_s": [h["time_s"] for h in hist],
        "steps": res["training"]["steps"],
        "items": res["input"]["items"],
        "val_recon": hist[-1].get("val_recon"),
    }


OVERHEAD_TARGET = 0.15  # the target: data-pipeline overhead at most 15%


def _references(res: dict) -> list[tuple[str, dict]]:
    refs = [("in memory (same loop, no Ray)", res["in_memory"])]
    if res.get("in_memory_after"):
        refs = [
            ("in memory, before the product runs", res["in_memory"]),
            ("in memory, after the product runs", res["in_memory_after"]),
        ]
    return refs


def summarise(res: dict) -> tuple[str, dict]:
    refs = _references(res)
    n, e = res["in_memory"]["n_train"], len(res["in_memory"]["epoch_s"])
    rows, derived = [], {}
    ref_tputs = []
    for label, mem in refs:
        tput = n * e / sum(mem["epoch_s"])
        ref_tputs.append(tput)
        rows.append(
            (
                label,
                f"{mem['load_s']:.1f} (load, untimed)",
                f"{mem['codebook_init_s']:.1f}",
                " / ".join(f"{s:.1f}" for s in mem["epoch_s"]),
                f"{tput:,.0f}",
                "-",
                "-",
            )
        )
    mem_tput = sum(ref_tputs) / len(ref_tputs)
    derived["in_memory_items_per_s"] = round(mem_tput)
    if len(ref_tputs) > 1:
        derived["in_memory_items_per_s_each"] = [round(t) for t in ref_tputs]
    for w in (1, 2):
        p = res.get(f"product_{w}w")
        if not p:
            continue
        loop_s = sum(p["epoch_s"])
        tput = n * e / loop_s
        fed = n * e / (loop_s + p["data_read_s"])
        derived[f"product_{w}w_items_per_s"] = round(tput)
        derived[f"product_{w}w_fed_items_per_s"] = round(fed)
        rows.append(
            (
                f"product, {w} worker(s), Ray Data",
                f"{p['data_read_s']:.1f}",
                f"{p['codebook_init_s']:.1f}",
                " / ".join(f"{s:.1f}" for s in p["epoch_s"]),
                f"{tput:,.0f}",
                f"{fed:,.0f}",
                f"{p['wall_s']:.1f}",
            )
        )
    notes = []
    if "product_1w_fed_items_per_s" in derived:
        fed, loop = derived["product_1w_fed_items_per_s"], derived["product_1w_items_per_s"]
        derived["pipeline_overhead_1w"] = round(1 - fed / mem_tput, 4)
        # What stays over many epochs: the loop alone in the Ray Train worker against in memory.
        derived["loop_slowdown_1w"] = round(1 - loop / mem_tput, 4)
        spread = ""
        if len(ref_tputs) > 1:
            derived["pipeline_overhead_1w_range"] = [round(1 - fed / t, 4) for t in sorted(ref_tputs)]
            lo, hi = derived["pipeline_overhead_1w_range"]
            spread = f"; {100 * lo:.1f}% to {100 * hi:.1f}% against each in-memory run"
        derived["target_overhead_met"] = derived["pipeline_overhead_1w"] <= OVERHEAD_TARGET
        notes.append(
            f"data-pipeline overhead (1 worker): {100 * derived['pipeline_overhead_1w']:.1f}% "
            f"against the in-memory loop{' (mean of both runs)' if len(ref_tputs) > 1 else ''}{spread} "
            f"(the loop alone in the worker, without the one-time intake: "
            f"{100 * derived['loop_slowdown_1w']:.1f}% fewer items/s than in memory)"
        )
        notes.append(
            f"  target data-pipeline overhead <= {100 * OVERHEAD_TARGET:.0f}%: "
            f"{'met' if derived['target_overhead_met'] else 'NOT met'}"
        )
    if "product_2w_items_per_s" in derived and "product_1w_items_per_s" in derived:
        derived["speedup_2w_over_1w"] = round(
            derived["product_2w_items_per_s"] / derived["product_1w_items_per_s"], 3
        )
        notes.append(f"2 workers / 1 worker (loop throughput): {derived['speedup_2w_over_1w']:.2f}x")
    head = (
        "| run | data intake (s) | codebook init (s) | epochs (s) | items/s, loop | items/s, fed by "
        "Ray Data | wall, whole run (s) |\n|---|---|---|---|---|---|---|"
    )
    md = head + "\n" + "\n".join("| " + " | ".join(r) + " |" for r in rows)
    if notes:
        md += "\n\n" + "\n".join(notes)
    return md, derived


def main() -> None:
    ap = argparse.ArgumentParser(description="tiger benchmark: throughput and data-pipeline overhead")
    ap.add_argument("--n", type=int, default=1_000_000, help="catalog size (generated once)")
    ap.add_argument("--items", type=int, default=100_000, help="items trained on (the first rows)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=512)
    ap.add_argument("--n_embed", type=int, default=256)
    ap.add_argument("--latent_dim", type=int, default=32)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument(
        "--references",
        type=int,
        default=2,
        choices=[1, 2],
        help="in-memory reference runs: 1 (before the product) or 2 (before and after)",
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--data", default=None, help="catalog dir (default /tmp/bench/catalog_<n>)")
    ap.add_argument("--out", default=os.environ.get("BENCH_OUT") or os.path.join(REPO, "bench_out"))
    a = ap.parse_args()

    data = synth.ensure(a.n, a.data or f"/tmp/bench/catalog_{a.n}", 16, a.dim)
    stamp = time.strftime("%Y%m%d_%H%M%S")
    work = os.path.join(a.out, f"tiger_work_{a.items}_{a.device}_{stamp}")
    os.makedirs(work)
    res = {
        "items": a.items,
        "catalog": data,
        "epochs": a.epochs,
        "batch_size": a.batch_size,
        "n_embed": a.n_embed,
        "latent_dim": a.latent_dim,
        "device": a.device,
        "timestamp": stamp,
        "machine": machine(),
        "command": " ".join([os.path.relpath(sys.executable, REPO)] + sys.argv),
    }
    print("[in memory] the product's loop over tensors in memory", flush=True)
    res["in_memory"] = in_memory(a, data)
    for w in (int(x) for x in a.workers.split(",")):
        res[f"product_{w}w"] = product(a, data, w, work)
    if a.references > 1:
        print("[in memory] again, after the product runs", flush=True)
        res["in_memory_after"] = in_memory(a, data)
    md, derived = summarise(res)
    res["derived"] = derived
    base = save(os.path.join(a.out, f"tiger_{a.items}_{a.device}_{stamp}"), res, md)
    print(
        f"\ntiger benchmark: {a.items} items x {a.dim}, {a.epochs} epochs, batch {a.batch_size}, "
        f"3 x {a.n_embed}, latent {a.latent_dim}, device {a.device}, {machine_line(res['machine'])}"
    )
    print(md)
    print(f"results: {base}.json")


if __name__ == "__main__":
    main()
