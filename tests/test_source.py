"""The catalog passes' Ray Data source: read units, --max_items, fusion with the pass's map,
and that the passes' results do not depend on how the files are cut into read tasks."""

import numpy as np
import pytest

from conftest import make_catalog, write_parquet
from semid_dist.catalog import encode, plumbing, scan, source
from semid_dist.catalog.schema import inspect_catalog
from semid_dist.io.storage import Storage
from semid_dist.math.sampling import hash_unit
from semid_dist.run import Run


def inspect(files):
    return inspect_catalog(files, Storage())


@pytest.fixture
def row_grouped(tmp_path):
    """Two files: 1,000 rows in row groups of 100, and 300 rows in one group."""
    ids, x = make_catalog(1300, 12, seed=5)
    a, b = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    write_parquet(a, ids[:1000], x[:1000], row_group_size=100)
    write_parquet(b, ids[1000:], x[1000:])
    return inspect([a, b]), ids, x


def test_plan_units_splits_big_files_by_row_group_and_honours_max_items(row_grouped, monkeypatch):
    info, _, _ = row_grouped
    whole = source.plan_units(info, info.num_rows)
    assert [(u.pieces[0].row_groups, u.rows) for u in whole] == [(None, 1000), (None, 300)]
    monkeypatch.setattr(source, "SPLIT_ROWS", 400)  # files over 400 rows: pieces of >= 200 rows
    split = source.plan_units(info, info.num_rows)
    assert [len(u.pieces) for u in split] == [1] * 6  # no task count asked: a task per piece
    assert [u.rows for u in split] == [200] * 5 + [300]
    assert [u.pieces[0].row_groups for u in split[:5]] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    first = source.plan_units(info, 450)  # --max_items 450: the first 450 rows in file order
    assert [u.rows for u in first] == [200, 200, 50] and first[-1].pieces[0].row_groups == (4,)


def test_plan_units_packs_consecutive_pieces_into_about_the_tasks_asked(tmp_path):
    """Many small files become a few read tasks of similar size, each reading whole files in
    file order; every row is planned exactly once."""
    ids, x = make_catalog(1600, 8, seed=7)
    sizes = [100] * 12 + [400]  # twelve small files, then a larger one
    files, start = [], 0
    for i, n in enumerate(sizes):
        files.append(str(tmp_path / f"part-{i:02d}.parquet"))
        write_parquet(files[-1], ids[start : start + n], x[start : start + n])
        start += n
    info = inspect(files)
    units = source.plan_units(info, info.num_rows, tasks=4)
    assert len(units) == 4
    assert [u.rows for u in units] == [400, 400, 400, 400]
    assert [p.path for u in units for p in u.pieces] == files  # each file once, in order
    assert units[0].paths == files[:4] and units[-1].paths == files[-1:]
    assert len(source.plan_units(info, info.num_rows, tasks=50)) == len(files)  # never cut a file
    assert sum(u.rows for u in source.plan_units(info, 1050, tasks=3)) == 1050  # --max_items
    ragged = source.plan_units(info, info.num_rows, tasks=3)
    assert len(ragged) == 3 and max(u.rows for u in ragged) - min(u.rows for u in ragged) <= 400


