"""semid evaluate's interactions: reading and validation (one line naming the file per mistake),
per-user chronological histories, the split protocols, training windows, query contexts."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semid_dist.errors import UserError
from semid_dist.evaluate.interactions import COLUMNS, read_interactions, to_histories
from semid_dist.io.storage import Storage
from semid_dist.math.histories import (
    Histories,
    build_histories,
    make_split,
    query_contexts,
    seen_items,
    train_counts,
    training_windows,
    window_stride,
)

STORE = Storage()


def _hist(lengths, first_item=0) -> Histories:
    """Histories whose items are 1000 * user + position (so an item tells where it is)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.concatenate([1000 * u + np.arange(n) for u, n in enumerate(lengths)] or [[]])
    return Histories(np.arange(len(lengths)) + 7, offsets, items.astype(np.int64) + first_item)


def _write(path, users, items, ts, **types) -> str:
    cols = {
        "UserID": pa.array(users, types.get("UserID", pa.int64())),
        "ItemID": pa.array(items, types.get("ItemID", pa.int64())),
        "timestamp": pa.array(ts, types.get("timestamp", pa.int64())),
    }
    pq.write_table(pa.table(cols), str(path))
    return str(path)


def _error(path) -> str:
    with pytest.raises(UserError) as e:
        read_interactions(str(path), STORE)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- histories ----------------------------------------------------------------------------------


def test_chronological_with_ties_by_item_and_independent_of_row_order():
    user = np.array([5, 5, 5, 5, 9, 9, 9, 2, 2])
    item = np.array([3, 1, 2, 0, 4, 4, 1, 0, 1])
    ts = np.array([10, 20, 10, 30, 1, 1, 1, 5, 6])
    h, info = build_histories(user, item, ts, min_len=2)
    assert h.users_U.tolist() == [2, 5, 9]
    assert h.offsets_U1.tolist() == [0, 2, 6, 9]
    assert h.items_T.tolist() == [0, 1, 2, 3, 1, 0, 1, 4, 4]
    assert h.lengths().tolist() == [2, 4, 3]
    rng = np.random.default_rng(0)
    for _ in range(5):
        p = rng.permutation(user.size)
        h2, info2 = build_histories(user[p], item[p], ts[p], min_len=2)
        assert info2 == info
        for a, b in zip(
            (h.users_U, h.offsets_U1, h.items_T), (h2.users_U, h2.offsets_U1, h2.items_T), strict=True
        ):
            np.testing.assert_array_equal(a, b)


def test_short_users_dropped_and_counted():
    user = np.array([1, 1, 2, 2, 2, 3, 4, 4, 4, 4])
    h, info = build_histories(user, np.arange(10), np.arange(10))
    assert h.users_U.tolist() == [2, 4]
    assert info == {"users": 2, "users_dropped": 2, "interactions": 7, "interactions_dropped": 3}
    assert h.items_T.tolist() == [2, 3, 4, 6, 7, 8, 9]


# --- splits -------------------------------------------------------------------------------------


def test_loo_split():
    s = make_split(_hist([3, 5]), "loo")
    assert s.train_len_U.tolist() == [1, 3]
    assert s.val_pos_U.tolist() == [1, 3]
    assert s.test_user_Q.tolist() == [0, 1] and s.test_pos_Q.tolist() == [2, 4]


def test_dense_split_and_dense_one_is_loo():
    h = _hist([3, 5, 12])
    s = make_split(h, "dense", test_last=4)
    assert s.protocol == "dense"
    # k = min(4, n - 2): 1, 3, 4
    assert s.train_len_U.tolist() == [1, 1, 7]
    assert s.val_pos_U.tolist() == [1, 1, 7]
    assert s.test_user_Q.tolist() == [0, 1, 1, 1, 2, 2, 2, 2]
    assert s.test_pos_Q.tolist() == [2, 2, 3, 4, 8, 9, 10, 11]
    loo, one = make_split(h, "loo"), make_split(h, "dense", test_last=1)
    for f in ("train_len_U", "val_pos_U", "test_user_Q", "test_pos_Q"):
        np.testing.assert_array_equal(getattr(loo, f), getattr(one, f))
    with pytest.raises(ValueError, match="unknown split protocol"):
        make_split(h, "random")
    with pytest.raises(ValueError, match="test_last"):
        make_split(h, "dense", test_last=0)


# --- training windows ---------------------------------------------------------------------------


