"""--collision_policy relocate end to end (CLI on the session's Ray): both modes, and nightly."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from semid_dist import load_tokenizer
from semid_dist.cli import main
from semid_dist.math.metrics import collision_stats

KMEANS = ["--mode", "kmeans", "--n_layers", "2", "--n_clusters", "16", "--max_iters", "10", "--seed", "5"]
TIGER = [
    "--mode",
    "tiger",
    "--n_layers",
    "2",
    "--n_embed",
    "16",
    "--latent_dim",
    "8",
    "--epochs",
    "3",
    "--batch_size",
    "100",
    "--seed",
    "5",
]


def train(data, out, *args):
    log_dir = os.path.join(os.path.dirname(out), "logs")
    assert main(["train", "--data_path", data, "--output_dir", out, "--log_dir", log_dir, *args]) == 0
    with open(os.path.join(out, "training_results.json")) as f:
        return json.load(f)


def published(out):
    t = pq.read_table(os.path.join(out, "semantic_id_mappings.parquet"))
    return t.column("ItemID").to_numpy(), np.array(t.column("semantic_id").to_pylist(), np.int64)


def recomputed_error(out, ids, x):
    """sum ||x - decode(published L codes)||^2 / sum ||x||^2, from the published files alone."""
    pub_ids, sid = published(out)
    tok = load_tokenizer(os.path.join(out, "final_model.pt"))
    order = np.argsort(ids)
    rows = order[np.searchsorted(ids[order], pub_ids)]
    x_hat = tok.decode(sid[:, :-1])
    return float(((x[rows] - x_hat) ** 2).sum(dtype=np.float64) / (x**2).sum(dtype=np.float64))


@pytest.mark.parametrize("mode", ["kmeans", "tiger"])
def test_relocate_moves_colliders_to_free_codes_and_reports_it(ray_session, small_catalog, tmp_path, mode):
    data, ids, x = small_catalog  # 600 items into 2 levels x 16 codes: many collisions
    args = KMEANS if mode == "kmeans" else TIGER
    suffix = train(data, str(tmp_path / "suffix"), *args)
    reloc = train(data, str(tmp_path / "relocate"), *args, "--collision_policy", "relocate")
    c = reloc["metrics"]["collisions"]
    s = suffix["metrics"]["collisions"]
    assert s["policy"] == "suffix" and c["policy"] == "relocate"
    # the same tokenizer (same seed): the policies differ only in the IDs
    assert reloc["metrics"]["relative_reconstruction_error"] == pytest.approx(
        suffix["metrics"]["relative_reconstruction_error"], rel=1e-6
    )
    assert c["rate_before"] == pytest.approx(s["rate_before"]) and c["rate_before"] > 0.2
    assert c["moved"] > 20 and c["rate_after"] < c["rate_before"]
    assert c["suffix_items"] < s["suffix_items"]
    _, sid_s = published(str(tmp_path / "suffix"))
    pub_ids, sid = published(str(tmp_path / "relocate"))
    assert len({tuple(r) for r in sid.tolist()}) == len(sid), "duplicate semantic ID"
    np.testing.assert_array_equal(sid[:, 0], sid_s[:, 0])  # only the last level moves
    moved = (sid[:, :-1] != sid_s[:, :-1]).any(axis=1)
    assert moved.sum() == c["moved"] and (sid[moved, -1] == 0).all()
    assert (sid[:, -1] > 0).sum() == c["suffix_items"]
    assert collision_stats(sid[:, :-1])["collision_rate"] == pytest.approx(c["rate_after"])
    # the reported errors are what the published codes reconstruct to
    assert c["error_before"] == pytest.approx(recomputed_error(str(tmp_path / "suffix"), ids, x), rel=1e-3)
    assert c["error_after"] == pytest.approx(recomputed_error(str(tmp_path / "relocate"), ids, x), rel=1e-3)
    assert c["error_after"] >= c["error_before"]
    log = open(os.path.join(tmp_path / "relocate", "logs", reloc["log_file"])).read()
    assert f"{c['moved']} items moved, {c['suffix_items']} still need a suffix" in log


def test_nightly_lineage_keeps_its_first_policy_and_night_one_equals_train(
    ray_session, small_catalog, tmp_path
):
    data, ids, x = small_catalog
    train(data, str(tmp_path / "train"), *KMEANS, "--collision_policy", "relocate")
    root = str(tmp_path / "lineage")
    log_dir = str(tmp_path / "logs")
    night = ["nightly", "--data_path", data, "--output_dir", root, "--log_dir", log_dir, *KMEANS]
    assert main([*night, "--generation", "n1", "--collision_policy", "relocate"]) == 0
    g1 = os.path.join(root, "generations", "n1")
    t_ids, t_sid = published(str(tmp_path / "train"))
    n_ids, n_sid = published(g1)
    np.testing.assert_array_equal(n_ids, t_ids)
    np.testing.assert_array_equal(n_sid, t_sid)
    # night 2 without the flag: the lineage's policy stays relocate, and the log says the flag lost
    assert main([*night, "--generation", "n2"]) == 0
    with open(os.path.join(root, "generations", "n2", "generation.json")) as f:
        assert json.load(f)["collision_policy"] == "relocate"
    logs = "".join(open(os.path.join(log_dir, f)).read() for f in os.listdir(log_dir))
    assert logs.count("--collision_policy suffix ignored: this lineage uses relocate") == 1
    n2_ids, n2_sid = published(os.path.join(root, "generations", "n2"))
    np.testing.assert_array_equal(n2_sid, n_sid)  # nothing changed: every ID kept
    # night 3 retrains, flags saying suffix: the tokenizer it fits and stores, and the results,
    # carry the lineage's policy, not the flag's
    assert main([*night, "--generation", "n3", "--retrain", "--seed", "6"]) == 0
    g3 = os.path.join(root, "generations", "n3")
    assert load_tokenizer(os.path.join(g3, "final_model.pt")).config["collision_policy"] == "relocate"
    with open(os.path.join(g3, "training_results.json")) as f:
        assert json.load(f)["config"]["collision_policy"] == "relocate"


def driver_relocation(out, ids, x, k=16):
    """relocate() over every item at once, in this process, with the published tokenizer and the
    encode pass's CPU arithmetic: ItemIDs sorted, and their semantic IDs."""
    from semid_dist.math.relocate import relocate

    enc = load_tokenizer(os.path.join(out, "final_model.pt")).cpu_encoder()
    order = np.argsort(ids)
    codes, _ = enc.encode_with_error(x[order])
    cand, err = enc.last_level_candidates(x[order], codes, k)
    rel = relocate(ids[order], codes, cand, err)
    return ids[order], np.concatenate([rel.codes_NL, rel.dedup_N[:, None]], axis=1)


