"""String ItemIDs (ASINs, SKUs, UUIDs) end to end on the session's Ray: the same IDs whatever the
sharding, row order and worker count; bytewise order for dedup and relocation ties; the outputs
keep the strings as given; `semid encode` reproduces a run; every bad input gets its line."""

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_catalog
from semid_dist.cli import main
from semid_dist.math.sampling import FNV_OFFSET, FNV_PRIME, hash_unit, utf8_keys

STRING = pa.string()
KMEANS = ["--mode", "kmeans", "--n_layers", "2", "--n_clusters", "16", "--max_iters", "5", "--seed", "3"]


def string_ids(n: int, seed: int = 0) -> np.ndarray:
    """ASIN-like IDs with a few that are not ASCII, in no particular order."""
    rng = np.random.default_rng(seed)
    ids = [f"B{v:09X}" for v in rng.choice(16**9, size=n, replace=False)]
    for i in range(0, n, 50):
        ids[i] = f"é-{ids[i]}-漢"
    return np.array(ids, dtype=object)


def write(path: str, ids, x: np.ndarray, id_type=STRING) -> None:
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"ItemID": pa.array(list(ids), id_type), "embedding": emb}), path)


def write_split(directory: str, ids, x: np.ndarray, n_shards: int, seed: int, id_type=STRING) -> str:
    order = np.random.default_rng(seed).permutation(len(ids))  # another row order
    for i, part in enumerate(np.array_split(order, n_shards)):
        write(os.path.join(directory, f"part-{i}.parquet"), ids[part], x[part], id_type)
    return directory


def train(data: str, out: str, *args) -> dict:
    logs = os.path.join(os.path.dirname(out), "logs")
    assert main(["train", "--data_path", data, "--output_dir", out, "--log_dir", logs, *args]) == 0
    with open(os.path.join(out, "training_results.json")) as f:
        return json.load(f)


def mapping(out: str) -> tuple[list, np.ndarray, pa.DataType]:
    t = pq.read_table(os.path.join(out, "semantic_id_mappings.parquet"))
    sid = np.array(t.column("semantic_id").to_pylist(), np.int64)
    return t.column("ItemID").to_pylist(), sid, t.schema.field("ItemID").type


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    base = tmp_path_factory.mktemp("strings")
    _, x = make_catalog(400, 16, seed=4)
    ids = string_ids(400)
    a = write_split(str(base / "a"), ids, x, 2, seed=1)
    b = write_split(str(base / "b"), ids, x, 5, seed=2, id_type=pa.large_string())
    return base, ids, x, a, b


def test_utf8_keys_are_fnv1a_of_the_bytes():
    names = ["B00004U9V2", "é漢字", "a" * 1024, "x", "ab", "ba"]
    arr = pa.array(names, pa.large_string())
    offsets = np.frombuffer(arr.buffers()[1], np.int64)[: len(arr) + 1]
    keys = utf8_keys(offsets, np.frombuffer(arr.buffers()[2], np.uint8))
    for name, key in zip(names, keys, strict=True):
        h = FNV_OFFSET
        for byte in name.encode():
            h = ((h ^ byte) * FNV_PRIME) % (1 << 64)
        assert np.array([h], np.uint64).view(np.int64)[0] == key
    assert len(set(hash_unit(keys, 42).tolist())) == len(names)


@pytest.mark.parametrize("policy", ["suffix", "relocate"])
def test_same_ids_whatever_the_sharding_and_order(ray_session, catalog, policy):
    base, ids, _, a, b = catalog
    ra = train(a, str(base / f"out_a_{policy}"), *KMEANS, "--collision_policy", policy)
    train(b, str(base / f"out_b_{policy}"), *KMEANS, "--collision_policy", policy)
    ids_a, sid_a, type_a = mapping(str(base / f"out_a_{policy}"))
    ids_b, sid_b, type_b = mapping(str(base / f"out_b_{policy}"))
    assert ids_a == ids_b == sorted(ids.tolist(), key=lambda s: s.encode())  # bytewise order
    np.testing.assert_array_equal(sid_a, sid_b)
    assert (type_a, type_b) == (pa.string(), pa.large_string())  # the input's type
    assert len({tuple(r) for r in sid_a}) == len(ids)
    with open(
        os.path.join(str(base / f"out_a_{policy}"), "semantic_id_mappings.json"), encoding="utf-8"
    ) as f:
        js = json.load(f)
    assert list(js) == ids_a and js[ids_a[0]] == sid_a[0].tolist()
    (index,) = glob.glob(os.path.join(str(base / f"out_a_{policy}"), "*.index.json"))
    with open(index, encoding="utf-8") as f:
        tokens = json.load(f)
    assert list(tokens) == ids_a and tokens[ids_a[-1]][0] == f"<a_{sid_a[-1, 0]}>"
    assert all(isinstance(e["ItemID"], str) for e in ra["examples"])


