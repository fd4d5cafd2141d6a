"""End to end through the CLI (in-process, on the session's Ray): outputs, determinism, publishing."""

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import write_parquet, write_shards
from semid_dist import load_tokenizer
from semid_dist.cli import main

ARGS = ["--mode", "kmeans", "--n_layers", "3", "--n_clusters", "16", "--max_iters", "10"]


def run_cli(data, out, *extra, tmp_log=None):
    log_dir = tmp_log or os.path.join(os.path.dirname(out.rstrip("/")), "logs")
    return main(["train", "--data_path", data, "--output_dir", out, "--log_dir", log_dir, *ARGS, *extra])


def load_mapping(out):
    with open(os.path.join(out, "semantic_id_mappings.json")) as f:
        return json.load(f)


def test_end_to_end_outputs(ray_session, small_catalog, tmp_path, capsys):
    data, ids, x = small_catalog
    out = str(tmp_path / "out")
    assert run_cli(data, out) == 0
    printed = capsys.readouterr().out
    assert "collision rate before dedup" in printed and "items sharing a prefix" in printed

    mapping = load_mapping(out)
    assert sorted(map(int, mapping)) == sorted(ids.tolist())
    sids = [tuple(v) for v in mapping.values()]
    assert len(set(sids)) == len(sids), "semantic IDs must be unique after dedup"
    assert all(len(v) == 4 and all(0 <= c < 16 for c in v[:3]) for v in sids)

    table = pq.read_table(os.path.join(out, "semantic_id_mappings.parquet"))
    from_parquet = dict(
        zip(
            table.column("ItemID").to_pylist(),
            map(tuple, table.column("semantic_id").to_pylist()),
            strict=True,
        )
    )
    assert from_parquet == {int(k): tuple(v) for k, v in mapping.items()}

    [index_file] = [p for p in os.listdir(out) if p.endswith(".index.json")]
    assert index_file == os.path.basename(data) + ".index.json"  # LC-Rec style: <dataset>.index.json
    index = json.load(open(os.path.join(out, index_file)))
    some = next(iter(mapping))
    assert index[some] == [f"<{'abcd'[lv]}_{c}>" for lv, c in enumerate(mapping[some])]

    # the prefix tree: every published ID is a path in it, and no other path is
    tree = pq.read_table(os.path.join(out, "prefix_tree.parquet")).to_pylist()
    allowed = {(r["depth"], tuple(r["prefix"])): r["next"] for r in tree}
    assert all(r["next"] == sorted(set(r["next"])) and len(r["prefix"]) == r["depth"] for r in tree)
    walked, todo = set(), [()]
    while todo:
        prefix = todo.pop()
        if len(prefix) == 4:
            walked.add(prefix)
            continue
        todo += [(*prefix, c) for c in allowed.get((len(prefix), prefix), [])]
    assert walked == set(sids)
    tokens = json.load(open(os.path.join(out, "tokens.json")))
    used = {t for toks in index.values() for t in toks}
    assert used <= set(tokens) and len(tokens) == len(set(tokens))
    assert tokens[:17] == [f"<a_{c}>" for c in range(16)] + ["<b_0>"]  # every code of a level

    results = json.load(open(os.path.join(out, "training_results.json")))
    m = results["metrics"]
    codes = np.array([v[:3] for v in mapping.values()])
    assert m["collision_rate"] == pytest.approx(1 - len({tuple(c) for c in codes}) / len(codes))
    assert [lv["codes_used"] for lv in m["levels"]] == [len(set(codes[:, level])) for level in range(3)]
    assert 0 < m["relative_reconstruction_error"] < 1
    assert results["config"]["n_clusters"] == 16 and results["input"]["items"] == 600
    assert {"scan", "fit", "encode", "dedup", "export", "total"} <= set(results["timings_s"])

    payload = torch.load(os.path.join(out, "final_model.pt"), weights_only=True)
    assert payload["codebooks"].shape == (3, 16, 32) and payload["config"]["mode"] == "kmeans"
    # the Python API reproduces the published codes
    tok = load_tokenizer(os.path.join(out, "final_model.pt"))
    order = np.argsort(ids)[:50]
    got = tok.encode(x[order])
    want = np.array([mapping[str(i)][:3] for i in ids[order]])
    assert np.array_equal(got, want)

    logs = os.listdir(os.path.join(out, "logs"))
    assert len(logs) == 1 and logs[0].endswith(f"_{os.path.basename(data)}_kmeans_ep100_bs512.log")
    manifest = json.load(open(os.path.join(out, "_SUCCESS")))
    assert "semantic_id_mappings.json" in manifest["files"]
    assert not [p for p in os.listdir(out) if p.startswith(".staging")]


