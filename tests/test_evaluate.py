"""`semid evaluate` end to end on the embedded Wikidata films, with interaction logs generated here
(users who walk between embedding neighbours, tests/walks.py), and the retriever's own pieces.

The walks make the next item predictable from the embedding space. Semantic IDs carry that
space; the same IDs shuffled across items carry none of it, so a retriever that uses the ID
structure must beat the shuffled IDs by a wide margin, and one that ignored it could not.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from semid_dist.cli import main
from semid_dist.math.retriever import Retriever
from walks import write_walks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILMS = os.path.join(ROOT, "semid_dist", "data", "wikidata_films")
QUICK = ["--epochs", "4", "--patience", "0", "--bootstrap", "200", "--seeds", "1"]


def _films():
    t = pq.read_table(os.path.join(FILMS, "item_emb.parquet"))
    ids = t.column("ItemID").to_numpy()
    return ids, t.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)


@pytest.fixture(scope="module")
def films_run(ray_session, tmp_path_factory):
    """A kmeans run (3 x 32) over the 3,200 embedded films, and walks of 500 users over them."""
    d = tmp_path_factory.mktemp("evaluate")
    out = str(d / "km")
    argv = ["--data_path", FILMS, "--output_dir", out, "--mode", "kmeans", "--n_layers", "3"]
    assert main([*argv, "--n_clusters", "32", "--log_dir", str(d / "logs")]) == 0
    ids, x = _films()
    walks = str(d / "walks.parquet")
    write_walks(walks, ids, x, n_users=500, length=24, seed=3)
    return d, out, walks


def _evaluate(d, run, walks, name, *extra) -> tuple[int, str]:
    out = str(d / name)
    argv = [
        "evaluate",
        "--run",
        run,
        "--interactions",
        walks,
        "--output_dir",
        out,
        "--log_dir",
        str(d / "logs"),
    ]
    return main([*argv, *QUICK, *extra]), out


@pytest.mark.slow
def test_semantic_ids_beat_shuffled_ids_on_neighbour_walks(films_run, capsys):
    d, run, walks = films_run
    code, out = _evaluate(d, run, walks, "eval", "--baselines", "shuffled,popularity")
    assert code == 0, capsys.readouterr().err
    e = json.load(open(os.path.join(out, "evaluation.json")))
    assert set(json.load(open(os.path.join(out, "_SUCCESS")))["files"]) >= {
        "evaluation.json",
        "evaluation.html",
    }
    assert set(e["protocols"]) == {"loo", "dense"}
    dense = e["protocols"]["dense"]
    assert dense["targets"] == 500 * 10 and e["protocols"]["loo"]["targets"] == 500
    sem, shuf = dense["variants"]["run1"]["recall@10"], dense["variants"]["shuffled1"]["recall@10"]
    diff = next(
        x for x in dense["differences"] if (x["a"], x["b"], x["metric"]) == ("run1", "shuffled1", "recall@10")
    )
    assert sem["ci95"][0] <= sem["value"] <= sem["ci95"][1]
    assert diff["lo"] > 0.02 and sem["value"] > 2 * shuf["value"], (sem, shuf, diff)
    # the proxies sit beside the figures; every model's epochs were logged with validation Recall@10
    run1 = next(v for v in e["variants"] if v["name"] == "run1")
    assert run1["collision_rate"] is not None and run1["coherence_knn_same_first"] is not None
    assert len(e["training"]["models"]) == 4  # (run1, shuffled1) x (loo, dense), one seed
    log = open(os.path.join(out, "logs", e["log_file"])).read()
    assert "run1, dense, seed 42: epoch 4: loss" in log and "val Recall@10" in log
    assert [c["bucket"] for c in dense["cold"]] == ["0-4", "5-19", "20+"]
    page = open(os.path.join(out, "evaluation.html")).read()
    assert "data:image/png;base64," in page and "shuffled1" in page
    # semid report shows evaluations side by side
    html = str(d / "side_by_side.html")
    assert main(["report", out, out, "--out", html]) == 0
    assert open(html).read().count("Variants and their proxies") == 2
    # --resume finds the finished run's checkpoint: no model is trained again, same figures
    code, _ = _evaluate(d, run, walks, "eval", "--baselines", "shuffled,popularity", "--resume")
    assert code == 0
    again = json.load(open(os.path.join(out, "evaluation.json")))
    assert again["protocols"] == e["protocols"]
    log = open(os.path.join(out, "logs", again["log_file"])).read()
    assert "resumed from a checkpoint holding 4 trained model(s)" in log and "epoch 1: loss" not in log


def test_bad_interactions_get_one_line_and_nothing_is_published(films_run, capsys, tmp_path):
    d, run, walks = films_run
    t = pq.read_table(walks)
    cases = {
        "no_ts": (t.drop(["timestamp"]), "missing column 'timestamp'"),
        "unknown": (
            t.set_column(1, "ItemID", pa.array(np.r_[[1, 2], t.column("ItemID").to_numpy()[2:]])),
            "2 interactions (2 distinct ItemIDs) are not in",
        ),
        "text_ts": (t.set_column(2, "timestamp", pa.array(["x"] * t.num_rows)), "timestamp must be numeric"),
    }
    for name, (table, expected) in cases.items():
        path = str(tmp_path / f"{name}.parquet")
        pq.write_table(table, path)
        code, out = _evaluate(tmp_path, run, path, name)
        err = capsys.readouterr().err.strip().splitlines()
        line = [ln for ln in err if ln.startswith("semid: error:")]
        assert code == 2 and len(line) == 1 and expected in line[0], (name, err)
        assert "Traceback" not in "\n".join(err)
        published = os.listdir(out) if os.path.exists(out) else []
        assert not {"_SUCCESS", "evaluation.json"} & set(published), published
        assert not [p for p in published if p.startswith(".staging")], published
    code, _ = _evaluate(tmp_path, run, walks, "beam", "--beam_size", "5")
    assert code == 2 and "--beam_size" in capsys.readouterr().err


def test_inference_scores_what_training_scores():
    """next_logprobs level by level gives the log-likelihoods the training loss sums."""
    torch.manual_seed(0)
    sizes = [5, 4, 3]
    m = Retriever(sizes, max_history=6, d_model=16, encoder_layers=1, decoder_layers=1, heads=2, head_dim=8)
    m.eval()
    codes = torch.stack([torch.randint(0, v, (2, 5)) for v in sizes], -1)
    valid = torch.ones(2, 5, dtype=torch.bool)
    target = torch.zeros(2, 5, dtype=torch.bool)
    target[:, 4] = True
    with torch.no_grad():
        nll = float(m.loss(codes, valid, target))
        h = m.encode_history(codes[:, :4], valid[:, :4])[:, 3]
        total = 0.0
        for d in range(3):
            lp = m.next_logprobs(h, codes[:, 4, :d].unsqueeze(1))
            total -= float(lp[:, 0].gather(1, codes[:, 4, d : d + 1]).sum())
    assert nll == pytest.approx(total, rel=1e-5)


def test_popularity_recommends_the_most_interacted_unseen_items():
    from semid_dist.evaluate.figures import popularity_ranks
    from semid_dist.evaluate.steps import Queries

    counts = np.array([5, 9, 1, 7, 3, 9, 0, 2, 4, 6, 8, 2])  # item 1 and 5 tie: lower row first
    # query 0 saw items 1 and 3, wants item 9; query 1 saw nothing, wants item 6 (never seen in training)
    q = Queries(
        target_Q=np.array([9, 6]),
        context_QH=np.array([[1, 3], [0, -1]]),
        length_Q=np.array([2, 1]),
        seen_offsets_Q1=np.array([0, 2, 2]),
        seen_items=np.array([1, 3]),
    )
    # unseen by popularity for query 0: 5 (9), 10 (8), 9 (6) -> rank 3
    assert popularity_ranks(counts, q, keep_seen=False).tolist() == [3, 0]
    # with seen items kept: 1, 5, 10, 3, 9 -> rank 5
    assert popularity_ranks(counts, q, keep_seen=True).tolist() == [5, 0]
