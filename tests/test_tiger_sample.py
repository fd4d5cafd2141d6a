"""tiger on a hash sample (--train_sample_gb): which rows, how many, and a run that trains on one
gives the same IDs whatever the sharding and worker count, holds out its validation split from
the sample, encodes every item, and names another checkpoint folder than a whole-catalog run."""

import json
import os
import re

import numpy as np
import pytest

from conftest import make_catalog, write_shards
from semid_dist.cli import main
from semid_dist.config import Config
from semid_dist.errors import UserError
from semid_dist.math.sampling import hash_unit
from semid_dist.tiger import sample as ts
from semid_dist.tiger import trainer

DIM = 16
ROW = 4 * DIM + 8
TIGER = ["--mode", "tiger", "--n_layers", "2", "--n_embed", "8", "--latent_dim", "8", "--epochs", "2"]
TIGER += ["--batch_size", "64", "--seed", "5", "--patience", "0", "--max_iters", "5"]


def cfg(**kw) -> Config:
    return Config(data_path="x", output_dir="y", mode="tiger", **kw).validated()


def test_resolve_whole_flag_and_auto(caplog):
    n = 10_000
    assert ts.resolve(cfg(), n, DIM, memory=1e9).whole  # fits: every item
    assert ts.resolve(cfg(train_sample_gb="1"), n, DIM, memory=1.0).whole  # the flag wins over memory
    s = ts.resolve(cfg(train_sample_gb=str(n * ROW / 4 / 1e9)), n, DIM)
    assert not s.whole and s.expect_rows * ROW <= n * ROW / 4 and s.expect_rows > 0.2 * n
    caplog.clear()
    auto = ts.resolve(cfg(), n, DIM, memory=n * ROW / 2)
    assert 0.3 < auto.fraction < 0.4 and "--train_sample_gb" in caplog.text  # 0.8 x half, less the margin
    with pytest.raises(UserError, match="raise --train_sample_gb"):
        ts.resolve(cfg(train_sample_gb="1e-9"), n, DIM)
    with pytest.raises(UserError, match="--train_sample_gb"):
        cfg(train_sample_gb="lots")


def test_keep_is_kmeans_rule_and_never_past_the_cap():
    ids = np.random.default_rng(0).permutation(10**7)[:200_000].astype(np.int64)
    s = ts.resolve(cfg(train_sample_gb=str(50_000 * ROW / 1e9)), len(ids), DIM)
    kept = ts.keep(ids, 42, s.fraction)
    np.testing.assert_array_equal(kept, hash_unit(ids, 42) < s.fraction)
    assert kept.sum() <= 50_000 and abs(int(kept.sum()) - s.expect_rows) < 4 * np.sqrt(s.expect_rows)
    assert ts.keep(ids, 42, 1.0).all()
    assert trainer.run_name(cfg(), DIM, 10) != trainer.run_name(cfg(), DIM, 10, 0.5)
    assert trainer.run_name(cfg(), DIM, 10) == trainer.run_name(cfg(), DIM, 10, 1.0)


def _train(data, out, *extra) -> dict:
    logs = os.path.join(os.path.dirname(out), "logs")
    assert main(["train", "--data_path", data, "--output_dir", out, "--log_dir", logs, *TIGER, *extra]) == 0
    with open(os.path.join(out, "training_results.json")) as f:
        return json.load(f)


def _mapping(out):
    with open(os.path.join(out, "semantic_id_mappings.json")) as f:
        return json.load(f)


def test_sampled_tiger_ignores_sharding_and_workers(ray_session, tmp_path):
    ids, x = make_catalog(800, DIM, seed=3)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_shards(a, ids, x, 2)
    order = np.random.default_rng(1).permutation(len(ids))
    write_shards(b, ids[order], x[order], 5)
    gb = str(600 * ROW / 1e9)  # about 430 of the 800 items, after the margin
    r1 = _train(a, str(tmp_path / "one"), "--train_sample_gb", gb, "--num_workers", "1")
    r2 = _train(b, str(tmp_path / "two"), "--train_sample_gb", gb, "--num_workers", "2")
    assert _mapping(str(tmp_path / "one")) == _mapping(str(tmp_path / "two"))
    assert len(_mapping(str(tmp_path / "one"))) == 800  # every item is encoded
    sample = r1["training"]["train_sample"]
    assert sample == r2["training"]["train_sample"] and 0 < sample["fraction"] < 1
    in_sample = int((hash_unit(ids, 5) < sample["fraction"]).sum())
    for r in (r1, r2):
        log = open(os.path.join(str(tmp_path / "logs"), r["log_file"])).read()
        held = [int(m) for m in re.findall(r"tiger: (\d+) rows in the workers' memory", log)]
        assert held == [in_sample]  # train + validation rows: exactly the sample
    whole = _train(a, str(tmp_path / "whole"))
    assert whole["training"]["train_sample"]["fraction"] == 1.0
    assert whole["training"]["run_dir"] != r1["training"]["run_dir"]  # --resume would not mix them


def test_resume_continues_only_the_same_sample(ray_session, tmp_path):
    ids, x = make_catalog(600, DIM, seed=4)
    data = str(tmp_path / "data")
    write_shards(data, ids, x, 2)
    out, logs = str(tmp_path / "out"), str(tmp_path / "logs")
    half, third = str(300 * ROW / 1e9), str(200 * ROW / 1e9)

    def log_of(r):
        return open(os.path.join(logs, r["log_file"])).read()

    first = _train(data, out, "--train_sample_gb", half)
    same = _train(data, out, "--train_sample_gb", half, "--resume", "--epochs", "3")
    assert "tiger: resumed from checkpoint after epoch 2" in log_of(same)
    other = _train(data, out, "--train_sample_gb", third, "--resume", "--epochs", "3")
    assert "resumed from checkpoint" not in log_of(other)  # another sample: another run, from epoch 1
    assert other["training"]["run_dir"] != first["training"]["run_dir"] == same["training"]["run_dir"]
    assert other["training"]["train_sample"]["fraction"] < first["training"]["train_sample"]["fraction"]