@pytest.mark.parametrize("max_history", [1, 2, 4, 5])
def test_every_training_position_is_a_target_once(max_history):
    S, hop = max_history + 1, window_stride(max_history)
    lengths = [0, 1, 2, 3, S - 1, S, S + 1, S + hop, 3 * S + 5, 7 * S + 2]
    train_len = np.array(lengths, dtype=np.int64)
    h = _hist([n + 2 for n in lengths])  # two items past the training prefix
    items_WS, target_WS, keys_W = training_windows(h, train_len, max_history)
    assert items_WS.shape[1] == S and items_WS.dtype == np.int64 and target_WS.dtype == bool
    assert len(set(keys_W.tolist())) == keys_W.size and (np.diff(keys_W) > 0).all()  # by user, then w
    user_W, w_W = keys_W >> 20, keys_W & (2**20 - 1)
    hits = {u: np.zeros(n, dtype=np.int64) for u, n in enumerate(lengths)}
    for items, target, u, w in zip(items_WS, target_WS, user_W, w_W, strict=True):
        n_valid = int((items >= 0).sum())
        assert (items[:n_valid] >= 0).all() and (items[n_valid:] == -1).all()
        pos = w * hop + np.arange(n_valid)
        assert pos[-1] < train_len[u]  # no window crosses train_len
        np.testing.assert_array_equal(items[:n_valid], 1000 * u + pos)
        assert not target[n_valid:].any()
        for t in np.flatnonzero(target):
            hits[u][w * hop + t] += 1
            assert t >= (1 if w == 0 else S - hop)  # context outside the first window
    for u, n in enumerate(lengths):
        assert hits[u][1:].tolist() == [1] * max(n - 1, 0) and (n == 0 or hits[u][0] == 0)
    assert set(user_W.tolist()) == {u for u, n in enumerate(lengths) if n >= 2}
    again = training_windows(h, train_len, max_history)
    for a, b in zip((items_WS, target_WS, keys_W), again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_window_keys_depend_only_on_user_and_w():
    h = _hist([20, 20])
    _, _, keys_a = training_windows(h, np.array([20, 20]), 4)
    _, _, keys_b = training_windows(h, np.array([0, 20]), 4)
    assert set(keys_b.tolist()) < set(keys_a.tolist())
    assert keys_b[0] == 1 * 2**20


# --- queries ------------------------------------------------------------------------------------


def test_query_contexts_and_seen_items():
    h = Histories(np.array([1, 2]), np.array([0, 6, 9]), np.array([5, 3, 5, 8, 1, 2, 7, 7, 4]))
    context_QH, length_Q = query_contexts(h, [0, 0, 1, 0], [5, 2, 2, 1], max_history=3)
    assert context_QH.tolist() == [[5, 8, 1], [5, 3, -1], [7, 7, -1], [5, -1, -1]]
    assert length_Q.tolist() == [3, 2, 2, 1]
    offsets_Q1, items = seen_items(h, [0, 1, 0], [5, 2, 1])
    assert offsets_Q1.tolist() == [0, 4, 5, 6]
    assert items.tolist() == [5, 3, 8, 1, 7, 5]  # the whole prefix, each item once, first-met order
    with pytest.raises(ValueError, match="query position"):
        query_contexts(h, [0], [0], 3)
    with pytest.raises(ValueError, match="query position"):
        seen_items(h, [1], [3])


def test_train_counts():
    h = Histories(np.array([1, 2]), np.array([0, 4, 7]), np.array([0, 2, 2, 1, 2, 3, 0]))
    assert train_counts(h, np.array([3, 2]), 5).tolist() == [1, 0, 3, 1, 0]
    assert train_counts(h, np.array([0, 0]), 2).tolist() == [0, 0]


# --- reading ------------------------------------------------------------------------------------

USERS = [1, 1, 1, 2, 2, 2, 2, 3]
ITEMS = [10, 30, 20, 10, 40, 30, 20, 10]
TS = [3, 1, 2, 5, 5, 6, 7, 1]


def test_read_and_histories(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    _write(d / "part-0.parquet", USERS[:4], ITEMS[:4], TS[:4], UserID=pa.int32())
    _write(d / "part-1.parquet", USERS[4:], ITEMS[4:], TS[4:])
    table = read_interactions(str(d), STORE)
    assert table.column_names == list(COLUMNS) and table.num_rows == 8
    for where in (str(d), str(d / "*.parquet")):
        assert read_interactions(where, STORE).equals(table)
    h, info = to_histories(table, np.array([10, 20, 30, 40, 50]), "run-a")
    assert h.users_U.tolist() == [1, 2]
    assert h.items_T.tolist() == [2, 1, 0, 0, 3, 2, 1]  # user 2: ts 5 twice, ItemID 10 before 40
    assert info == {"users": 2, "users_dropped": 1, "interactions": 7, "interactions_dropped": 1, "rows": 8}


def test_string_user_ids(tmp_path):
    names = ["zoë", "al", "zoë", "al", "al", "zoë", "bo"]
    path = _write(
        tmp_path / "s.parquet", names, [1, 2, 3, 1, 2, 3, 1], [1, 1, 1, 2, 3, 0, 0], UserID=pa.string()
    )
    h, _ = to_histories(read_interactions(path, STORE), np.array([1, 2, 3]), "run-a")
    assert h.users_U.tolist() == ["al", "zoë"]
    assert h.items_T.tolist() == [1, 0, 1, 2, 0, 2]


@pytest.mark.parametrize(
    "ts_type, values",
    [
        (pa.timestamp("ms"), [3000, 1000, 2000]),
        (pa.timestamp("us", "UTC"), [3, 1, 2]),
        (pa.date32(), [3, 1, 2]),
    ],
)
def test_timestamp_types_read_as_integers(tmp_path, ts_type, values):
    ts = pa.array(values, pa.int64()).cast(pa.int32() if ts_type == pa.date32() else pa.int64()).cast(ts_type)
    pq.write_table(
        pa.table({"UserID": [1, 1, 1], "ItemID": [10, 20, 30], "timestamp": ts}), tmp_path / "t.parquet"
    )
    table = read_interactions(str(tmp_path / "t.parquet"), STORE)
    assert table.column("timestamp").type == pa.int64()
    assert table.column("timestamp").to_pylist() == values
    h, _ = to_histories(table, np.array([10, 20, 30]), "run-a")
    assert h.items_T.tolist() == [1, 2, 0]


def test_float_timestamps(tmp_path):
    path = _write(tmp_path / "f.parquet", [1, 1, 1], [10, 20, 30], [0.5, 0.25, 0.75], timestamp=pa.float32())
    h, _ = to_histories(read_interactions(path, STORE), np.array([10, 20, 30]), "run-a")
    assert h.items_T.tolist() == [1, 0, 2]


# --- bad input: one line naming the file ------------------------------------------------------


def test_missing_column(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"UserID": [1], "item": [2], "timestamp": [3]}), path)
    assert _error(path) == f"{path}: missing column 'ItemID' (columns: UserID, item, timestamp)"


