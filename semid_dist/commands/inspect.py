"""``semid inspect``: what one item's semantic ID means, or which items a prefix holds.

    semid inspect --run RUN --item ITEMID [--data_path CATALOG] [--item_titles FILE] [--neighbours 10]
    semid inspect --run RUN --prefix 12,34 [--item_titles FILE]

RUN is a published output dir or a nightly output root (its LATEST generation); ITEMID is an
integer, or for a run of string ItemIDs the string as given (titles and the catalog have the
run's ItemID kind). For an item: its semantic ID, how many items share its prefix at each depth
1..L (with a few of them), and its nearest neighbours with their IDs: by embedding cosine when
--data_path is given, else by the cosine of the tokenizer's reconstructions (final_model.pt
decodes every item's codes).
Everything is read on this machine (the mappings, the titles and, with --data_path, the catalog).
"""

from __future__ import annotations

import io
import sys

import numpy as np

from semid_dist.errors import UserError, one_line
from semid_dist.io.storage import Storage, join
from semid_dist.options import ArgParser
from semid_dist.published import MODEL, PublishedRun, add_s3_flags, storage

EXAMPLES = 3  # items shown per prefix depth


def parse_prefix(text: str, width: int) -> list[int]:
    try:
        codes = [int(part) for part in text.replace(" ", "").split(",")]
    except ValueError:
        raise UserError(f"--prefix {text!r}: expected codes separated by commas, e.g. 12,34") from None
    if not 1 <= len(codes) <= width or min(codes) < 0:
        raise UserError(f"--prefix {text!r}: expected 1 to {width} non-negative codes separated by commas")
    return codes


def parse_item(text: str, run: PublishedRun) -> int | str:
    """--item as the run's ItemIDs are: the string as given, or an integer (argparse's error,
    as when the flag was typed int, for one that is not)."""
    if run.kind == "string":
        return text
    try:
        return int(text)
    except ValueError:
        build_parser().error(f"argument --item: invalid int value: {text!r}")


def read_titles(path: str, store: Storage, run: PublishedRun) -> dict[int | str, str]:
    import pyarrow.parquet as pq

    from semid_dist.catalog.schema import id_kind

    if not path:
        return {}
    try:
        t = pq.read_table(io.BytesIO(store.read_bytes(path, "titles file")), columns=["ItemID", "title"])
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: expected a parquet file with ItemID and title ({one_line(e)})") from e
    kind = id_kind(t.schema.field("ItemID").type)
    if kind != run.kind:
        raise UserError(f"{path}: its ItemIDs are {kind}s, but {run.name} maps {run.kind} ItemIDs")
    return dict(zip(t.column("ItemID").to_pylist(), t.column("title").to_pylist(), strict=True))


def _batches(data_path: str, run: PublishedRun):
    """(rows in run, embeddings) of every batch of the catalog, validated, read here: each
    item's row in the run's mappings, -1 for an item the run does not map."""
    from semid_dist.catalog.names import positions
    from semid_dist.catalog.schema import (
        EMB_COL,
        ID_COL,
        RowError,
        batch_names,
        batch_to_arrays,
        id_kind,
        inspect_catalog,
    )

    catalog = inspect_catalog(run.store.list_parquet(data_path), run.store)
    if id_kind(catalog.id_type) != run.kind:
        kind = id_kind(catalog.id_type)
        raise UserError(f"{data_path}: its ItemIDs are {kind}s, but {run.name} maps {run.kind} ItemIDs")
    for path in catalog.files:
        for batch in catalog.open(path).iter_batches(batch_size=16384, columns=[ID_COL, EMB_COL]):
            try:
                keys_B, x_BD = batch_to_arrays(batch, catalog.dim)
            except RowError as e:
                raise UserError(f"{path}: {e.args[0]}") from e
            names = batch_names(batch)
            yield positions(keys_B if names is None else names, run.ids_N), x_BD


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def embedding_neighbours(data_path: str, run: PublishedRun, row: int, k: int):
    """The k items of the run nearest its row by embedding cosine, streamed over the catalog
    (two passes, a batch at a time: the catalog never has to fit in memory); (rows, cosines,
    items compared)."""
    q = next((x_BD[rows_B == row][0] for rows_B, x_BD in _batches(data_path, run) if row in rows_B), None)
    if q is None:
        raise UserError(f"{data_path}: ItemID {run.shown(run.item(row))} is not in the catalog")
    q = _unit(q)
    best_rows, best_sim, seen = np.zeros(0, np.int64), np.zeros(0), 0
    for rows_B, x_BD in _batches(data_path, run):
        keep = (rows_B >= 0) & (rows_B != row)
        seen += int(keep.sum())
        best_rows = np.concatenate([best_rows, rows_B[keep]])
        best_sim = np.concatenate([best_sim, _unit(x_BD[keep]) @ q])
        top = np.lexsort([best_rows, -best_sim])[:k]  # most similar first; ties by row (ItemID order)
        best_rows, best_sim = best_rows[top], best_sim[top]
    return best_rows, best_sim, seen + 1