def test_a_packed_unit_names_the_file_it_cannot_read(tmp_path):
    """A read task of several files: the rows of the good ones, then one error block naming the
    unreadable file, and nothing after it."""
    ids, x = make_catalog(300, 8, seed=3)
    paths = [str(tmp_path / f"part-{i}.parquet") for i in range(3)]
    for i, p in enumerate(paths):
        write_parquet(p, ids[100 * i : 100 * (i + 1)], x[100 * i : 100 * (i + 1)])
    info = inspect(paths)
    (unit,) = source.plan_units(info, info.num_rows, tasks=1)
    assert unit.paths == paths
    blob = open(paths[1], "rb").read()
    open(paths[1], "wb").write(blob[: len(blob) // 2])
    blocks = list(source.read_unit(unit, None, read_batch=64))
    assert [b.num_rows for b in blocks[:-1]] == [64, 36] and blocks[0].column_names == ["ItemID", "embedding"]
    assert blocks[-1].column_names == [source.ERROR_COL]
    assert blocks[-1].column(source.ERROR_COL)[0].as_py().startswith(f"{paths[1]}: cannot read parquet")


def test_passes_fuse_the_read_and_do_not_depend_on_the_cut(ray_session, row_grouped, monkeypatch):
    info, ids, x = row_grouped
    ds = plumbing.dataset(info, info.num_rows)
    scanned = scan.scan_pass(info, seed=3, sample_size=400, n_items=info.num_rows)
    assert sorted(scanned.ids_N.tolist()) == sorted(ids.tolist())
    keep = hash_unit(scanned.sample_ids_S, 3) < 400 / 1300
    assert keep.all() and len(scanned.sample_ids_S) > 0
    order = np.argsort(ids)
    rows = order[np.searchsorted(ids[order], scanned.sample_ids_S)]
    assert np.array_equal(scanned.sample_SD, x[rows])

    # The same pass cut into more read tasks (one per piece) and 64-row blocks, or with the
    # pieces packed into two tasks, gives the same result.
    monkeypatch.setattr(source, "SPLIT_ROWS", 400)
    for tasks, blocks in ((None, 5 * 4 + 5), (2, None)):  # 64-row blocks: five 200-row pieces, one 300
        monkeypatch.setattr(plumbing, "read_tasks", lambda tasks=tasks: tasks)
        fine = plumbing.dataset(info, info.num_rows, read_batch=64)
        t = plumbing.map_catalog(
            fine,
            scan.scan_block,
            scan.empty_scan(False),
            "scan",
            info.num_rows,
            info,
            dim=info.dim,
            seed=3,
            fraction=400 / 1300,
        )
        if blocks is not None:
            assert t.num_rows == blocks  # one result row per block
        again = plumbing.flat(t, "sample_ids")
        assert np.array_equal(np.sort(plumbing.flat(t, "ids")), np.sort(scanned.ids_N))
        assert np.array_equal(np.sort(again), scanned.sample_ids_S)

    # Ray Data runs the read and the pass's map as one operator (no raw rows between tasks).
    mapped = ds.map_batches(lambda b: b, batch_format="pyarrow", batch_size=None)
    assert "ReadCatalogSource->MapBatches" in mapped.materialize().stats()


def test_sample_sink_copies_each_batch_out_and_sorts_in_place():
    """The scan's sample collection against concatenating and gathering: batches of one and of
    several result rows, a sliced batch, rows with no sample, a capacity it must grow past; and
    what it keeps of a batch shares no memory with it (or Ray would keep the block)."""
    import pyarrow as pa

    rng = np.random.default_rng(0)
    per_row = [3, 0, 5, 1, 0, 4, 2]  # sampled rows per result row (block)
    vals = [rng.normal(size=(n, 6)).astype(np.float32) for n in per_row]
    sids = np.split(rng.permutation(1000)[: sum(per_row)].astype(np.int64), np.cumsum(per_row)[:-1])
    rows = [
        pa.table(
            {
                "ids": plumbing.lists(np.arange(10 * i, 10 * i + 10), pa.int64()),
                "sample_ids": plumbing.lists(sids[i], pa.int64()),
                "sample": plumbing.lists(vals[i].ravel(), pa.float32()),
                "maxabs": [float(np.abs(vals[i]).max()) if len(vals[i]) else 0.0],
            }
        )
        for i in range(len(per_row))
    ]
    batches = [
        pa.concat_tables([rows[0], rows[0], rows[1], rows[2]]).slice(1),
        rows[3],
        pa.concat_tables(rows[4:]).combine_chunks(),
    ]
    sink = scan.SampleSink(6, capacity=4)
    kept = [sink.take(b) for b in batches]
    t = pa.concat_tables(kept)
    sample_ids = plumbing.flat(t, "sample_ids")
    assert np.array_equal(sample_ids, np.concatenate(sids)) and len(plumbing.flat(t, "ids")) == 70
    assert max(t.column("maxabs").to_pylist()) == float(np.abs(np.concatenate(vals)).max())
    order = np.argsort(sample_ids, kind="stable")
    assert np.array_equal(sink.sorted(order), np.concatenate(vals)[order])

    def spans(table):
        return [
            (buf.address, buf.address + buf.size)
            for col in table.columns
            for chunk in col.chunks
            for arr in ((chunk, chunk.values) if hasattr(chunk, "values") else (chunk,))
            for buf in arr.buffers()
            if buf is not None and buf.size
        ]

    for k, b in zip(kept, batches, strict=True):
        assert not any(lo < b_hi and b_lo < hi for lo, hi in spans(k) for b_lo, b_hi in spans(b))


def test_take_rows_in_place_is_a_gather():
    from semid_dist.math.rows import take_rows_in_place

    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 3)).astype(np.float32)
    for src in (rng.permutation(500), np.arange(500), np.roll(np.arange(500), 7)):
        y = x.copy()
        take_rows_in_place(y, src)
        assert np.array_equal(y, x[src])


