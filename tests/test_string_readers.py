"""The readers of published runs on a run of string ItemIDs: `semid inspect` (an item, a prefix,
titles, neighbours by embedding), `semid report`, and `semid evaluate` on interactions whose
ItemIDs are strings; integer ItemIDs against a string run are one line, exit 2."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_string_ids import KMEANS, mapping, string_ids, train, write_split

from conftest import make_catalog
from semid_dist.catalog.names import sorted_ids
from semid_dist.cli import main
from semid_dist.errors import UserError
from semid_dist.evaluate.interactions import read_interactions, to_histories
from semid_dist.io.storage import Storage
from walks import neighbour_walks

N, N_LAYERS = 300, 2
QUICK = ["--epochs", "2", "--patience", "0", "--bootstrap", "50", "--seeds", "1", "--protocols", "dense"]


@pytest.fixture(scope="module")
def string_run(ray_session, tmp_path_factory):
    """A kmeans run (2 x 16) over 300 items with string ItemIDs, their titles, and the mapping."""
    base = tmp_path_factory.mktemp("string_readers")
    _, x = make_catalog(N, 16, seed=11)
    ids = string_ids(N, seed=12)
    data = write_split(str(base / "data"), ids, x, 2, seed=1)
    out = str(base / "run")
    results = train(data, out, *KMEANS)
    titles = str(base / "titles.parquet")
    pq.write_table(pa.table({"ItemID": pa.array(ids, pa.string()), "title": [f"t/{i}" for i in ids]}), titles)
    got, sid, _ = mapping(out)
    return {
        "base": base,
        "ids": ids,
        "x": x,
        "data": data,
        "out": out,
        "results": results,
        "titles": titles,
        "mapping": dict(zip(got, map(tuple, sid.tolist()), strict=True)),
    }


def inspect(capsys, *args) -> tuple[int, str, str]:
    rc = main(["inspect", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def crowded_item(m: dict) -> str:
    """An item whose L codes are shared with others; one that is not ASCII when there is one."""
    counts = Counter(s[:N_LAYERS] for s in m.values())
    crowded = sorted((i for i, s in m.items() if counts[s[:N_LAYERS]] > 1), key=lambda i: (i.isascii(), i))
    return crowded[0]


def test_inspect_item_on_string_ids(string_run, capsys):
    m = string_run["mapping"]
    item = crowded_item(m)
    rc, out, err = inspect(
        capsys, "--run", string_run["out"], "--item", item, "--item_titles", string_run["titles"]
    )
    assert rc == 0, err
    sid = m[item]
    assert out.splitlines()[0] == f"item {item}  t/{item}"
    assert f"semantic ID: {list(sid)}" in out
    for depth in range(1, N_LAYERS + 1):
        n = sum(1 for s in m.values() if s[:depth] == sid[:depth])
        assert f"depth {depth} {list(sid[:depth])}: {n} item(s)" in out
    listed = re.findall(r"^ {4}\s*(\S+)  (\[[\d, ]+\])  t/(\S+)$", out.split("nearest neighbours")[0], re.M)
    assert listed
    for other, shown, title in listed:
        assert other in m and other != item and title == other
        assert tuple(json.loads(shown)) == m[other] and m[other][0] == sid[0]
    # an ItemID the run does not map, quoted as given
    rc, out, err = inspect(capsys, "--run", string_run["out"], "--item", "1234")
    assert rc == 2 and out == "" and "ItemID '1234' is not in the published mappings" in err
    assert err.count("\n") == 1


def test_inspect_neighbours_by_embedding_over_a_string_catalog(string_run, capsys):
    m, ids, x = string_run["mapping"], string_run["ids"], string_run["x"]
    item = crowded_item(m)
    args = [
        "--run",
        string_run["out"],
        "--item",
        item,
        "--data_path",
        string_run["data"],
        "--neighbours",
        "7",
    ]
    rc, out, err = inspect(capsys, *args)
    assert rc == 0, err
    assert f"by embedding cosine over {N} items" in out
    got = [line.split()[0] for line in out.split("nearest neighbours")[1].splitlines()[1:]]
    order = sorted(range(N), key=lambda i: ids[i].encode())  # ties by bytewise ItemID order
    xs = np.asarray(x, np.float64)[order]
    xs /= np.linalg.norm(xs, axis=1, keepdims=True)
    names = ids[order]
    sim = xs @ xs[names.tolist().index(item)]
    expected = [str(i) for i in names[np.argsort(-sim, kind="stable")] if i != item]
    assert got == expected[:7]


def test_inspect_prefix_lists_string_ids(string_run, capsys):
    m = string_run["mapping"]
    prefix = m[crowded_item(m)][:1]
    args = ["--run", string_run["out"], "--prefix", str(prefix[0]), "--limit", "0"]
    rc, out, err = inspect(capsys, *args, "--item_titles", string_run["titles"])
    assert rc == 0, err
    expected = {i for i, s in m.items() if s[:1] == prefix}
    assert out.splitlines()[0].startswith(f"prefix {list(prefix)}: {len(expected)} item(s)")
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert sorted(listed) == sorted(expected) and all(f"t/{i}" in out for i in expected)
    assert [m[i] for i in listed] == sorted(m[i] for i in listed)


def test_inspect_kind_mismatches_are_one_line(string_run, capsys, tmp_path):
    """Integer titles or an integer catalog next to a string run: one line naming both."""
    ints = str(tmp_path / "titles.parquet")
    pq.write_table(pa.table({"ItemID": pa.array([1, 2], pa.int64()), "title": ["a", "b"]}), ints)
    item = crowded_item(string_run["mapping"])
    rc, out, err = inspect(capsys, "--run", string_run["out"], "--item", item, "--item_titles", ints)
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert f"{ints}: its ItemIDs are integers, but {string_run['out']} maps string ItemIDs" in err
    catalog = tmp_path / "ints"
    catalog.mkdir()
    emb = pa.FixedSizeListArray.from_arrays(pa.array(string_run["x"].ravel()), 16)
    pq.write_table(pa.table({"ItemID": pa.array(np.arange(N)), "embedding": emb}), catalog / "p.parquet")
    rc, out, err = inspect(capsys, "--run", string_run["out"], "--item", item, "--data_path", str(catalog))
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "its ItemIDs are integers, but" in err and "maps string ItemIDs" in err


def test_report_renders_a_string_run(string_run, tmp_path, capsys):
    examples = string_run["results"]["examples"]
    assert examples and all(
        isinstance(e["ItemID"], str) and e["ItemID"] in string_run["mapping"] for e in examples
    )
    page = tmp_path / "report.html"
    assert main(["report", string_run["out"], "--out", str(page)]) == 0
    html = page.read_text()
    assert "<h2>Summary</h2>" in html and "Code usage per level" in html
    # a results file without the group sizes: they come from the mappings, whose ItemIDs are strings
    old = tmp_path / "old"
    shutil.copytree(string_run["out"], old)
    results = json.loads((old / "training_results.json").read_text())
    del results["metrics"]["group_sizes"]
    (old / "training_results.json").write_text(json.dumps(results))
    assert main(["report", str(old), "--out", str(page)]) == 0
    html = page.read_text()
    sizes = Counter(Counter(s[:N_LAYERS] for s in string_run["mapping"].values()).values())
    assert "derived from the published semantic_id_mappings.parquet" in html
    assert all(f"<tr><td>{size}</td><td>{n}</td><td>{n}</td></tr>" in html for size, n in sizes.items())


def _walks(string_run, path: str, string_items: bool = True) -> pa.Table:
    """Walks between embedding neighbours (tests/walks.py) over the run's items, with string
    UserIDs and, unless told otherwise, the items' string ItemIDs."""
    t = neighbour_walks(np.arange(N), string_run["x"], n_users=60, length=12, seed=5)
    rows = t.column("ItemID").to_numpy()
    items = pa.array(string_run["ids"][rows], pa.string()) if string_items else pa.array(rows)
    users = pa.array([f"user-{u}" for u in t.column("UserID").to_pylist()], pa.large_string())
    t = pa.table({"UserID": users, "ItemID": items, "timestamp": t.column("timestamp")})
    pq.write_table(t, path)
    return t