def test_relocated_ids_do_not_depend_on_sharding_row_order_or_workers(ray_session, small_catalog, tmp_path):
    from conftest import write_shards

    data, ids, x = small_catalog
    a = str(tmp_path / "a")
    train(data, a, *KMEANS, "--collision_policy", "relocate")  # 600 items: one relocation task
    perm = np.random.default_rng(4).permutation(len(ids))
    shuffled = str(tmp_path / "shuffled")
    write_shards(shuffled, ids[perm], x[perm], 7)  # other row order, 7 shards: other tasks
    b = str(tmp_path / "b")
    tok = os.path.join(a, "final_model.pt")
    log_dir = str(tmp_path / "logs")
    argv = ["encode", "--data_path", shuffled, "--output_dir", b, "--tokenizer", tok, "--log_dir", log_dir]
    # relocated by many tasks (a bucket of prefixes each): the same IDs
    assert main([*argv, "--collision_policy", "relocate", "--relocate_task_rows", "40"]) == 0
    a_ids, a_sid = published(a)
    b_ids, b_sid = published(b)
    np.testing.assert_array_equal(a_ids, b_ids)
    np.testing.assert_array_equal(a_sid, b_sid)
    ref_ids, ref_sid = driver_relocation(a, ids, x)  # and relocate() over all rows at once
    np.testing.assert_array_equal(a_ids, ref_ids)
    np.testing.assert_array_equal(a_sid, ref_sid)
    assert (ref_sid[:, -1] > 0).any()  # some items kept a suffix
    c = json.load(open(os.path.join(b, "training_results.json")))["metrics"]["collisions"]
    assert c["moved"] > 20 and c["tasks"] > 1