def test_inspect_reads_one_row_not_the_whole_row_group(tmp_path):
    """The embedding size comes from one row: with pyarrow's default pre-buffering, inspecting a
    one-file catalog in a single row group read the whole column chunk (3 GB at 1M x 768). The
    bytes the process reads (/proc/self/io rchar, page cache hits included) tell."""
    ids, x = make_catalog(20000, 768, seed=6)  # 61 MB of floats in one row group
    path = str(tmp_path / "item_emb.parquet")
    write_parquet(path, ids, x, row_group_size=len(ids))

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("rchar:")).split()[1])

    before = rchar()
    info = inspect([path])
    read = rchar() - before
    assert (info.num_rows, info.dim, info.largest_row_group) == (20000, 768, (path, 20000))
    assert read < 8 << 20, f"inspect read {read / 2**20:.0f} MB of a {x.nbytes / 2**20:.0f} MB row group"


def test_a_row_group_too_big_to_share_out_is_named(tmp_path, monkeypatch, caplog):
    """A row group is one task's read; one bigger than a file split is worth a warning."""
    from semid_dist.config import Config

    ids, x = make_catalog(1000, 8, seed=7)
    one, many = str(tmp_path / "one.parquet"), str(tmp_path / "many.parquet")
    write_parquet(one, ids, x, row_group_size=1000)
    write_parquet(many, ids, x, row_group_size=100)
    monkeypatch.setattr("semid_dist.run.SPLIT_ROWS", 400)
    for path, warned in ((one, True), (many, False)):
        caplog.clear()
        Run(Config(data_path=path, output_dir="y", mode="kmeans")).inspect()
        assert ("one.parquet: a row group of 1000 rows, which one task reads alone" in caplog.text) == warned


def test_a_lone_read_task_gets_the_spare_cpus_and_stays_fused(ray_session, tmp_path):
    """One file in one row group is one read task: it gets every task slot's CPU (its BLAS
    threads follow), and its read and map still run as one operator."""
    import os

    import pyarrow as pa

    ids, x = make_catalog(500, 8, seed=8)
    path = str(tmp_path / "one.parquet")
    write_parquet(path, ids, x)
    info = inspect([path])
    ds = plumbing.dataset(info, info.num_rows)
    assert ds.context.get_config(plumbing.TASK_CPUS) == plumbing.parallelism()

    def threads(block):
        return {
            "ids": plumbing.lists(block.column("ItemID").to_numpy(), pa.int64()),
            "omp": [int(os.environ["OMP_NUM_THREADS"])],
        }

    mapped = plumbing.map_blocks(
        ds, threads, {"ids": plumbing.lists(np.zeros(0, np.int64), pa.int64()), "omp": [0]}
    )
    out = mapped.materialize()
    assert "ReadCatalogSource->MapBatches" in out.stats()
    t = out.to_arrow_refs()
    import ray

    t = pa.concat_tables(ray.get(t))
    assert set(t.column("omp").to_pylist()) == {plumbing.parallelism()}
    assert np.array_equal(np.sort(plumbing.flat(t, "ids")), np.sort(ids))


def test_max_items_reads_only_the_first_rows(ray_session, row_grouped):
    info, ids, _ = row_grouped
    scanned = scan.scan_pass(info, seed=0, sample_size=50, n_items=250)
    assert np.array_equal(scanned.ids_N, ids[:250])


