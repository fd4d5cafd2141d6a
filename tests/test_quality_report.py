"""math/quality.py against plain numpy references, and the HTML report on a real published run."""

from __future__ import annotations

import base64
import json
import os
import re
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from published_runs import FILMS, N_CLUSTERS, N_ITEMS, N_LAYERS, kmeans_run

from semid_dist import report_html
from semid_dist.io.publish import Publisher
from semid_dist.io.storage import Storage
from semid_dist.math.metrics import level_stats
from semid_dist.math.quality import coherence, gini, group_size_histogram

# --- references: the definitions, written the slow obvious way --------------------------------


def gini_ref(counts) -> float:
    """Mean absolute difference over all ordered pairs / (2 * mean)."""
    x = np.asarray(counts, dtype=np.float64)
    if x.sum() == 0:
        return 0.0
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean()))


def coherence_ref(x, codes, k):
    s = len(x)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    np.fill_diagonal(sim, -np.inf)
    nn = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    first = [tuple(c[:1]) for c in codes]
    two = [tuple(c[:2]) for c in codes]
    knn1 = np.mean([[first[j] == first[i] for j in nn[i]] for i in range(s)])
    knn2 = np.mean([[two[j] == two[i] for j in nn[i]] for i in range(s)])
    pairs = [(i, j) for i in range(s) for j in range(s) if i != j]
    rnd1 = np.mean([first[i] == first[j] for i, j in pairs])
    rnd2 = np.mean([two[i] == two[j] for i, j in pairs])
    return knn1, knn2, rnd1, rnd2


# --- the math ---------------------------------------------------------------------------------


def test_gini_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    assert gini(np.full(16, 7)) == pytest.approx(0.0)
    assert gini(np.eye(1, 16, 3)[0] * 50) == pytest.approx(15 / 16)  # one code holds every item
    assert gini(np.zeros(8)) == 0.0
    for _ in range(20):
        k = int(rng.integers(1, 300))
        counts = rng.integers(0, 1000, size=k) * (rng.random(k) < 0.7)  # ~30% dead codes
        assert gini(counts) == pytest.approx(gini_ref(counts), rel=1e-12, abs=1e-12)


def test_level_stats_adds_gini_and_keeps_its_keys():
    rng = np.random.default_rng(1)
    codes = np.stack([rng.integers(0, 5, 400), rng.integers(0, 16, 400)], axis=1)
    stats = level_stats(codes, 16)  # level 0 uses 5 of 16 codes: 11 dead codes count as 0
    assert [set(s) for s in stats] == [{"level", "codes_used", "dead_codes", "perplexity", "gini"}] * 2
    for level, s in enumerate(stats):
        counts = np.bincount(codes[:, level], minlength=16)
        assert s["gini"] == pytest.approx(gini_ref(counts))
        assert s["codes_used"] == int((counts > 0).sum()) and s["dead_codes"] == 16 - s["codes_used"]


def test_group_size_histogram_matches_a_counter():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 4, size=(3000, 3))
    per_size = Counter(Counter(map(tuple, codes)).values())
    h = group_size_histogram(codes)
    assert h == {"sizes": sorted(per_size), "groups": [per_size[s] for s in sorted(per_size)]}
    assert sum(s * g for s, g in zip(h["sizes"], h["groups"], strict=True)) == len(codes)
    assert group_size_histogram(np.arange(5)[:, None]) == {"sizes": [1], "groups": [5]}
    assert group_size_histogram(np.zeros((0, 3), np.int64)) == {"sizes": [], "groups": []}


@pytest.mark.parametrize("s,levels,k", [(300, 3, 10), (40, 2, 5), (6, 3, 10), (30, 1, 4)])
def test_coherence_matches_brute_force(s, levels, k):
    rng = np.random.default_rng(s)
    x = rng.normal(size=(s, 12)).astype(np.float32)
    codes = rng.integers(0, 3, size=(s, levels))
    codes[:, 0] = (x[:, 0] > 0).astype(int)  # a first code that follows the embedding
    c = coherence(x * rng.uniform(0.5, 3, size=(s, 1)), codes, k)  # cosine: scale does not matter
    k_eff = min(k, s - 1)
    knn1, knn2, rnd1, rnd2 = coherence_ref(x.astype(np.float64), codes, k_eff)
    assert (c["sample"], c["k"]) == (s, k_eff)
    assert c["knn_same_first"] == pytest.approx(knn1)
    assert c["knn_same_first_two"] == pytest.approx(knn2)
    assert c["random_same_first"] == pytest.approx(rnd1)
    assert c["random_same_first_two"] == pytest.approx(rnd2)
    if levels == 1:  # no second code: the two-code shares are the first code's
        assert c["knn_same_first_two"] == c["knn_same_first"]
    if s >= 40:
        assert c["knn_same_first"] > c["random_same_first"]


def test_coherence_of_one_item():
    c = coherence(np.ones((1, 4), np.float32), np.zeros((1, 2), np.int64), 10)
    assert c == {
        "sample": 1,
        "k": 0,
        "knn_same_first": None,
        "knn_same_first_two": None,
        "random_same_first": 0.0,
        "random_same_first_two": 0.0,
    }


# --- the report on a real run -----------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return kmeans_run(tmp_path_factory)


def full_results(run_dir: str) -> dict:
    """The run's results, with the sections the train command records (group sizes, coherence,
    Gini) checked to be there."""
    results = json.load(open(os.path.join(run_dir, "training_results.json")))
    m = results["metrics"]
    assert {"group_sizes", "coherence", "collisions"} <= set(m) and all("gini" in lv for lv in m["levels"])
    return results


