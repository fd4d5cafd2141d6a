"""Every kind of bad input: one line naming the file (and ItemID), exit code 2, nothing published."""

import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_catalog, write_shards
from semid_dist.cli import main


@pytest.fixture
def shards(tmp_path):
    ids, x = make_catalog(200, 16, seed=5)
    d = tmp_path / "data"
    write_shards(str(d), ids, x, 2)
    return d, ids, x


def _emb_list(rows):
    return pa.array(rows, pa.list_(pa.float32()))


def _write(path, ids, emb_rows):
    pq.write_table(pa.table({"ItemID": pa.array(ids, pa.int64()), "embedding": _emb_list(emb_rows)}), path)


def check_error(tmp_path, capsys, data, *expected, extra=()):
    out = tmp_path / "out"
    code = main(
        [
            "--data_path",
            str(data),
            "--output_dir",
            str(out),
            "--mode",
            "kmeans",
            "--n_layers",
            "2",
            "--n_clusters",
            "4",
            "--log_dir",
            str(tmp_path / "logs"),
            *extra,
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    line = [ln for ln in err if ln.startswith("semid: error:")]
    assert len(line) == 1, err
    for text in expected:
        assert text in line[0], line[0]
    assert "Traceback" not in "\n".join(err)
    published = os.listdir(out) if out.exists() else []
    assert "semantic_id_mappings.json" not in published and not [
        p for p in published if p.startswith(".staging")
    ]
    return line[0]


def test_path_does_not_exist(tmp_path, capsys):
    check_error(tmp_path, capsys, tmp_path / "nope", "nope", "does not exist")


def test_missing_columns(tmp_path, capsys):
    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1, 2], "embedding": _emb_list([[1.0], [2.0]])}), p)
    check_error(tmp_path, capsys, p, "a.parquet", "missing column 'ItemID'")
    pq.write_table(pa.table({"ItemID": [1, 2], "vec": _emb_list([[1.0], [2.0]])}), p)
    check_error(tmp_path, capsys, p, "a.parquet", "missing column 'embedding'")


def test_not_parquet_and_truncated(tmp_path, capsys, shards):
    d, _, _ = shards
    bad = tmp_path / "notes.parquet"
    bad.write_text("this is not parquet\n")
    check_error(tmp_path, capsys, bad, "notes.parquet", "not a readable parquet file")
    good = d / "part-00001.parquet"
    blob = good.read_bytes()
    good.write_bytes(blob[: len(blob) // 2])
    check_error(tmp_path, capsys, d, "part-00001.parquet", "not a readable parquet file")


def test_zero_rows(tmp_path, capsys):
    p = tmp_path / "empty.parquet"
    _write(p, [], [])
    check_error(tmp_path, capsys, p, "empty.parquet", "zero rows")


def test_n_clusters_larger_than_items(tmp_path, capsys, shards):
    d, _, _ = shards
    check_error(tmp_path, capsys, d, "--n_clusters 500", "200", extra=["--n_clusters", "500"])


@pytest.mark.parametrize("case", ["ragged", "empty", "nan", "inf", "duplicate"])
def test_bad_rows_name_file_and_item(ray_session, tmp_path, capsys, shards, case):
    d, ids, x = shards
    rows = [list(r) for r in np.ones((5, 16), np.float32)]
    bad_ids = [900001, 900002, 900003, 900004, 900005]
    if case == "ragged":
        rows[2] = rows[2][:10]
        expected = ("ItemID 900003", "ragged", "length 10, expected 16")
    elif case == "empty":
        rows[2] = []
        expected = ("ItemID 900003", "empty embedding vector")
    elif case in ("nan", "inf"):
        rows[2][4] = float("nan") if case == "nan" else float("inf")
        expected = ("ItemID 900003", "NaN or Inf")
    else:
        bad_ids[3] = int(ids[7])  # an ItemID that another shard already has
        expected = (f"duplicate ItemID {int(ids[7])}",)
    _write(d / "part-00009.parquet", bad_ids, rows)
    line = check_error(tmp_path, capsys, d, *expected)
    if case != "duplicate":
        assert "part-00009.parquet" in line
    else:
        assert "part-0000" in line


def test_invalid_flag_values(tmp_path, capsys, shards):
    d, _, _ = shards
    check_error(tmp_path, capsys, d, "--mode", extra=["--mode", "pq"])
    check_error(tmp_path, capsys, d, "--n_layers", ">= 1", extra=["--n_layers", "0"])
    check_error(
        tmp_path, capsys, d, "--kmeans_full_dim_levels", ">= 0", extra=["--kmeans_full_dim_levels", "-1"]
    )


def test_subprocess_exit_code_and_single_line(tmp_path):
    """The installed entry point: non-zero exit, one line on stderr, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "semid_dist",
            "train",
            "--data_path",
            str(tmp_path / "missing"),
            "--output_dir",
            str(tmp_path / "out"),
            "--log_dir",
            str(tmp_path / "logs"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and " - INFO - " not in ln]
    assert lines == [f"semid: error: {tmp_path / 'missing'}: path does not exist"]


def test_device_cuda_without_a_gpu(ray_session, tmp_path, capsys, shards):
    check_error(tmp_path, capsys, shards[0], "--device cuda", "no GPU", extra=("--device", "cuda"))