def _evaluate(string_run, walks: str, name: str) -> tuple[int, str]:
    base = string_run["base"]
    out = str(base / name)
    argv = ["evaluate", "--run", string_run["out"], "--interactions", walks, "--output_dir", out]
    argv += ["--log_dir", str(base / "logs"), "--baselines", "shuffled,popularity", "--max_history", "8"]
    return main([*argv, *QUICK]), out


def _finite(fig: dict) -> bool:
    values = [v for m in fig["variants"].values() for f in m.values() for v in [f["value"], *f["ci95"]]]
    return bool(values) and all(math.isfinite(v) and 0 <= v <= 1 for v in values)


@pytest.mark.slow
def test_evaluate_on_string_interactions(string_run, capsys):
    walks = str(string_run["base"] / "walks.parquet")
    _walks(string_run, walks)
    code, out = _evaluate(string_run, walks, "eval")
    assert code == 0, capsys.readouterr().err
    e = json.load(open(os.path.join(out, "evaluation.json")))
    assert e["interactions"]["rows"] == 60 * 12 and e["interactions"]["users"] == 60
    assert e["interactions"]["items"] == N
    dense = e["protocols"]["dense"]
    assert dense["targets"] == 60 * 10 and set(dense["variants"]) == {"run1", "shuffled1", "popularity"}
    assert _finite(dense)
    assert os.path.exists(os.path.join(out, "_SUCCESS"))