def test_nulls(tmp_path):
    path = _write(tmp_path / "n.parquet", [1, None, None], [1, 2, 3], [1, 2, 3])
    assert _error(path) == f"{path}: 2 null value(s) in column 'UserID'"


def test_non_numeric_timestamp(tmp_path):
    path = _write(tmp_path / "s.parquet", [1], [2], ["2024-01-01"], timestamp=pa.string())
    assert (
        _error(path)
        == f"{path}: timestamp must be numeric (integer, float, or a timestamp type), found string"
    )


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_timestamp(tmp_path, bad):
    path = _write(tmp_path / "x.parquet", [1, 1], [2, 3], [1.0, bad], timestamp=pa.float64())
    assert _error(path) == f"{path}: 1 NaN or infinite timestamp(s)"


def test_wrong_id_types(tmp_path):
    path = _write(tmp_path / "i.parquet", [1], [1.5], [1], ItemID=pa.float64())
    assert _error(path) == f"{path}: ItemID must be integer or string, found double"
    path = _write(tmp_path / "u.parquet", [1.5], [1], [1], UserID=pa.float64())
    assert _error(path) == f"{path}: UserID must be integer or string, found double"


def test_shards_disagree_on_a_type(tmp_path):
    a = _write(tmp_path / "part-0.parquet", [1], [2], [3])
    b = _write(tmp_path / "part-1.parquet", ["u"], [2], [3], UserID=pa.string())
    assert _error(tmp_path) == f"{b}: column 'UserID' is string here but int64 in {a}"


def test_zero_rows(tmp_path):
    path = _write(tmp_path / "z.parquet", [], [], [])
    assert _error(path) == f"{path}: zero rows in 1 parquet file(s)"


def test_unreadable_and_absent(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    assert _error(tmp_path / "bad.parquet").startswith(
        f"{tmp_path / 'bad.parquet'}: not a readable parquet file"
    )
    assert _error(tmp_path / "nope.parquet") == f"{tmp_path / 'nope.parquet'}: path does not exist"
    assert "glob matches no parquet files" in _error(tmp_path / "*.none.parquet")


def test_item_ids_not_in_mapping(tmp_path):
    path = _write(tmp_path / "m.parquet", [1] * 8, [77, 12, 45, 12, 5, 90, 91, 99], range(8))
    table = read_interactions(path, STORE)
    with pytest.raises(UserError) as e:
        to_histories(table, np.array([5, 6]), "run-a")
    assert str(e.value) == (
        f"{path}: 7 interactions (6 distinct ItemIDs) are not in run-a's mapping, e.g. 12, 45, 77, 90, 91"
    )


def test_no_user_long_enough(tmp_path):
    path = _write(tmp_path / "short.parquet", [1, 1, 2, 2], [1, 2, 1, 2], [1, 2, 3, 4])
    with pytest.raises(UserError) as e:
        to_histories(read_interactions(path, STORE), np.array([1, 2]), "run-a")
    assert str(e.value) == f"{path}: no user has at least 3 interactions"