def test_ties_follow_bytewise_order(ray_session, tmp_path):
    """Items with identical embeddings get identical codes and errors: under suffix their dedup
    codes, under relocate the one that keeps its codes, follow the ItemIDs' UTF-8 byte order."""
    _, x = make_catalog(200, 16, seed=9)
    ids = string_ids(200, seed=5)
    twins = ["b", "a", "é", "A", "ab"]
    ids[:5] = twins
    x[1:5] = x[0]
    data = write_split(str(tmp_path / "data"), ids, x, 3, seed=3)
    order = sorted(twins, key=lambda s: s.encode())  # A, a, ab, b, é
    train(data, str(tmp_path / "suffix"), *KMEANS)
    got, sid, _ = mapping(str(tmp_path / "suffix"))
    rows = [got.index(t) for t in order]
    assert len({tuple(sid[r, :-1]) for r in rows}) == 1
    assert [int(sid[r, -1]) for r in rows] == sorted(int(sid[r, -1]) for r in rows)
    train(data, str(tmp_path / "relocate"), *KMEANS, "--collision_policy", "relocate")
    got_r, sid_r, _ = mapping(str(tmp_path / "relocate"))
    stayer = got_r.index(order[0])
    assert tuple(sid_r[stayer, :-1]) == tuple(sid[rows[0], :-1])  # "A" keeps the shared codes
    assert all(tuple(sid_r[got_r.index(t), :-1]) != tuple(sid_r[stayer, :-1]) for t in order[1:])


def test_encode_reproduces_a_string_run(ray_session, catalog):
    base, _, _, a, b = catalog
    out = str(base / "out_a_suffix")
    if not os.path.exists(out):
        train(a, out, *KMEANS)
    again = str(base / "encoded")
    model = os.path.join(out, "final_model.pt")
    logs = str(base / "logs")
    assert (
        main(["encode", "--data_path", b, "--output_dir", again, "--tokenizer", model, "--log_dir", logs])
        == 0
    )
    ids_1, sid_1, _ = mapping(out)
    ids_2, sid_2, _ = mapping(again)
    assert ids_1 == ids_2
    np.testing.assert_array_equal(sid_1, sid_2)
    with open(os.path.join(out, "semantic_id_mappings.json"), "rb") as f1:
        with open(os.path.join(again, "semantic_id_mappings.json"), "rb") as f2:
            assert f1.read() == f2.read()


def test_tiger_on_strings_ignores_sharding_and_workers(ray_session, catalog):
    base, _, _, a, b = catalog
    tiger = ["--mode", "tiger", "--n_layers", "2", "--n_embed", "16", "--latent_dim", "8", "--epochs", "2"]
    tiger += ["--batch_size", "100", "--seed", "5", "--patience", "0"]
    train(a, str(base / "tiger1"), *tiger, "--num_workers", "1")
    train(b, str(base / "tiger2"), *tiger, "--num_workers", "2")
    ids_1, sid_1, _ = mapping(str(base / "tiger1"))
    ids_2, sid_2, _ = mapping(str(base / "tiger2"))
    assert ids_1 == ids_2
    np.testing.assert_array_equal(sid_1, sid_2)


def _bad(tmp_path, capsys, data, *expected):
    out = tmp_path / "out"
    argv = ["train", "--data_path", str(data), "--output_dir", str(out), "--log_dir", str(tmp_path / "l")]
    code = main([*argv, *KMEANS])
    err = capsys.readouterr().err.strip().splitlines()
    line = [ln for ln in err if ln.startswith("semid: error:")]
    assert code == 2 and len(line) == 1 and "Traceback" not in "\n".join(err), err
    for e in expected:
        assert e in line[0], line[0]
    assert not os.path.exists(out / "_SUCCESS")