def reconstruction_neighbours(run: PublishedRun, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k rows nearest row by the cosine of the tokenizer's reconstructions of their L codes
    (the dedup code is not the tokenizer's), and the cosines. Each distinct code tuple is decoded
    once, a chunk at a time."""
    from semid_dist.math.dedup import row_groups
    from semid_dist.tokenizer import read_tokenizer

    tok = read_tokenizer(join(run.dir, MODEL), run.store)[0]
    codes_NL = run.sid_NM[:, : run.n_levels]
    group_N, first, order = row_groups(codes_NL)
    unique_GL = codes_NL[order[first]]  # one row per distinct code tuple, in group order
    q = _unit(tok.decode(codes_NL[row : row + 1]))[0]
    sim_G = np.concatenate(
        [_unit(tok.decode(unique_GL[i : i + 8192])) @ q for i in range(0, len(unique_GL), 8192)]
    )
    sim_N = sim_G[group_N]
    sim_N[row] = -np.inf
    k = min(k, len(sim_N) - 1)
    top = np.argpartition(-sim_N, k - 1)[:k] if k > 0 else np.zeros(0, np.int64)
    top = top[np.lexsort([top, -sim_N[top]])]  # most similar first; ties by row (ItemID order)
    return top, sim_N[top]


def _line(run: PublishedRun, row: int, titles: dict, extra: str = "") -> str:
    item = run.item(row)
    title = titles.get(item)
    return f"{item:>12}  {run.sid_NM[row].tolist()}{extra}" + (f"  {title}" if title else "")


def show_item(run: PublishedRun, item: int | str, titles: dict, data_path: str, k: int) -> None:
    row = run.row_of(item)
    sid = run.sid_NM[row]
    top, sim, how = np.zeros(0, np.int64), np.zeros(0), ""
    if k > 0 and data_path:  # before any output: a catalog error is the only thing printed
        top, sim, n = embedding_neighbours(data_path, run, row, k)
        how = f"by embedding cosine over {n} items of {data_path}"
    elif k > 0:
        how = (
            "by the cosine of the tokenizer's reconstructions of their codes (--data_path: of the embeddings)"
        )
        top, sim = reconstruction_neighbours(run, row, k)
    title = titles.get(item)
    print(f"item {item}" + (f"  {title}" if title else ""))
    print(f"semantic ID: {sid.tolist()}  ({run.n_levels} codes + dedup code {sid[-1]})  run: {run.name}")
    print("items sharing its prefix:")
    for depth in range(1, run.n_levels + 1):
        rows = run.under(sid[:depth].tolist())
        others = [r for r in rows if r != row][:EXAMPLES]
        print(f"  depth {depth} {sid[:depth].tolist()}: {len(rows)} item(s)")
        for r in others:
            print("    " + _line(run, r, titles))
    if k <= 0:
        return
    print(f"nearest neighbours {how}:")
    for r, s in zip(top, sim, strict=True):
        shared = int(np.cumprod(run.sid_NM[r, : run.n_levels] == sid[: run.n_levels]).sum())
        print("  " + _line(run, int(r), titles, f"  cos {s:.3f}  shares {shared} code(s)"))


def show_prefix(run: PublishedRun, prefix: list[int], titles: dict, limit: int) -> None:
    rows = run.under(prefix)
    print(f"prefix {prefix}: {len(rows)} item(s)  run: {run.name}")
    shown = rows if limit <= 0 else rows[:limit]
    for r in shown:
        print("  " + _line(run, int(r), titles))
    if len(shown) < len(rows):
        print(f"  ... and {len(rows) - len(shown)} more (--limit 0 lists them all)")


def build_parser() -> ArgParser:
    p = ArgParser(prog="semid inspect", description="Look up an item's semantic ID or a prefix's items.")
    p.add_argument("--run", required=True, help="published output dir or nightly output root")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--item", help="an ItemID (as given, for a run of string ItemIDs)")
    what.add_argument("--prefix", help="leading codes separated by commas, e.g. 12,34")
    p.add_argument("--data_path", default="", help="the catalog: neighbours by embedding cosine (--item)")
    p.add_argument("--item_titles", default="", help="parquet with ItemID,title shown next to items")
    p.add_argument("--neighbours", type=int, default=10, help="nearest neighbours shown (--item)")
    p.add_argument("--limit", type=int, default=100, help="items listed under a prefix (0: all)")
    add_s3_flags(p)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        store = storage(args)
        run = PublishedRun(args.run, store)
        prefix = parse_prefix(args.prefix, run.sid_NM.shape[1]) if args.prefix is not None else None
        item = parse_item(args.item, run) if prefix is None else None
        titles = read_titles(args.item_titles, store, run)
        if item is not None:
            show_item(run, item, titles, args.data_path, args.neighbours)
        else:
            show_prefix(run, prefix, titles, args.limit)
    except UserError as e:
        print(f"semid: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
