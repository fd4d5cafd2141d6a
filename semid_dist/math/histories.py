"""User histories for a generative retriever: ordering, splits, training windows, query contexts.

Rules (every function is deterministic, vectorised, and independent of the input's row order):

- **Order**: a user's history is sorted by timestamp, ties broken by item index (the index into
  the catalog's ItemIDs sorted ascending, so by ItemID; string ItemIDs bytewise), then by
  nothing else: rows that agree on (user, timestamp, item) are identical, so their relative
  order cannot show.
- **Short users**: a user with fewer than ``min_len`` interactions is dropped (and counted).
- **Splits**: "loo" (leave-one-out): the last item is the test target, the one before it the
  validation target, the rest is training. "dense": the last k = min(test_last, n - 2) items are
  test targets, each predicted from the items before it; the item before them is the validation
  target, the rest is training. Dense with test_last = 1 is loo.
- **Training windows**: S = max_history + 1 consecutive training items, sliding with stride
  ceil(max_history / 2); every training item at sequence position p >= 1 is a target exactly once
  (see ``training_windows``).
- **Queries**: the context of a target at position p is the last max_history items before p;
  the seen items are all the items before p.

Array names carry their shape: U users, T interactions, W windows, S window length, Q queries,
H max_history.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_WINDOWS_PER_USER = 2**20  # keys_W = user_row * 2**20 + w stays unique below this
PROTOCOLS = ("loo", "dense")


@dataclass
class Histories:
    users_U: np.ndarray  # UserID per user, ascending
    offsets_U1: np.ndarray  # int64 (U+1,): user u's items are items_T[offsets_U1[u]:offsets_U1[u+1]]
    items_T: np.ndarray  # int64 item index per interaction, each user's in chronological order

    def lengths(self) -> np.ndarray:
        """int64 (U,): the number of interactions of every user."""
        return np.diff(self.offsets_U1)


@dataclass
class Split:
    protocol: str  # "loo" or "dense"
    train_len_U: np.ndarray  # int64: the first train_len_U[u] items of user u are training data
    val_pos_U: np.ndarray  # int64: position of the validation target in the user's history
    test_user_Q: np.ndarray  # int64: user row of every test target, ordered by (user, position)
    test_pos_Q: np.ndarray  # int64: its position in that user's history


def build_histories(user_T, item_T, ts_T, min_len: int = 3) -> tuple[Histories, dict]:
    """Group interactions into per-user chronological histories; drop users shorter than min_len.

    user_T: any sortable values (int or str); item_T: item indices; ts_T: numeric timestamps."""
    user_T, item_T, ts_T = np.asarray(user_T), np.asarray(item_T, dtype=np.int64), np.asarray(ts_T)
    if not (user_T.shape == item_T.shape == ts_T.shape) or user_T.ndim != 1:
        raise ValueError("user_T, item_T and ts_T must be 1-D arrays of one length")
    users_U, row_T = np.unique(user_T, return_inverse=True)
    row_T = row_T.reshape(-1).astype(np.int64)
    order_T = np.lexsort((item_T, ts_T, row_T))  # lexsort: the last key is the primary one
    len_U = np.bincount(row_T, minlength=users_U.size).astype(np.int64)
    keep_U = len_U >= min_len
    keep_T = keep_U[row_T[order_T]]
    kept_len_U = len_U[keep_U]
    offsets_U1 = np.zeros(kept_len_U.size + 1, dtype=np.int64)
    np.cumsum(kept_len_U, out=offsets_U1[1:])
    h = Histories(users_U[keep_U], offsets_U1, item_T[order_T[keep_T]])
    info = {
        "users": int(keep_U.sum()),
        "users_dropped": int((~keep_U).sum()),
        "interactions": int(offsets_U1[-1]),
        "interactions_dropped": int(item_T.size - offsets_U1[-1]),
    }
    return h, info


def make_split(h: Histories, protocol: str, test_last: int = 10) -> Split:
    """The train/validation/test positions of every user under protocol "loo" or "dense"."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown split protocol {protocol!r} (expected one of {', '.join(PROTOCOLS)})")
    if test_last < 1:
        raise ValueError(f"test_last must be at least 1, got {test_last}")
    n_U = h.lengths()
    if n_U.size and n_U.min() < 3:  # a validation and a test target need two items after the first
        raise ValueError(f"every history needs at least 3 items to be split, found {int(n_U.min())}")
    k_U = np.ones_like(n_U) if protocol == "loo" else np.minimum(test_last, n_U - 2)
    val_pos_U = n_U - k_U - 1
    test_user_Q = np.repeat(np.arange(n_U.size, dtype=np.int64), k_U)
    first_Q = np.repeat(np.cumsum(k_U) - k_U, k_U)  # index of the user's first test target in Q
    test_pos_Q = (val_pos_U + 1)[test_user_Q] + np.arange(test_user_Q.size, dtype=np.int64) - first_Q
    return Split(protocol, val_pos_U.copy(), val_pos_U, test_user_Q, test_pos_Q)