def test_bad_string_ids(ray_session, tmp_path, capsys):
    _, x = make_catalog(60, 16, seed=2)
    ids = string_ids(60, seed=7)
    cases = {
        "null": (lambda v: v[:7] + [None] + v[8:], "null ItemID"),
        "empty": (lambda v: v[:9] + [""] + v[10:], "empty ItemID"),
        "long": (lambda v: v[:3] + ["x" * 1025] + v[4:], "1025 bytes (at most 1024)"),
    }
    for name, (edit, message) in cases.items():
        d = tmp_path / name
        write(str(d / "part-0.parquet"), edit(ids.tolist()), x)
        _bad(tmp_path, capsys, d, message, "part-0.parquet")
    dup = ids.copy()
    dup[10] = dup[20]
    write(str(tmp_path / "dup" / "part-0.parquet"), dup, x)
    _bad(tmp_path, capsys, tmp_path / "dup", f"duplicate ItemID {dup[20]!r}", "part-0.parquet")
    mixed = tmp_path / "mixed"
    write(str(mixed / "part-0.parquet"), ids[:30], x[:30])
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x[30:].ravel()), 16)
    pq.write_table(
        pa.table({"ItemID": pa.array(np.arange(30), pa.int64()), "embedding": emb}), mixed / "part-1.parquet"
    )
    _bad(tmp_path, capsys, mixed, "part-0.parquet", "part-1.parquet", "one ItemID type")


def test_nightly_over_strings(ray_session, tmp_path, capsys):
    """Two nights: stable items keep their IDs, removed ones are retired, new and changed ones get
    IDs never issued before; an item back unchanged reclaims its ID; an integer catalog cannot
    continue a string lineage."""
    _, x1 = make_catalog(300, 16, seed=6)
    ids1 = string_ids(300, seed=8)
    rng = np.random.default_rng(2)
    perm = rng.permutation(300)
    removed, changed = perm[:20], perm[20:30]
    keep = np.setdiff1d(np.arange(300), removed)
    x2 = x1.copy()
    x2[changed] = x1[rng.permutation(300)[:10]][:, ::-1]
    new_ids, new_x = string_ids(30, seed=9), make_catalog(30, 16, seed=7)[1]
    ids2, x2 = np.r_[ids1[keep], new_ids], np.r_[x2[keep], new_x]
    ids3, x3 = np.r_[ids2, ids1[removed[:5]]], np.r_[x2, x1[removed[:5]]]
    root, logs = str(tmp_path / "ids"), str(tmp_path / "logs")

    def night(ids, x, name, shards):
        data = write_split(str(tmp_path / name), ids, x, shards, seed=len(name))
        argv = ["nightly", "--data_path", data, "--output_dir", root, "--generation", name, "--log_dir", logs]
        assert main([*argv, *KMEANS]) == 0
        ids_, sid, kind = mapping(os.path.join(root, "generations", name))
        assert kind == pa.string()
        return dict(zip(ids_, map(tuple, sid), strict=True))

    g1, g2 = night(ids1, x1, "n1", 2), night(ids2, x2, "n2", 3)
    stable = set(ids1[keep].tolist()) - set(ids1[changed].tolist())
    assert all(g2[i] == g1[i] for i in stable)
    assert not set(ids1[removed].tolist()) & set(g2)
    retired = pq.read_table(os.path.join(root, "generations", "n2", "retired_ids.parquet"))
    assert set(retired.column("ItemID").to_pylist()) >= set(ids1[removed].tolist())
    fresh = [g2[i] for i in new_ids.tolist()] + [g2[i] for i in ids1[changed].tolist() if g2[i] != g1[i]]
    assert not set(fresh) & set(g1.values()) and len(set(g2.values())) == len(g2)
    g3 = night(ids3, x3, "n3", 4)
    assert all(g3[i] == g1[i] for i in ids1[removed[:5]].tolist())  # back unchanged: reclaimed
    assert all(g3[i] == g2[i] for i in g2)
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x1.ravel()), 16)
    ints = tmp_path / "ints"
    ints.mkdir()
    pq.write_table(pa.table({"ItemID": pa.array(np.arange(300)), "embedding": emb}), ints / "p.parquet")
    argv = [
        "nightly",
        "--data_path",
        str(ints),
        "--output_dir",
        root,
        "--generation",
        "n4",
        "--log_dir",
        logs,
    ]
    assert main([*argv, *KMEANS]) == 2
    assert "a lineage keeps its ItemID type" in capsys.readouterr().err
