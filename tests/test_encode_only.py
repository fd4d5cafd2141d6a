"""`semid encode`: apply an existing tokenizer to a catalog (in-process, on the session's Ray)."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import make_catalog, write_shards
from semid_dist import load_tokenizer
from semid_dist.cli import main

TRAIN = ["--mode", "kmeans", "--n_layers", "3", "--n_clusters", "16", "--max_iters", "10"]


def cli(command, data, out, *extra, log_dir):
    return main([command, "--data_path", data, "--output_dir", out, "--log_dir", log_dir, *extra])


def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def trained(ray_session, small_catalog, tmp_path_factory):
    """One kmeans training run whose final_model.pt the tests apply."""
    data, ids, x = small_catalog
    root = tmp_path_factory.mktemp("encode_only")
    out = str(root / "trained")
    assert cli("train", data, out, *TRAIN, log_dir=str(root / "logs")) == 0
    return root, out


def test_encode_reproduces_the_training_run(trained, small_catalog, capsys):
    root, train_out = trained
    data, ids, x = small_catalog
    out = str(root / "encoded")
    model = os.path.join(train_out, "final_model.pt")
    # Flags that contradict the tokenizer lose: the run describes the tokenizer it applied.
    assert (
        cli(
            "encode",
            data,
            out,
            "--tokenizer",
            model,
            "--mode",
            "tiger",
            "--n_layers",
            "2",
            log_dir=str(root / "logs"),
        )
        == 0
    )
    assert "kmeans: 600 items -> 3 levels x 16 codes" in capsys.readouterr().out

    # Same tokenizer, same catalog: the same IDs, dedup codes included.
    want = read_json(os.path.join(train_out, "semantic_id_mappings.json"))
    assert read_json(os.path.join(out, "semantic_id_mappings.json")) == want
    trained_results = read_json(os.path.join(train_out, "training_results.json"))
    results = read_json(os.path.join(out, "training_results.json"))
    m, want_m = results["metrics"], trained_results["metrics"]
    assert m["relative_reconstruction_error"] == pytest.approx(want_m["relative_reconstruction_error"])
    for key in ("collision_rate", "max_bucket", "levels", "max_dedup_code"):
        assert m[key] == want_m[key], key
    assert results["mode"] == "kmeans"
    assert (results["config"]["n_layers"], results["config"]["n_clusters"]) == (3, 16)
    assert results["training"]["command"] == "encode"
    assert results["training"]["tokenizer"] == model
    assert len(results["training"]["tokenizer_sha256"]) == 64
    assert "scan" not in results["timings_s"] and "encode" in results["timings_s"]  # one pass
    # final_model.pt is the tokenizer applied, loadable as usual
    a = torch.load(model, weights_only=True)["codebooks"]
    b = torch.load(os.path.join(out, "final_model.pt"), weights_only=True)["codebooks"]
    assert torch.equal(a, b)
    assert [p for p in os.listdir(out) if p.endswith(".index.json")]
    assert "semantic_id_mappings.parquet" in read_json(os.path.join(out, "_SUCCESS"))["files"]


def test_encode_a_new_catalog(trained, tmp_path):
    root, train_out = trained
    ids, x = make_catalog(900, 32, seed=5, first_id=50_000)
    data = str(tmp_path / "tonight")
    write_shards(data, ids, x, 4)
    out = str(tmp_path / "out")
    model = os.path.join(train_out, "final_model.pt")
    assert cli("encode", data, out, "--tokenizer", model, log_dir=str(tmp_path / "logs")) == 0
    mapping = read_json(os.path.join(out, "semantic_id_mappings.json"))
    assert sorted(map(int, mapping)) == sorted(ids.tolist())
    sids = [tuple(v) for v in mapping.values()]
    assert len(set(sids)) == len(sids)
    codes = load_tokenizer(model).encode(x)
    assert np.array_equal(codes, np.array([mapping[str(i)][:3] for i in ids]))


def _failed_without_output(rc, capsys, out, *needles):
    stderr = capsys.readouterr().err.strip()  # the run's log lines, then the error
    assert rc == 2, stderr
    err = stderr.splitlines()[-1]
    assert err.startswith("semid: error: ") and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in err, err
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))
    assert not os.path.exists(os.path.join(out, "semantic_id_mappings.json"))
    if os.path.isdir(out):
        assert not [p for p in os.listdir(out) if p.startswith(".staging")]
    return err


def test_missing_tokenizer_flag(small_catalog, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc = cli("encode", small_catalog[0], out, log_dir=str(tmp_path / "logs"))
    _failed_without_output(rc, capsys, out, "--tokenizer")


@pytest.mark.parametrize("what", ["missing", "directory", "garbage", "foreign"])
def test_unreadable_tokenizer(what, small_catalog, tmp_path, capsys):
    path = tmp_path / "model.pt"
    if what == "directory":
        path.mkdir()
    elif what == "garbage":
        path.write_bytes(b"not a torch file")
    elif what == "foreign":
        torch.save({"weights": torch.zeros(3)}, str(path))
    out = str(tmp_path / "out")
    rc = cli("encode", small_catalog[0], out, "--tokenizer", str(path), log_dir=str(tmp_path / "logs"))
    err = _failed_without_output(rc, capsys, out, str(path))
    expected = {
        "missing": "does not exist",
        "directory": "directory",
        "garbage": "not a loadable",
        "foreign": "not a semid_dist tokenizer",
    }[what]
    assert expected in err


def test_dimension_mismatch(trained, tmp_path, capsys):
    root, train_out = trained
    ids, x = make_catalog(100, 24, seed=2)
    data = str(tmp_path / "other")
    write_shards(data, ids, x, 1)
    out = str(tmp_path / "out")
    model = os.path.join(train_out, "final_model.pt")
    rc = cli("encode", data, out, "--tokenizer", model, log_dir=str(tmp_path / "logs"))
    _failed_without_output(rc, capsys, out, "takes 32-d embeddings", "24-d")
