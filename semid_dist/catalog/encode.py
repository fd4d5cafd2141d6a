"""The encode pass: every item through the tokenizer, on CPUs or on one actor per GPU.

The driver keeps ItemIDs, codes and the reconstruction-error sums (and, when asked: embedding
fingerprints for the nightly job, each item's last-level candidates for the relocate collision
policy, the embeddings of a hash sample of at most 10,000 items for the quality report), never
the N x D matrix. On CPUs the pass is fused with the read; a
kmeans tokenizer ships to the tasks as its numpy codebooks (``math/nearest_np.py``), so a
worker that only reads and encodes never imports torch. On GPUs the map is an actor pool, one
actor per GPU holding the tokenizer there; actors cannot be fused with the read. Results do not
depend on row order, sharding or the number of tasks: every row is encoded on its own, and the
driver sorts by ItemID.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from semid_dist.catalog import plumbing
from semid_dist.catalog.plumbing import flat, flat_names, guarded, lists, name_lists, total
from semid_dist.catalog.schema import Catalog, batch_names, batch_to_arrays
from semid_dist.errors import UserError

log = logging.getLogger("semid_dist")


@dataclass(frozen=True)
class Extras:
    """What the encode pass emits besides ItemIDs, codes and error sums."""

    fingerprints: bool = False  # the embeddings' 64-bit fingerprints (the nightly job)
    candidates: int = 0  # last-level candidates per item, <= codes per level (collision policy relocate)
    sample: int = 0  # up to this many items' embeddings and codes, a hash sample (the quality report)
    seed: int = 0  # of the hash sample
    n_items: int = 0  # the catalog's size, for the sample's fraction
    wide_codes: bool = False  # codes as int32 (more than 65,536 codes per level), else uint16
    strings: bool = False  # string ItemIDs: the rows carry them as such too

    def code_types(self) -> tuple[type, pa.DataType]:
        return (np.int32, pa.int32()) if self.wide_codes else (np.uint16, pa.uint16())

    @property
    def fraction(self) -> float:
        """Share of items a block keeps for the sample: a margin over sample / n_items, so
        that the driver can cut it to the `sample` smallest hashes."""
        return min(1.0, 1.2 * self.sample / max(self.n_items, 1) + 1e-4) if self.sample else 0.0


Keep = Callable[[pa.Table], pa.Table]  # what the driver keeps of a result block (plumbing.collect)

SAMPLE_SALT = 7919  # the quality sample's hash seed differs from the fit sample's


@dataclass
class EncodeResult:
    ids_N: np.ndarray  # sorted by ItemID; for string ItemIDs their ranks 0..N-1 in names
    codes_NL: np.ndarray  # rows match ids_N; uint16 (int32 above 65,536 codes per level)
    sq_err_sum: float
    sq_norm_sum: float
    fp_N: np.ndarray | None = None  # embedding fingerprints (uint64), rows match ids_N; nightly only
    sample_ids: np.ndarray | None = None  # the quality sample: ItemIDs (sorted),
    sample_x: np.ndarray | None = None  # their embeddings (float32)
    sample_codes: np.ndarray | None = None  # and their codes before the collision policy
    names: pa.Array | None = None  # string ItemIDs sorted bytewise (row i is names[i]); None: integers
    stream_order: np.ndarray | None = None  # with a keep: the result stream's row of each row

    def check_unique(self, catalog: Catalog) -> None:
        """No ItemID twice (when no scan pass checked it before)."""
        if self.names is None:
            catalog.check_unique_ids(self.ids_N)
        else:
            catalog.check_unique_names(self.names)

    def item_ids(self):
        """The ItemIDs as the outputs name them: the integers, or the strings."""
        return self.ids_N if self.names is None else self.names


def sq_norms(x_ND: np.ndarray) -> float:
    """sum ||x||^2: per row in float32 (a few hundred terms), over rows in float64."""
    return float(np.einsum("nd,nd->n", x_ND, x_ND).sum(dtype=np.float64))


@dataclass
class NumpyRQ:
    """A kmeans tokenizer as the CPU tasks get it (KmeansTokenizer.cpu_encoder): numpy codebooks
    and the beam size, so that a worker that only reads and encodes never imports torch. It
    encodes with the CPU's nearest-code backend (math/nearest.py), as Tokenizer.encode does on
    the CPU, so the two give the same codes."""

    codebooks_LKD: np.ndarray
    beam_size: int = 1

    def encode_with_error(self, x_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from semid_dist.math.nearest import backend_for

        return backend_for("cpu").quantizer(self.codebooks_LKD, self.beam_size).encode(x_ND)

    def last_level_candidates(self, x_ND: np.ndarray, codes_NL: np.ndarray, k: int):
        from semid_dist.math.relocate import last_level_candidates_np

        return last_level_candidates_np(x_ND, self.codebooks_LKD, codes_NL, k)


def encode_rows(encoder, x_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes (N, L) and squared reconstruction error per row."""
    return encoder.encode_with_error(x_ND)