def test_nightly_relocation_in_tasks_equals_the_driver_version(ray_session, tmp_path):
    """Two nights under relocate, the second with 100 changed, 100 removed and 100 new items,
    relocated in tasks of about 60 items: the IDs of math.generations.assign with every item's
    candidates at hand; and string ItemIDs in the same bytewise order get the same IDs."""
    from test_string_ids import string_ids, write

    from conftest import make_catalog, write_parquet
    from semid_dist.lineage import tokenizer_fingerprint
    from semid_dist.math import generations as gen

    _, x1 = make_catalog(700, 32, seed=6)
    x2 = x1.copy()
    x2[100:200] += 0.3 * np.random.default_rng(1).normal(size=(100, 32)).astype(np.float32)
    x2[100:200] /= np.linalg.norm(x2[100:200], axis=1, keepdims=True)
    names = string_ids(700, seed=9)
    ints = np.empty(700, np.int64)  # integer ItemIDs in the names' bytewise order
    ints[sorted(range(700), key=lambda i: names[i].encode())] = np.arange(700) + 5000
    nights = (("n1", np.arange(0, 600), x1), ("n2", np.arange(100, 700), x2))
    for name, rows, x in nights:
        write_parquet(str(tmp_path / "int" / name / "part-0.parquet"), ints[rows], x[rows])
        write(str(tmp_path / "str" / name / "part-0.parquet"), names[rows], x[rows])
    tok = str(tmp_path / "tok")
    train(str(tmp_path / "int" / "n1"), tok, *KMEANS)
    flags = ["--tokenizer", os.path.join(tok, "final_model.pt"), "--collision_policy", "relocate"]
    for kind in ("int", "str"):
        for name, _, _ in nights:
            argv = ["nightly", "--data_path", str(tmp_path / kind / name), "--generation", name]
            argv += ["--output_dir", str(tmp_path / kind / "ids"), "--log_dir", str(tmp_path / "logs")]
            assert main([*argv, *flags, "--relocate_task_rows", "60"]) == 0

    tokenizer = load_tokenizer(os.path.join(tok, "final_model.pt"))
    enc = tokenizer.cpu_encoder()
    prev, retired = gen.IdTable.empty(3), gen.RetiredTable.empty(3)
    for seq, (name, rows, x) in enumerate(nights, start=1):
        order = np.argsort(ints[rows])
        codes, _ = enc.encode_with_error(x[rows][order])
        cand, err = enc.last_level_candidates(x[rows][order], codes, 16)
        fp = gen.embedding_fingerprints(x[rows][order])
        ref = gen.assign(prev, retired, ints[rows][order], fp, codes, tokenizer_fingerprint(tokenizer), seq,
                         "keep_if_same_codes", cand, err)  # fmt: skip
        prev, retired = ref.mapping, ref.retired
        got_ids, got_sid = published(str(tmp_path / "int" / "ids" / "generations" / name))
        np.testing.assert_array_equal(got_ids, ref.mapping.ids)
        np.testing.assert_array_equal(got_sid, ref.mapping.sid)
        s = pq.read_table(
            str(tmp_path / "str" / "ids" / "generations" / name / "semantic_id_mappings.parquet")
        )
        as_int = {n: i for n, i in zip(names.tolist(), ints.tolist(), strict=True)}
        by_int = dict(
            zip(
                [as_int[n] for n in s.column("ItemID").to_pylist()],
                s.column("semantic_id").to_pylist(),
                strict=True,
            )
        )
        assert by_int == {int(i): list(v) for i, v in zip(got_ids, got_sid.tolist(), strict=True)}
    assert (
        ref.counts["changed"] == 100 and ref.counts["fresh_ids"] >= 100 and (ref.mapping.sid[:, -1] > 0).any()
    )