def window_stride(max_history: int) -> int:
    """The stride between a user's training windows: ceil(max_history / 2), at least 1."""
    return max(1, -(-max_history // 2))


def training_windows(
    h: Histories, train_len_U: np.ndarray, max_history: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sliding windows over every user's training prefix: (items_WS, target_WS, keys_W).

    Window w of a user covers sequence positions [w*hop, min(w*hop + S, train_len)), S =
    max_history + 1, hop = ``window_stride``; a user's windows go on until one reaches the end of
    its training prefix. Targets: in the first window every position t >= 1; in window w > 0
    only the positions window w - 1 did not cover, [(w-1)*hop + S, w*hop + S), so every training
    item at p >= 1 is a target exactly once and, outside the first window, has at least S - hop
    items of context. items_WS is padded with -1 on the right; keys_W = user_row * 2**20 + w.
    Users with train_len < 2 have no window. Order: by user, then w."""
    if max_history < 1:
        raise ValueError(f"max_history must be at least 1, got {max_history}")
    S, hop = max_history + 1, window_stride(max_history)
    len_U = np.asarray(train_len_U, dtype=np.int64)
    # ceil((len - S) / hop) windows after the first, none for a user with no training target
    n_win_U = np.where(len_U >= 2, np.maximum(0, -(-(len_U - S) // hop)) + 1, 0)
    if n_win_U.size and n_win_U.max() > MAX_WINDOWS_PER_USER:
        raise ValueError(f"a user needs {int(n_win_U.max())} windows, more than {MAX_WINDOWS_PER_USER}")
    user_W = np.repeat(np.arange(len_U.size, dtype=np.int64), n_win_U)
    w_W = np.arange(user_W.size, dtype=np.int64) - np.repeat(np.cumsum(n_win_U) - n_win_U, n_win_U)
    pos_WS = (w_W * hop)[:, None] + np.arange(S, dtype=np.int64)[None, :]
    valid_WS = pos_WS < len_U[user_W][:, None]
    first_target_W = np.where(w_W == 0, 1, (w_W - 1) * hop + S)
    target_WS = valid_WS & (pos_WS >= first_target_W[:, None])
    row_WS = np.where(valid_WS, h.offsets_U1[user_W][:, None] + pos_WS, 0)
    items_WS = np.where(valid_WS, h.items_T[row_WS], -1)
    return items_WS.astype(np.int64, copy=False), target_WS, user_W * MAX_WINDOWS_PER_USER + w_W


def _check_queries(h: Histories, user_Q, pos_Q) -> tuple[np.ndarray, np.ndarray]:
    user_Q, pos_Q = np.asarray(user_Q, dtype=np.int64), np.asarray(pos_Q, dtype=np.int64)
    if user_Q.shape != pos_Q.shape or user_Q.ndim != 1:
        raise ValueError("user_Q and pos_Q must be 1-D arrays of one length")
    if user_Q.size and (pos_Q.min() < 1 or (pos_Q >= h.lengths()[user_Q]).any()):
        raise ValueError("every query position must be at least 1 and inside its user's history")
    return user_Q, pos_Q


def query_contexts(h: Histories, user_Q, pos_Q, max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """The last max_history items before each query's position: (context_QH, length_Q).

    context_QH is left-aligned (oldest first, at columns 0..length-1) and padded with -1."""
    user_Q, pos_Q = _check_queries(h, user_Q, pos_Q)
    length_Q = np.minimum(pos_Q, max_history)
    start_Q = h.offsets_U1[user_Q] + pos_Q - length_Q  # row of the oldest context item
    col_H = np.arange(max_history, dtype=np.int64)
    valid_QH = col_H[None, :] < length_Q[:, None]
    row_QH = np.where(valid_QH, start_Q[:, None] + col_H[None, :], 0)
    context_QH = np.where(valid_QH, h.items_T[row_QH], -1)
    return context_QH.astype(np.int64, copy=False), length_Q


def _first_occurrences(h: Histories) -> np.ndarray:
    """bool (T,): the interaction is its user's first with that item."""
    len_U = h.lengths()
    user_T = np.repeat(np.arange(len_U.size, dtype=np.int64), len_U)
    order_T = np.lexsort((np.arange(h.items_T.size), h.items_T, user_T))  # by user, item, position
    first_T = np.ones(h.items_T.size, dtype=bool)
    user_s, item_s = user_T[order_T], h.items_T[order_T]
    first_T[order_T[1:]] = (user_s[1:] != user_s[:-1]) | (item_s[1:] != item_s[:-1])
    return first_T


def seen_items(h: Histories, user_Q, pos_Q) -> tuple[np.ndarray, np.ndarray]:
    """Every item each query's user interacted with before its position (the whole prefix), as
    CSR (offsets_Q1, items_I): each item once, in the order the user first met them.

    Repeats are dropped by marking each user's first interaction with an item once (a sort over
    T), not by sorting every query's prefix (dense queries overlap: their prefixes sum to far
    more than T)."""
    user_Q, pos_Q = _check_queries(h, user_Q, pos_Q)
    query_I = np.repeat(np.arange(pos_Q.size, dtype=np.int64), pos_Q)
    first_I = np.repeat(np.cumsum(pos_Q) - pos_Q, pos_Q)  # the query's first slot in I
    row_I = h.offsets_U1[user_Q][query_I] + np.arange(query_I.size, dtype=np.int64) - first_I
    keep_I = _first_occurrences(h)[row_I]
    offsets_Q1 = np.zeros(pos_Q.size + 1, dtype=np.int64)
    np.cumsum(np.bincount(query_I[keep_I], minlength=pos_Q.size), out=offsets_Q1[1:])
    return offsets_Q1, h.items_T[row_I[keep_I]]


def train_counts(h: Histories, train_len_U: np.ndarray, n_items: int) -> np.ndarray:
    """int64 (n_items,): each item's number of interactions inside the training prefixes."""
    len_U = h.lengths()
    user_T = np.repeat(np.arange(len_U.size, dtype=np.int64), len_U)
    pos_T = np.arange(h.items_T.size, dtype=np.int64) - h.offsets_U1[user_T]
    in_train_T = pos_T < np.asarray(train_len_U, dtype=np.int64)[user_T]
    return np.bincount(h.items_T[in_train_T], minlength=n_items).astype(np.int64)