def test_deterministic_across_runs_row_order_and_sharding(ray_session, small_catalog, tmp_path):
    data, ids, x = small_catalog
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert run_cli(data, a, "--seed", "7") == 0
    assert run_cli(data, b, "--seed", "7") == 0
    assert load_mapping(a) == load_mapping(b)

    perm = np.random.default_rng(3).permutation(len(ids))
    shuffled = tmp_path / "shuffled"
    write_shards(str(shuffled), ids[perm], x[perm], 5)  # other row order, other shard layout
    c = str(tmp_path / "c")
    assert run_cli(str(shuffled), c, "--seed", "7") == 0
    assert load_mapping(c) == load_mapping(a)

    single = str(tmp_path / "single.parquet")
    write_parquet(single, ids[perm[::-1]], x[perm[::-1]], list_type="fixed")
    d = str(tmp_path / "d")
    assert run_cli(single, d, "--seed", "7") == 0
    assert load_mapping(d) == load_mapping(a)


def test_input_layouts_seed_dir_glob_and_max_items(ray_session, small_catalog, tmp_path):
    data, ids, x = small_catalog
    seed_dir = tmp_path / "Beauty"
    write_parquet(str(seed_dir / "item_emb.parquet"), ids, x)
    write_parquet(str(seed_dir / "train.parquet"), ids[:5], x[:5])  # must be ignored
    out = str(tmp_path / "o1")
    assert run_cli(str(seed_dir), out) == 0
    assert len(load_mapping(out)) == 600
    assert os.listdir(os.path.join(out, "logs"))[0].split("_", 2)[2].startswith("Beauty_kmeans")

    out2 = str(tmp_path / "o2")
    assert run_cli(os.path.join(data, "part-0000[01].parquet"), out2) == 0
    assert len(load_mapping(out2)) == 400

    out3 = str(tmp_path / "o3")
    assert run_cli(data, out3, "--max_items", "250") == 0
    assert len(load_mapping(out3)) == 250


def test_the_cli_leaves_a_ray_it_did_not_start_running(ray_session, small_catalog, tmp_path):
    """The CLI shuts down a local Ray it started itself when the command ends (runtime.
    stop_local_ray); a Ray that was already up (here the session's, for a user their own or a
    cluster) must outlive the command, after a failed run too."""
    import ray

    data, _, _ = small_catalog
    assert run_cli(data, str(tmp_path / "out")) == 0
    assert run_cli(str(tmp_path / "missing"), str(tmp_path / "out2")) == 2
    assert ray.is_initialized()
    assert ray.get(ray.put(7)) == 7 and ray.cluster_resources().get("CPU", 0) > 0


def test_config_file_and_flag_precedence(ray_session, small_catalog, tmp_path):
    data, _, _ = small_catalog
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"data_path: {data}\noutput_dir: {tmp_path / 'o'}\nmode: kmeans\nn_layers: 2\n"
        "n_clusters: 8\nmax_iters: 5\n"
    )
    assert main(["--config", str(cfg), "--n_clusters", "12", "--log_dir", str(tmp_path / "l")]) == 0
    results = json.load(open(tmp_path / "o" / "training_results.json"))
    assert results["config"]["n_layers"] == 2 and results["config"]["n_clusters"] == 12


def test_failed_run_keeps_earlier_results(ray_session, small_catalog, tmp_path, capsys):
    data, _, _ = small_catalog
    out = str(tmp_path / "out")
    assert run_cli(data, out) == 0
    before = {
        p: open(os.path.join(out, p), "rb").read()
        for p in ("semantic_id_mappings.json", "final_model.pt", "_SUCCESS")
    }
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    ids, x = np.array([1, 2, 3]), np.ones((3, 32), np.float32)
    x[1, 5] = np.nan
    write_parquet(str(bad / "part-99999.parquet"), ids, x)
    assert run_cli(str(bad), out) == 2
    assert "NaN" in capsys.readouterr().err
    after = {p: open(os.path.join(out, p), "rb").read() for p in before}
    assert after == before
    assert not [p for p in os.listdir(out) if p.startswith(".staging")]


def test_fit_in_a_ray_task_gives_the_driver_fit(ray_session):
    """The path --device auto takes when the cluster has GPUs (modes.kmeans.fit_in_task, one
    GPU per task there), run here as a CPU task: it returns the codebooks and per-level stats
    that the driver's own fit gives."""
    import torch

    from conftest import make_catalog
    from semid_dist.config import Config
    from semid_dist.modes import kmeans as kmeans_mode

    _, x = make_catalog(2000, 16, seed=3, n_clusters=5)
    cfg = Config(data_path="x", output_dir="y", mode="kmeans", n_layers=2, n_clusters=8, max_iters=10)
    local, local_levels = kmeans_mode.fit_levels(x.copy(), cfg, None)
    remote, remote_levels = kmeans_mode.fit_in_task(x, cfg, "cpu", num_gpus=0)
    assert remote.shape == local.shape == (2, 8, 16)
    torch.testing.assert_close(remote, local, rtol=1e-4, atol=1e-5)
    assert [lv["codes_used"] for lv in remote_levels] == [lv["codes_used"] for lv in local_levels]
    assert [lv["level"] for lv in remote_levels] == [0, 1]
