"""Deterministic synthetic item catalog, shaped like real item embeddings, as sharded parquet.

    python bench/synth.py --n 1000000 --out /tmp/bench/catalog_1000000
    python bench/synth.py --n 1000000 --id_type string   (-> /tmp/bench/catalog_1000000_str)

What "shaped like real item embeddings" means here (sentence embeddings of item text); the
statistics were set against real 768-d mpnet catalogs (MovieLens, Wikidata films), and the
comparison is in BENCHMARKS.md:
- unit-normalised 768-d vectors with a shared mean direction, so random pairs have a clearly
  positive cosine (sentence-embedding models are anisotropic);
- a three-level hierarchy, 64 topics -> 32 subtopics each -> 32 leaf groups each (65,536
  leaves), with Dirichlet popularity, so cluster sizes are uneven as in real catalogs and
  items have close nearest neighbours;
- a decaying spectrum (std of coordinate d ~ (1 + d)^-0.45), so a few principal directions
  hold most of the variance;
- faiss.Kmeans 3 x 256 on the residuals collides about as often as on real catalogs of the
  same size; on 1M items it collides far more (many items per leaf).

Deterministic: row i depends only on (seed, i // BLOCK) and i, never on the shard count, so the
N = 250,000 catalog is the first 250,000 rows of the N = 1,000,000 one. Generated BLOCK rows at a
time (the full matrix is never in memory); written as list<float32> with 64k-row row groups
(large row groups of list columns exhaust memory on read). ItemIDs are
sparse and unordered (an odd multiplier mod 2^32 is a bijection, so they are unique); with
--id_type string each becomes "SKU-" and its 12 digits (16 bytes, e.g. "SKU-002654448106"), the
embeddings unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

VERSION = 2  # bump when the generator changes: ensure() then regenerates
BLOCK = 16384
ROW_GROUP = 65536
ID_TYPES = ("int", "string")
N_TOPICS, N_SUB, N_LEAF = 64, 32, 32  # per parent
SPEC = 0.45  # std of coordinate d ~ (1 + d)^-SPEC
ALPHA = 2.0  # Dirichlet concentration of topic / subtopic popularity (smaller: more skewed)
# Share of the squared norm carried by each component (they sum to 1 before normalising).
VAR = {"mean": 0.40, "topic": 0.15, "sub": 0.15, "leaf": 0.15, "noise": 0.15}


class Catalog:
    """The fixed parts of the generator: mean, spectrum, the hierarchy's centres and popularity."""

    def __init__(self, dim: int, seed: int):
        self.dim, self.seed = dim, seed
        rng = np.random.default_rng([seed, 0xC0FFEE])
        spec_D = (1.0 + np.arange(dim)) ** -SPEC
        self.spec_D = (spec_D / np.sqrt((spec_D**2).sum())).astype(np.float32)  # unit total variance
        mean = rng.standard_normal(dim)
        self.mean_D = (mean / np.linalg.norm(mean) * np.sqrt(VAR["mean"])).astype(np.float32)
        n_sub, n_leaf = N_TOPICS * N_SUB, N_TOPICS * N_SUB * N_LEAF
        self.topic_TD = self._component(rng, N_TOPICS, "topic")
        self.sub_SD = self._component(rng, n_sub, "sub")
        self.leaf_LD = self._component(rng, n_leaf, "leaf")
        # Uneven popularity down the tree: a leaf's probability is the product of its topic's,
        # subtopic's and own Dirichlet weights.
        p_t = rng.dirichlet(np.full(N_TOPICS, ALPHA))
        p_s = rng.dirichlet(np.full(N_SUB, ALPHA), size=N_TOPICS).ravel()
        p_l = rng.dirichlet(np.full(N_LEAF, 1.0), size=n_sub).ravel()
        p = np.repeat(np.repeat(p_t, N_SUB) * p_s, N_LEAF) * p_l
        self.leaf_cdf = np.cumsum(p / p.sum())

    def _component(self, rng, n: int, name: str) -> np.ndarray:
        z = rng.standard_normal((n, self.dim), dtype=np.float32)
        return z * self.spec_D * np.float32(np.sqrt(VAR[name]))

    def block(self, b: int) -> np.ndarray:
        """Rows [b * BLOCK, (b + 1) * BLOCK) as float32 (BLOCK, dim), unit-normalised."""
        rng = np.random.default_rng([self.seed, b])
        leaf = np.searchsorted(self.leaf_cdf, rng.random(BLOCK), side="right").clip(
            max=len(self.leaf_cdf) - 1
        )
        sub, topic = leaf // N_LEAF, leaf // (N_LEAF * N_SUB)
        x = rng.standard_normal((BLOCK, self.dim), dtype=np.float32)
        x *= self.spec_D * np.float32(np.sqrt(VAR["noise"]))
        x += self.mean_D
        x += self.topic_TD[topic]
        x += self.sub_SD[sub]
        x += self.leaf_LD[leaf]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x