def empty_encode(extras: Extras = Extras()) -> dict:
    """The columns of an encode result row with no items (what an error row carries)."""
    out = {
        "ids": lists(np.zeros(0, np.int64), pa.int64()),
        **({"names": name_lists()} if extras.strings else {}),
        "codes": lists(np.zeros(0, extras.code_types()[0]), extras.code_types()[1]),
        "sq_err": [0.0],
        "sq_norm": [0.0],
    }
    if extras.fingerprints:
        out["fp"] = lists(np.zeros(0, np.uint64), pa.uint64())
    if extras.candidates:
        out["cand"] = lists(np.zeros(0, np.uint16), pa.uint16())
        out["cand_err"] = lists(np.zeros(0, np.float32), pa.float32())
    if extras.sample:
        out["s_ids"] = lists(np.zeros(0, np.int64), pa.int64())
        out["s_x"] = lists(np.zeros(0, np.float32), pa.float32())
    return out


def encode_block(block: pa.Table, dim: int, encoder, extras: Extras = Extras()) -> dict:
    """Codes of a block's items, their squared errors and norms summed, and the extras asked
    for: the 64-bit fingerprint of every embedding (the nightly job's change detection), the
    last-level candidates of every item (relocate), the rows of the quality sample."""
    ids_N, x_ND = batch_to_arrays(block, dim)
    codes_NL, sq_err_N = encode_rows(encoder, x_ND)
    out = {
        "ids": lists(ids_N, pa.int64()),
        **({"names": name_lists(batch_names(block))} if extras.strings else {}),
        "codes": lists(np.asarray(codes_NL).astype(extras.code_types()[0]).ravel(), extras.code_types()[1]),
        "sq_err": [float(np.asarray(sq_err_N).sum(dtype=np.float64))],
        "sq_norm": [sq_norms(x_ND)],
    }
    if extras.fingerprints:
        from semid_dist.math.generations import embedding_fingerprints

        out["fp"] = lists(embedding_fingerprints(x_ND), pa.uint64())
    if extras.candidates:
        cand, err = encoder.last_level_candidates(x_ND, np.asarray(codes_NL), extras.candidates)
        out["cand"] = lists(np.asarray(cand).astype(np.uint16).ravel(), pa.uint16())
        out["cand_err"] = lists(np.asarray(err, np.float32).ravel(), pa.float32())
    if extras.sample:
        from semid_dist.math.sampling import hash_unit

        keep = hash_unit(ids_N, extras.seed + SAMPLE_SALT) < extras.fraction
        out["s_ids"] = lists(ids_N[keep], pa.int64())
        out["s_x"] = lists(np.ascontiguousarray(x_ND[keep], np.float32).ravel(), pa.float32())
    return out


def encode_result(
    t: pa.Table, n_layers: int, extras: Extras = Extras(), dim: int = 0, stream_order: bool = False
) -> EncodeResult:
    ids_N = flat(t, "ids").astype(np.int64, copy=False)
    # 2 bytes a code (uint16: Config caps the codes per level at 65,535) keep the driver small
    codes_NL = flat(t, "codes").reshape(-1, n_layers)
    names = flat_names(t) if extras.strings else None
    if names is None:
        order = np.argsort(ids_N, kind="stable")
    else:  # bytewise order; the rules that order items (dedup, relocate) then use the ranks
        order = pc.sort_indices(names).to_numpy()
        names, keys_N = names.take(order), ids_N[order]
    res = EncodeResult(
        ids_N=ids_N[order] if names is None else np.arange(len(order), dtype=np.int64),
        codes_NL=codes_NL[order],
        sq_err_sum=total(t, "sq_err"),
        sq_norm_sum=total(t, "sq_norm"),
        names=names,
    )
    if stream_order:  # rows were taken out of t by a keep (the candidates, pipeline/relocation.py)
        res.stream_order = order
    if extras.fingerprints:
        res.fp_N = flat(t, "fp").astype(np.uint64, copy=False)[order]
    if extras.sample:
        s_ids = flat(t, "s_ids").astype(np.int64, copy=False)
        s_x = flat(t, "s_x").reshape(-1, dim)
        from semid_dist.math.sampling import hash_unit

        h = hash_unit(s_ids, extras.seed + SAMPLE_SALT)
        pick = np.lexsort([s_ids, h])[: extras.sample]  # the smallest hashes
        if names is not None:  # the sample's keys -> their rows (ranks)
            by_key = np.argsort(keys_N, kind="stable")
            s_ids = by_key[np.searchsorted(keys_N[by_key], s_ids)]
        pick = pick[np.argsort(s_ids[pick])]
        res.sample_ids, res.sample_x = s_ids[pick], s_x[pick]
        res.sample_codes = res.codes_NL[np.searchsorted(res.ids_N, res.sample_ids)]
    return res