def test_encode_on_device_actors_gives_the_codes_of_the_fused_pass(ray_session, row_grouped):
    """The GPU encode path (an actor pool holding the tokenizer on its device) run here on the
    CPU: its plumbing gives exactly the codes of the CPU pass (the CUDA arithmetic itself is
    checked in tests/test_gpu.py)."""
    import torch

    from semid_dist.tokenizer import Tokenizer

    info, ids, x = row_grouped
    books = torch.from_numpy(np.stack([x[:24] * s for s in (1.0, 0.4)]).astype(np.float32))
    tok = Tokenizer("kmeans", {}, codebooks_LKD=books)
    fused = encode.encode_pass(info, tok, info.num_rows)
    actors = encode.encode_pass_on_devices(info, tok, info.num_rows, "cpu", 2, batch_size=300)
    assert np.array_equal(actors.ids_N, np.sort(ids)) and np.array_equal(actors.ids_N, fused.ids_N)
    assert np.array_equal(actors.codes_NL, fused.codes_NL)
    assert np.isclose(actors.sq_err_sum, fused.sq_err_sum, rtol=1e-5)
    assert np.isclose(fused.sq_norm_sum, float((x.astype(np.float64) ** 2).sum()), rtol=1e-5)
    assert np.isclose(actors.sq_norm_sum, fused.sq_norm_sum, rtol=1e-6)
    assert encode.encode_device("auto") == ("cpu", 0)  # no GPU in this Ray
    # the nightly job's pass (with embedding fingerprints) on the same actors
    fused_fp = encode.encode_pass(info, tok, info.num_rows, encode.Extras(fingerprints=True))
    actors_fp = encode.encode_pass_on_devices(
        info, tok, info.num_rows, "cpu", 2, batch_size=300, extras=encode.Extras(fingerprints=True)
    )
    assert fused_fp.fp_N is not None and np.array_equal(actors_fp.fp_N, fused_fp.fp_N)
    assert len(np.unique(fused_fp.fp_N)) == len(ids)
    assert np.array_equal(actors_fp.codes_NL, fused.codes_NL)


def test_pass_tasks_run_as_many_blas_threads_as_ray_gave_them(ray_session, row_grouped):
    """A Ray worker loads numpy's OpenBLAS before Ray sets OMP_NUM_THREADS, so it would run one
    BLAS thread per core in every task (threads that spin against each other: semid_dist/blas.py)."""
    from semid_dist import blas

    assert blas.threads() is not None, "semid_dist.blas finds no OpenBLAS in numpy (pip's numpy bundles one)"

    def blas_threads_block(block, dim):  # nested: shipped by value (workers cannot import tests)
        import os

        import pyarrow as pa

        from semid_dist import blas

        return {
            "ids": pa.array([block.column("ItemID").to_pylist()], pa.list_(pa.int64())),
            "threads": [blas.threads() or 0],
            "omp": [int(os.environ["OMP_NUM_THREADS"])],
        }

    info, _, _ = row_grouped
    t = plumbing.map_catalog(
        plumbing.dataset(info, info.num_rows),
        blas_threads_block,
        {"ids": [[]], "threads": [0], "omp": [0]},
        "blas",
        info.num_rows,
        info,
        dim=info.dim,
    )
    assert t.num_rows >= 2
    assert t.column("threads").to_pylist() == t.column("omp").to_pylist() == [1] * t.num_rows


def test_blas_thread_count_can_be_set_in_process():
    from semid_dist import blas

    before = blas.threads()
    assert before is not None, "semid_dist.blas finds no OpenBLAS in numpy (pip's numpy bundles one)"
    try:
        blas.set_threads(1)
        assert blas.threads() == 1
    finally:
        blas.set_threads(before)
    assert blas.threads() == before


def test_a_new_worker_has_pandas_before_its_first_task(ray_session):
    """semid_dist.runtime.LOCAL_SYSTEM_CONFIG: every worker imports pandas on its main thread
    at start-up, so Ray Data's lazy imports from other threads never meet a half-imported
    pandas (without it a new worker has not imported pandas at this point)."""
    import uuid

    import ray

    # A runtime_env of its own makes Ray start a worker for this task alone.
    @ray.remote(runtime_env={"env_vars": {"SEMID_TEST_WORKER": uuid.uuid4().hex}})
    def first_task():
        import sys

        return "pandas" in sys.modules

    assert ray.get(first_task.remote())
