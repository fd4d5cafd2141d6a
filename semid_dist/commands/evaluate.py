"""``semid evaluate --run RUN [RUN ...] --interactions PATH --output_dir OUT``

Trains a small generative retriever (semid_dist/math/retriever.py) on each run's IDs and on
baselines, with the same data, model and seeds, and publishes evaluation.json and
evaluation.html (docs/evaluate.md: the protocol and how to read the figures).

    read      the runs' mappings and results; the interactions, validated; histories
    train     one Ray Train run: every (variant, protocol, seed) model in turn (evaluate/driver.py)
    figures   Recall/NDCG@5/10 with paired bootstrap intervals over users; cold-item buckets
    publish   evaluation.json, evaluation.html, the log, then _SUCCESS
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np

from semid_dist import __version__, runtime
from semid_dist.evaluate import driver, figures, html, prepare
from semid_dist.evaluate.config import EvalConfig
from semid_dist.evaluate.interactions import read_interactions, to_histories
from semid_dist.published import EVALUATION as EVALUATION_JSON
from semid_dist.run import Run, close_logging

log = logging.getLogger("semid_dist")

EVALUATION_HTML = "evaluation.html"
PROTOCOL_TEXT = {
    "loo": "leave-one-out (TIGER): each user's last item is the test target, the second-last "
    "validates, the items before train",
    "dense": "each of each user's last --test_last items is a target given the items before it; "
    "the item before them validates, the items before that train",
}


def run(cfg: EvalConfig, log_dir: str = "logs") -> dict:
    with Run(cfg, log_dir) as r:
        pub = r.publisher(cfg.output_dir)
        with r.stage("read"):
            runs = prepare.load_runs(cfg.run, r.store)
            table = read_interactions(cfg.interactions, r.store)
            hist, info = to_histories(table, runs[0].ids_N, runs[0].name)
            del table
            _log_input(info, runs)
            tables, described = prepare.variants(cfg, runs)
            n_items = len(runs[0].ids_N)
            protos = {p: prepare.protocol_data(hist, p, cfg, n_items) for p in cfg.protocol_list}
        tasks = [
            {"variant": v, "protocol": p, "seed": cfg.seed + s}
            for p in cfg.protocol_list
            for v in tables
            for s in range(cfg.seeds)
        ]
        data = {
            "variants": tables,
            "protocols": {p: {k: d[k] for k in ("windows", "val", "test")} for p, d in protos.items()},
        }
        digest = prepare.digest(hist.offsets_U1, hist.items_T, *tables.values())
        runtime.ensure_ray(cfg)
        with r.stage("train"):
            trained = driver.train_all(cfg, data, tasks, digest, r.store) if tasks else {"results": []}
        with r.stage("figures"):
            evaluation = _evaluation(cfg, info, described, protos, trained, len(hist.users_U), n_items)
        evaluation["timings_s"] = r.timings()
        evaluation["log_file"] = os.path.basename(r.log_path)
        evaluation["run_id"] = pub.run_id
        evaluation["output_dir"] = cfg.output_dir
        _log_summary(evaluation)
        pub.write_text(EVALUATION_JSON, json.dumps(evaluation, indent=2) + "\n")
        pub.write_text(EVALUATION_HTML, html.render([evaluation], [cfg.output_dir]))
        close_logging()
        pub.put_file(r.log_path, f"logs/{os.path.basename(r.log_path)}")
        pub.publish({"kind": "evaluation"})
        evaluation["log_path"] = r.log_path
        return evaluation


def _log_input(info: dict, runs: list) -> None:
    log.info(
        "interactions: %d rows, %d users kept; %d user(s) with fewer than 3 interactions dropped "
        "(%d interactions); %d items in %s",
        info["rows"],
        info["users"],
        info["users_dropped"],
        info["interactions_dropped"],
        len(runs[0].ids_N),
        ", ".join(r.name for r in runs),
    )


def _evaluation(cfg, info, described, protos, trained, n_users, n_items) -> dict:
    names = [d["name"] for d in described]
    kinds = {d["name"]: d["kind"] for d in described}
    results = trained["results"]
    out_protocols = {}
    for p, d in protos.items():
        ranks: dict[str, list[np.ndarray]] = {v: [] for v in names}
        for res in results:
            if res["protocol"] == p:
                ranks[res["variant"]].append(np.asarray(res["test_rank"], np.int64))
        if "popularity" in kinds:
            ranks["popularity"] = [figures.popularity_ranks(d["train_counts_N"], d["test"], cfg.keep_seen)]
        counts_Q = d["train_counts_N"][d["test"].target_Q]
        fig = figures.protocol_figures(
            names,
            ranks,
            d["test_user_Q"],
            n_users,
            counts_Q,
            figures.comparisons(names, kinds),
            cfg.bootstrap,
            cfg.seed,
        )
        out_protocols[p] = {"description": PROTOCOL_TEXT[p], **fig}
    models = [
        {k: v for k, v in res.items() if k != "test_rank"} | {"epochs_run": len(res["history"])}
        for res in results
    ]
    return {
        "semid_dist_version": __version__,
        "kind": "evaluation",
        "config": cfg.to_dict(),
        "interactions": {**info, "items": n_items},
        "order": "each user's interactions by timestamp, ties by ItemID",
        "seen_items": "kept" if cfg.keep_seen else "excluded from the recommendations",
        "variants": described,
        "protocols": out_protocols,
        "training": {**trained.get("info", {}), "models": models},
    }


def _log_summary(e: dict) -> None:
    for p, fig in e["protocols"].items():
        log.info("%s protocol: %d targets over %d users", p, fig["targets"], fig["users"])
        for v, m in fig["variants"].items():
            r10 = m["recall@10"]
            log.info(
                "  %-12s Recall@10 %.4f [%.4f, %.4f]  NDCG@10 %.4f",
                v,
                r10["value"],
                *r10["ci95"],
                m["ndcg@10"]["value"],
            )


def print_summary(e: dict) -> None:
    desc = {d["name"]: d for d in e["variants"]}
    print(f"\nsemid evaluate: {e['interactions']['users']} users, {e['interactions']['items']} items")
    for p, fig in e["protocols"].items():
        print(f"  {p} ({fig['targets']} targets): Recall@10 [95% interval]")
        for v, m in fig["variants"].items():
            r10 = m["recall@10"]
            what = desc[v].get("run") or desc[v].get("what", "")
            print(f"    {v:<12} {r10['value']:.4f} [{r10['ci95'][0]:.4f}, {r10['ci95'][1]:.4f}]  {what}")
    print(f"  outputs: {e['output_dir']}")
    print(f"  log:     {e['log_path']}")