def tokenizer_codes(run_dir: str) -> np.ndarray:
    """The codes the published tokenizer gives the published items, before the collision policy."""
    from semid_dist import load_tokenizer

    ids = pq.read_table(os.path.join(run_dir, "semantic_id_mappings.parquet")).column("ItemID").to_pylist()
    cat = pq.read_table(os.path.join(FILMS, "item_emb.parquet"))
    emb = dict(zip(cat.column("ItemID").to_pylist(), cat.column("embedding").to_pylist(), strict=True))
    x = np.array([emb[i] for i in ids], np.float32)
    return load_tokenizer(os.path.join(run_dir, "final_model.pt")).encode(x)


def histogram_ref(codes) -> dict:
    per_size = Counter(Counter(map(tuple, codes)).values())
    return {"sizes": sorted(per_size), "groups": [per_size[s] for s in sorted(per_size)]}


def images(page: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "no external assets"
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in images(page))


def test_report_of_a_real_run_has_every_section(run_dir):
    results = full_results(run_dir)
    page = report_html.render(results, ["films"])
    assert_self_contained(page)
    assert len(images(page)) == 2  # group sizes, coherence (kmeans: no training curves)
    for text in ("films", "Code usage per level", "Gini", "Collisions", "Semantic coherence", "group size"):
        assert text in page
    m = results["metrics"]
    assert f"{100 * m['collision_rate']:.2f}%" in page
    assert f"{100 * m['coherence']['knn_same_first']:.2f}%" in page
    assert f"{m['relative_reconstruction_error']:.4f}" in page
    assert "not recorded" not in page


def test_report_renders_missing_sections_and_runs_side_by_side(run_dir):
    bare = json.load(open(os.path.join(run_dir, "training_results.json")))
    for key in ("group_sizes", "coherence", "collisions"):
        bare["metrics"].pop(key, None)
    for lv in bare["metrics"]["levels"]:
        lv.pop("gini", None)
    tiger = {"mode": "tiger", "metrics": {}, "training": {}}  # nothing recorded at all
    page = report_html.render([full_results(run_dir), bare, tiger], ["full", "bare", "empty"])
    assert_self_contained(page)
    assert page.index("<h2>Comparison</h2>") < page.index("<h2>full</h2>") < page.index("<h2>bare</h2>")
    assert "semantic coherence: not recorded" in page and "group-size histogram: not recorded" in page
    assert "per-epoch history: not recorded" in page and "per-level statistics: not recorded" in page
    assert len(images(page)) == 2  # only the full run has figures
    assert "repeat(3," in page  # three columns


def test_report_draws_tiger_training_curves_from_the_history():
    history = [
        {
            "epoch": e,
            "loss": 1.0 / e,
            "recon": 0.9 / e,
            "commit": 0.1 / e,
            "codebook": 0.0,
            "val_rel_recon": 0.5,
        }
        | (
            {"rel_recon": 0.4, "codes_used": [8, 7], "perplexity": [6.0, 5.0], "dup_rate": 0.1}
            if e % 2
            else {}
        )
        for e in range(1, 6)
    ]
    results = {"mode": "tiger", "metrics": {}, "training": {"history": history, "kept_model": {"epoch": 5}}}
    page = report_html.render(results)
    assert "Training curves" in page and "published model: epoch 5" in page
    assert len(images(page)) == 1


def test_write_publishes_the_report(run_dir, tmp_path):
    out = str(tmp_path / "pub")
    pub = Publisher(out, Storage())
    report_html.write(pub, full_results(run_dir))
    pub.publish()
    page = open(os.path.join(out, report_html.QUALITY_REPORT)).read()
    assert_self_contained(page)
    assert report_html.QUALITY_REPORT in json.load(open(os.path.join(out, "_SUCCESS")))["files"]


def test_the_published_run_carries_its_report_and_quality_metrics(run_dir):
    """`semid train` records the group sizes, coherence and Gini and publishes quality_report.html;
    recomputed here from the published mappings and the published tokenizer's codes."""
    m = full_results(run_dir)["metrics"]
    t = pq.read_table(os.path.join(run_dir, "semantic_id_mappings.parquet"))
    after = np.array(t.column("semantic_id").to_pylist())[:, :N_LAYERS]
    before = tokenizer_codes(run_dir)
    assert m["group_sizes"] == {"before": histogram_ref(before), "after": histogram_ref(after)}
    assert m["collisions"]["policy"] == "relocate" and m["collisions"]["moved"] > 0
    assert m["collisions"]["rate_after"] == pytest.approx(1 - len(set(map(tuple, after))) / N_ITEMS)
    assert m["collision_rate"] == pytest.approx(1 - len(set(map(tuple, before))) / N_ITEMS)
    c = m["coherence"]
    assert c["sample"] == N_ITEMS and c["k"] == 10  # every item is in the 10k sample
    assert 0 <= c["random_same_first_two"] <= c["random_same_first"] < c["knn_same_first"] <= 1
    for lv, col in zip(m["levels"], before.T, strict=True):  # the tokenizer's codes' usage
        assert lv["gini"] == pytest.approx(gini_ref(np.bincount(col, minlength=N_CLUSTERS)))
    page = open(os.path.join(run_dir, report_html.QUALITY_REPORT)).read()
    assert_self_contained(page)
    assert len(images(page)) == 2 and "not recorded" not in page and "after policy (relocate)" in page
    for size in sorted(set(m["group_sizes"]["before"]["sizes"]) | set(m["group_sizes"]["after"]["sizes"])):
        b = dict(zip(*m["group_sizes"]["before"].values(), strict=True)).get(size, 0)
        a = dict(zip(*m["group_sizes"]["after"].values(), strict=True)).get(size, 0)
        assert f"<tr><td>{size}</td><td>{b}</td><td>{a}</td></tr>" in page