def test_evaluate_integer_interactions_against_a_string_run(string_run, capsys):
    walks = str(string_run["base"] / "int_walks.parquet")
    _walks(string_run, walks, string_items=False)
    code, out = _evaluate(string_run, walks, "mismatch")
    err = capsys.readouterr().err.strip().splitlines()
    line = [ln for ln in err if ln.startswith("semid: error:")]
    assert code == 2 and len(line) == 1 and "Traceback" not in "\n".join(err), err
    assert f"{walks}: ItemID is integer, but {string_run['out']} maps string ItemIDs" in line[0]
    assert not os.path.exists(os.path.join(out, "_SUCCESS"))


# --- the string ItemIDs as item positions (no Ray) ------------------------------------------------


def _interactions(tmp_path, users, items, ts, item_type) -> pa.Table:
    path = str(tmp_path / f"i-{item_type}.parquet")
    pq.write_table(
        pa.table({"UserID": users, "ItemID": pa.array(items, item_type), "timestamp": pa.array(ts)}), path
    )
    return read_interactions(path, Storage())


def test_string_items_become_their_positions_in_bytewise_order(tmp_path):
    """The histories of string interactions are those of integer ones whose ItemIDs rank alike:
    positions in the run's ItemIDs sorted bytewise (ties on a timestamp too)."""
    run_ids = ["b", "é", "A", "ab", "a", "z"]
    names, _ = sorted_ids(pa.array(run_ids, pa.string()))
    assert names.to_pylist() == ["A", "a", "ab", "b", "z", "é"]
    rank = {s: i for i, s in enumerate(names.to_pylist())}
    users = [1, 1, 1, 1, 2, 2, 2, 3]
    items = ["é", "a", "A", "z", "ab", "b", "é", "b"]
    ts = [5, 5, 1, 9, 2, 2, 2, 0]
    h_s, info_s = to_histories(_interactions(tmp_path, users, items, ts, pa.large_string()), names, "run")
    ints = [10 * rank[s] for s in items]
    h_i, info_i = to_histories(
        _interactions(tmp_path, users, ints, ts, pa.int64()), np.arange(6) * 10, "run", min_len=3
    )
    assert h_s.items_T.tolist() == h_i.items_T.tolist() == [0, 1, 5, 4, 2, 3, 5]
    assert h_s.offsets_U1.tolist() == h_i.offsets_U1.tolist() and info_s == info_i


def test_string_items_absent_or_of_the_other_kind(tmp_path):
    names, _ = sorted_ids(pa.array(["B1", "B2", "B3"], pa.string()))
    items = ["B1", "x9", "B2", "é", "x9", "B0", "a", "b", "c"]
    table = _interactions(tmp_path, [1] * 9, items, list(range(9)), pa.string())
    with pytest.raises(UserError) as e:
        to_histories(table, names, "run-s")
    src = table.schema.metadata[b"semid_source"].decode()
    assert str(e.value) == (
        f"{src}: 7 interactions (6 distinct ItemIDs) are not in run-s's mapping, "
        "e.g. 'B0', 'a', 'b', 'c', 'x9'"
    )
    with pytest.raises(UserError) as e:
        to_histories(table, np.array([1, 2, 3]), "run-i")
    assert str(e.value) == (
        f"{src}: ItemID is string, but run-i maps integer ItemIDs (the interactions need the "
        "ItemID type of the run's catalog)"
    )