def encode_pass(
    catalog: Catalog, tokenizer, n_items: int, extras: Extras = Extras(), keep: Keep | None = None
) -> EncodeResult:
    """The encode pass over the first n_items rows on CPUs, fused with the read: codes of every
    item (and the extras asked for), sorted by ItemID. keep: what to keep of each result block
    (plumbing.collect), e.g. all but the candidates, which it takes elsewhere."""
    t = plumbing.map_catalog(
        plumbing.dataset(catalog, n_items),
        encode_block,
        empty_encode(extras),
        "encode",
        n_items,
        catalog,
        keep=keep,
        dim=catalog.dim,
        encoder=tokenizer.cpu_encoder(),
        extras=extras,
    )
    return encode_result(t, tokenizer.n_layers, extras, catalog.dim, keep is not None)


class DeviceEncoder:
    """Ray Data actor for the encode pass on an accelerator: the tokenizer (kmeans codebooks or
    the RQ-VAE) moves to the device once; each batch is encoded there in one call."""

    def __init__(self, tokenizer, dim: int, device: str, extras: Extras = Extras()):
        self.tokenizer, self.dim = tokenizer.to(device), dim
        self.encode = guarded(encode_block, empty_encode(extras))
        self.extras = extras

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.encode(batch, dim=self.dim, encoder=self.tokenizer, extras=self.extras)


def encode_device(cfg_device: str) -> tuple[str, int]:
    """Where the encode pass (and the kmeans fit) runs: ("cuda", number of GPUs in the Ray
    cluster) when --device is cuda, or auto and the cluster has GPUs; else ("cpu", 0). GPUs are
    counted in the cluster, not on the driver (under `ray job submit` the driver often runs on a
    CPU-only head)."""
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    if cfg_device == "cuda" and gpus == 0:
        raise UserError("--device cuda: the Ray cluster has no GPU")
    if cfg_device != "cpu" and gpus > 0:
        return "cuda", gpus
    return "cpu", 0


def encode_pass_on_devices(
    catalog: Catalog,
    tokenizer,
    n_items: int,
    device: str,
    actors: int,
    batch_size: int,
    extras: Extras = Extras(),
    keep: Keep | None = None,
) -> EncodeResult:
    """The encode pass with `actors` actors (one GPU each when device is cuda) that hold the
    tokenizer on the device. Not fused with the read (actors cannot be): the read tasks' blocks
    reach the actors through the object store, which GPU nodes have room for."""
    ds = plumbing.dataset(catalog, n_items, limit_cpus=False)  # every CPU reads for the GPUs
    mapped = ds.map_batches(
        DeviceEncoder,
        batch_format="pyarrow",
        batch_size=batch_size,
        fn_constructor_kwargs={
            "tokenizer": tokenizer,
            "dim": catalog.dim,
            "device": device,
            "extras": extras,
        },
        concurrency=actors,
        num_gpus=1 if device == "cuda" else 0,
    )
    log.info("encode: %d actor(s) on %s, batches of %d", actors, device, batch_size)
    t = plumbing.collect(mapped, "encode", n_items, catalog, keep)
    return encode_result(t, tokenizer.n_layers, extras, catalog.dim, keep is not None)


def encode_catalog(
    catalog: Catalog,
    tokenizer,
    n_items: int,
    where: tuple[str, int],
    batch_size: int,
    extras: Extras = Extras(),
    keep: Keep | None = None,
) -> EncodeResult:
    """The encode pass where encode_device() said: actors on the GPUs, else the fused CPU pass.
    keep: what the driver keeps of each result block (the relocate policy's CandidateSpool.take
    sends the candidates on to the object store); the result then records the stream order."""
    device, gpus = where
    extras = dataclasses.replace(extras, wide_codes=tokenizer.n_codes > 2**16, strings=catalog.string_ids)
    if device == "cuda":
        return encode_pass_on_devices(catalog, tokenizer, n_items, device, gpus, batch_size, extras, keep)
    return encode_pass(catalog, tokenizer, n_items, extras, keep)
