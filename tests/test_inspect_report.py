"""`semid report` and `semid inspect` on a real published run, checked against its mappings."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
import pytest
from published_runs import FILMS, N_LAYERS, TITLES, kmeans_run, semid

from semid_dist.cli import main


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return kmeans_run(tmp_path_factory)


@pytest.fixture(scope="module")
def mapping(run_dir):
    """ItemID -> semantic ID tuple, straight from the published parquet."""
    t = pq.read_table(os.path.join(run_dir, "semantic_id_mappings.parquet"))
    return dict(
        zip(t.column("ItemID").to_pylist(), map(tuple, t.column("semantic_id").to_pylist()), strict=True)
    )


@pytest.fixture(scope="module")
def titles():
    t = pq.read_table(TITLES, columns=["ItemID", "title"])
    return dict(zip(t.column("ItemID").to_pylist(), t.column("title").to_pylist(), strict=True))


def inspect(capsys, *args) -> tuple[int, str, str]:
    rc = main(["inspect", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def crowded_item(mapping) -> int:
    """An item whose full L-code prefix is shared with others (so every depth has company)."""
    counts = Counter(sid[:N_LAYERS] for sid in mapping.values())
    return min(i for i, sid in mapping.items() if counts[sid[:N_LAYERS]] > 1)


def test_inspect_item_prefix_counts_match_the_mappings(run_dir, mapping, titles, capsys):
    item = crowded_item(mapping)
    rc, out, _ = inspect(
        capsys, "--run", run_dir, "--item", str(item), "--item_titles", TITLES, "--neighbours", "5"
    )
    assert rc == 0
    sid = mapping[item]
    assert out.splitlines()[0] == f"item {item}  {titles[item]}"
    assert f"semantic ID: {list(sid)}" in out
    for depth in range(1, N_LAYERS + 1):
        n = sum(1 for s in mapping.values() if s[:depth] == sid[:depth])
        assert f"depth {depth} {list(sid[:depth])}: {n} item(s)" in out
    # the examples listed under each depth do share the prefix, and carry their titles
    prefixes = out.split("nearest neighbours")[0]
    for line in re.findall(r"^ {4}\s*(\d+)  (\[[\d, ]+\])  (.*)$", prefixes, re.M):
        other, shown, title = int(line[0]), json.loads(line[1]), line[2]
        assert tuple(shown) == mapping[other] and shown[0] == sid[0] and title == titles[other]
    # neighbours by reconstruction: 5 lines, the items with the same L codes first (cosine 1)
    neigh = out.split("nearest neighbours")[1].splitlines()[1:]
    assert len(neigh) == 5 and "reconstructions" in out
    same = sum(1 for s in mapping.values() if s[:N_LAYERS] == sid[:N_LAYERS]) - 1
    for line in neigh[: min(same, 5)]:
        assert "cos 1.000" in line and f"shares {N_LAYERS} code(s)" in line


def test_inspect_neighbours_by_embedding_match_numpy(run_dir, mapping, capsys):
    item = crowded_item(mapping)
    rc, out, _ = inspect(
        capsys, "--run", run_dir, "--item", str(item), "--data_path", FILMS, "--neighbours", "7"
    )
    assert rc == 0 and "embedding cosine" in out
    got = [int(line.split()[0]) for line in out.split("nearest neighbours")[1].splitlines()[1:]]
    cat = pq.read_table(os.path.join(FILMS, "item_emb.parquet"))
    ids = np.array(cat.column("ItemID").to_pylist())
    keep = np.isin(ids, list(mapping))
    ids, x = ids[keep], np.array(cat.column("embedding").to_pylist(), np.float64)[keep]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sim = x @ x[ids == item][0]
    order = [int(i) for i in ids[np.argsort(-sim, kind="stable")] if i != item]
    assert got == order[:7]
    # a catalog that is not one: one line, and nothing else printed
    not_a_catalog = os.path.join(run_dir, "semantic_id_mappings.parquet")
    rc, out, err = inspect(capsys, "--run", run_dir, "--item", str(item), "--data_path", not_a_catalog)
    assert rc == 2 and out == "" and "missing column 'embedding'" in err and err.count("\n") == 1


def test_inspect_prefix_lists_every_item_under_it(run_dir, mapping, titles, capsys):
    sid = mapping[crowded_item(mapping)]
    prefix = sid[:2]
    rc, out, _ = inspect(
        capsys,
        "--run",
        run_dir,
        "--prefix",
        ",".join(map(str, prefix)),
        "--item_titles",
        TITLES,
        "--limit",
        "0",
    )
    assert rc == 0
    expected = {i for i, s in mapping.items() if s[:2] == prefix}
    assert out.splitlines()[0].startswith(f"prefix {list(prefix)}: {len(expected)} item(s)")
    listed = [int(line.split()[0]) for line in out.splitlines()[1:]]
    assert sorted(listed) == sorted(expected)
    assert [mapping[i] for i in listed] == sorted(mapping[i] for i in listed)  # in ID order
    assert all(titles[i] in out for i in expected)
    # a cut listing says how many more there are
    rc, out, _ = inspect(capsys, "--run", run_dir, "--prefix", str(prefix[0]), "--limit", "3")
    n = sum(1 for s in mapping.values() if s[0] == prefix[0])
    assert rc == 0 and len(out.splitlines()) == 5 and f"and {n - 3} more" in out


def test_bad_flags_are_one_line(run_dir, capsys):
    for argv in (["inspect", "--run", run_dir], ["inspect", "--run", run_dir, "--item", "x"], ["report"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("semid: error: ") and err.count("\n") == 1


def test_file_names_are_exports():
    from semid_dist import export, published

    assert (published.RESULTS, published.MAPPING_PARQUET, published.MODEL) == (
        export.RESULTS,
        export.MAPPING_PARQUET,
        export.MODEL,
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--item", "1"], "ItemID 1 is not in the published mappings"),
        (["--prefix", "1,x"], "expected codes separated by commas"),
        (["--prefix", ""], "expected codes separated by commas"),
        (["--prefix", "0,0,0,0,0"], "expected 1 to 4 non-negative codes"),
        (["--prefix", "-1"], "expected 1 to 4 non-negative codes"),
    ],
)
def test_inspect_errors_are_one_line(run_dir, capsys, args, message):
    rc, out, err = inspect(capsys, "--run", run_dir, *args)
    assert rc == 2 and out == ""
    assert err.startswith("semid: error: ") and message in err and err.count("\n") == 1


def test_inspect_and_report_through_the_entry_point(run_dir, mapping, tmp_path):
    """The installed `semid`: a missing run and a bad flag exit 2 with one line; report writes."""
    p = semid("inspect", "--run", str(tmp_path / "missing"), "--item", "1")
    assert p.returncode == 2 and p.stderr.startswith("semid: error: ") and p.stderr.count("\n") == 1
    assert "no published run here" in p.stderr
    out = tmp_path / "report.html"
    p = semid("report", run_dir, "--out", str(out))
    assert p.returncode == 0, p.stderr
    page = out.read_text()
    assert "<h2>Summary</h2>" in page and "Code usage per level" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "after policy (relocate)" in page and 'alt="group sizes before and after the policy"' in page


def test_report_derives_gini_and_group_sizes_of_older_runs(run_dir, mapping, tmp_path, capsys):
    """A results file without the quality sections and without a collision policy, as runs
    published before them wrote: the Gini per level and the group sizes come from the mappings."""
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)
    results = json.load(open(old / "training_results.json"))
    for key in ("group_sizes", "coherence", "collisions"):
        del results["metrics"][key]
    for lv in results["metrics"]["levels"]:
        del lv["gini"]
    (old / "training_results.json").write_text(json.dumps(results))
    out = tmp_path / "old.html"
    assert main(["report", str(old), "--out", str(out)]) == 0
    page = out.read_text()
    codes = [s[:N_LAYERS] for s in mapping.values()]
    per_size = Counter(Counter(codes).values())
    for size, groups in per_size.items():
        assert f"<tr><td>{size}</td><td>{groups}</td><td>{groups}</td></tr>" in page
    assert "derived from the published semantic_id_mappings.parquet" in page
    levels = page.split("Code usage per level")[1].split("</table>")[0]
    for level in range(N_LAYERS):
        counts = np.bincount([c[level] for c in codes], minlength=results["config"]["n_clusters"])
        x = np.sort(counts).astype(float)
        ref = np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean())
        assert f"<td>{ref:.3f}</td></tr>" in levels
    assert "semantic coherence: not recorded" in page


def nightly_root(run_dir: str, root) -> str:
    """A nightly output root laid out around the published run: generations/g1 and LATEST."""
    gen = root / "generations" / "g1"
    shutil.copytree(run_dir, gen)
    (root / "LATEST").write_text(json.dumps({"generation": "g1", "seq": 1}))
    return str(root)


def test_report_side_by_side_and_through_latest(run_dir, mapping, tmp_path, capsys):
    root = nightly_root(run_dir, tmp_path / "nightly")
    out = tmp_path / "cmp" / "report.html"
    assert main(["report", run_dir, root, "--out", str(out)]) == 0
    assert "2 run(s)" in capsys.readouterr().out
    page = out.read_text()
    assert "<h2>Comparison</h2>" in page and f"{root} (generation g1)" in page
    results = json.load(open(os.path.join(run_dir, "training_results.json")))
    rate = f"{100 * results['metrics']['collision_rate']:.2f}%"
    assert page.count(rate) >= 2  # both columns of the comparison
    # inspect follows LATEST too
    item = crowded_item(mapping)
    assert main(["inspect", "--run", root, "--item", str(item), "--neighbours", "0"]) == 0
    assert f"semantic ID: {list(mapping[item])}" in capsys.readouterr().out
    # a LATEST that names an unpublished generation, and a run without _SUCCESS, are one-line errors
    (tmp_path / "nightly" / "LATEST").write_text(json.dumps({"generation": "g2", "seq": 2}))
    assert main(["report", root, "--out", str(out)]) == 2
    assert "not published" in capsys.readouterr().err
    os.remove(tmp_path / "nightly" / "generations" / "g1" / "_SUCCESS")
    assert main(["report", str(tmp_path / "nightly" / "generations" / "g1"), "--out", str(out)]) == 2
    assert "no _SUCCESS" in capsys.readouterr().err


def test_report_and_inspect_read_s3(run_dir, mapping, s3, tmp_path, capsys):
    """A nightly root on S3 (the endpoint from AWS_ENDPOINT_URL, as the s3 fixture sets it)."""
    fs = s3.filesystem()
    root = f"{s3.bucket}/report-test/nightly"
    fs.put(run_dir + "/", f"{root}/generations/g1/", recursive=True)
    fs.pipe_file(f"{root}/LATEST", json.dumps({"generation": "g1", "seq": 1}).encode())
    out = tmp_path / "s3.html"
    assert main(["report", f"s3://{root}", "--out", str(out)]) == 0
    assert f"s3://{root} (generation g1)" in out.read_text()
    prefix = next(iter(mapping.values()))[:1]
    assert main(["inspect", "--run", f"s3://{root}", "--prefix", str(prefix[0]), "--limit", "0"]) == 0
    n = sum(1 for s in mapping.values() if s[:1] == prefix)
    assert f"prefix {list(prefix)}: {n} item(s)" in capsys.readouterr().out
    assert main(["inspect", "--run", f"s3://{s3.bucket}/report-test/none", "--item", "1"]) == 2
    assert "no published run here" in capsys.readouterr().err