def item_ids(start: int, stop: int) -> np.ndarray:
    i = np.arange(start, stop, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return ((i * np.uint64(2654435761) + np.uint64(12345)) % np.uint64(1 << 32)).astype(np.int64)


def item_names(ids: np.ndarray) -> pa.Array:
    """String ItemIDs "SKU-%012d" of the integer ones (16 bytes each, unique as they are)."""
    digits = pc.utf8_lpad(pc.cast(pa.array(ids), pa.string()), 12, "0")
    return pc.binary_join_element_wise("SKU-", digits, "")


def default_out(n: int, id_type: str = "int") -> str:
    return f"/tmp/bench/catalog_{n}" + ("_str" if id_type == "string" else "")


def rows(cat: Catalog, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the catalog, generated block by block."""
    out = np.empty((stop - start, cat.dim), np.float32)
    for b in range(start // BLOCK, (stop - 1) // BLOCK + 1):
        lo, hi = max(start, b * BLOCK), min(stop, (b + 1) * BLOCK)
        out[lo - start : hi - start] = cat.block(b)[lo - b * BLOCK : hi - b * BLOCK]
    return out


def _table(ids: np.ndarray, x: np.ndarray, id_type: str = "int") -> pa.Table:
    d = x.shape[1]
    offsets = pa.array(np.arange(0, x.size + 1, d, dtype=np.int32))
    emb = pa.ListArray.from_arrays(offsets, pa.array(x.ravel()))
    item = item_names(ids) if id_type == "string" else pa.array(ids)
    return pa.table({"ItemID": item, "embedding": emb})


def generate(n: int, out: str, shards: int = 16, dim: int = 768, seed: int = 0, id_type: str = "int") -> dict:
    assert id_type in ID_TYPES, id_type
    os.makedirs(out, exist_ok=True)
    cat = Catalog(dim, seed)
    bounds = np.linspace(0, n, shards + 1).round().astype(int)
    t0 = time.time()
    for s in range(shards):
        path = os.path.join(out, f"part-{s:05d}.parquet")
        tmp = path + ".tmp"
        with pq.ParquetWriter(tmp, _table(item_ids(0, 1), rows(cat, 0, 1), id_type).schema) as w:
            for lo in range(bounds[s], bounds[s + 1], ROW_GROUP):
                hi = min(lo + ROW_GROUP, bounds[s + 1])
                w.write_table(_table(item_ids(lo, hi), rows(cat, lo, hi), id_type), row_group_size=ROW_GROUP)
        os.replace(tmp, path)
        print(f"  {path}: rows {bounds[s]}..{bounds[s + 1]} ({time.time() - t0:.0f} s)", flush=True)
    meta = {
        "n": n,
        "dim": dim,
        "shards": shards,
        "seed": seed,
        "row_group": ROW_GROUP,
        "generator": "bench/synth.py",
        "version": VERSION,
        "seconds": round(time.time() - t0, 1),
    }
    if id_type != "int":  # integer catalogs keep the _catalog.json they always had
        meta["id_type"] = id_type
    with open(os.path.join(out, "_catalog.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


def ensure(n: int, out: str, shards: int = 16, dim: int = 768, seed: int = 0, id_type: str = "int") -> str:
    """Generate the catalog unless `out` already holds the same one (checked by _catalog.json;
    one without "id_type" has integer ItemIDs)."""
    try:
        with open(os.path.join(out, "_catalog.json")) as f:
            meta = json.load(f)
        have = (meta["n"], meta["dim"], meta["shards"], meta["seed"], meta.get("version"))
        if have == (n, dim, shards, seed, VERSION) and meta.get("id_type", "int") == id_type:
            return out
    except (OSError, ValueError, KeyError):
        pass
    print(
        f"generating a synthetic catalog: {n} x {dim} in {shards} shards, {id_type} ItemIDs -> {out}",
        flush=True,
    )
    generate(n, out, shards, dim, seed, id_type)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--id_type", default="int", choices=ID_TYPES, help='string: ItemIDs "SKU-%%012d"')
    p.add_argument("--out", default=None, help="default: /tmp/bench/catalog_<n> (string: catalog_<n>_str)")
    p.add_argument("--force", action="store_true", help="regenerate even if present")
    a = p.parse_args()
    out = a.out or default_out(a.n, a.id_type)
    if a.force:
        generate(a.n, out, a.shards, a.dim, a.seed, a.id_type)
    else:
        ensure(a.n, out, a.shards, a.dim, a.seed, a.id_type)
    print(out)


if __name__ == "__main__":
    main()
