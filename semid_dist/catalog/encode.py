"""The encode pass: every item through the tokenizer, on CPUs or on one actor per GPU.

The driver keeps ItemIDs, codes and the reconstruction-error sums (and, for the nightly job,
embedding fingerprints), never the N x D matrix. On CPUs the pass is fused with the read; a
kmeans tokenizer ships to the tasks as its numpy codebooks (``math/nearest_np.py``), so a
worker that only reads and encodes never imports torch. On GPUs the map is an actor pool, one
actor per GPU holding the tokenizer there; actors cannot be fused with the read. Results do not
depend on row order, sharding or the number of tasks: every row is encoded on its own, and the
driver sorts by ItemID.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from semid_dist.catalog import plumbing
from semid_dist.catalog.plumbing import flat, guarded, lists, total
from semid_dist.catalog.schema import Catalog, batch_to_arrays
from semid_dist.errors import UserError

log = logging.getLogger("semid_dist")


@dataclass
class EncodeResult:
    ids_N: np.ndarray  # sorted by ItemID
    codes_NL: np.ndarray  # rows match ids_N
    sq_err_sum: float
    sq_norm_sum: float
    fp_N: np.ndarray | None = None  # embedding fingerprints (uint64), rows match ids_N; nightly only


def sq_norms(x_ND: np.ndarray) -> float:
    """sum ||x||^2: per row in float32 (a few hundred terms), over rows in float64."""
    return float(np.einsum("nd,nd->n", x_ND, x_ND).sum(dtype=np.float64))


@dataclass
class NumpyRQ:
    """A kmeans tokenizer as the CPU tasks get it: numpy codebooks and the beam size, so that a
    worker that only reads and encodes never imports torch. Its kernels are the ones
    Tokenizer.encode runs on CPU, so the two give the same codes."""

    codebooks_LKD: np.ndarray
    beam_size: int = 1

    def encode_with_error(self, x_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from semid_dist.math.beam import beam_encode_np

        return beam_encode_np(x_ND, self.codebooks_LKD, self.beam_size)


def encoder_of(tokenizer):
    """What the CPU tasks get: a kmeans tokenizer as a NumpyRQ, a tiger tokenizer as is."""
    if tokenizer.mode == "kmeans":
        books = tokenizer.codebooks_LKD.detach().cpu().float().contiguous().numpy()
        return NumpyRQ(books, tokenizer.beam_size)
    return tokenizer


def encode_rows(encoder, x_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Codes (N, L) and squared reconstruction error per row."""
    return encoder.encode_with_error(x_ND)


def empty_encode(fingerprints: bool = False) -> dict:
    """The columns of an encode result row with no items (what an error row carries)."""
    out = {
        "ids": lists(np.zeros(0, np.int64), pa.int64()),
        "codes": lists(np.zeros(0, np.int32), pa.int32()),
        "sq_err": [0.0],
        "sq_norm": [0.0],
    }
    if fingerprints:
        out["fp"] = lists(np.zeros(0, np.uint64), pa.uint64())
    return out


def encode_block(block: pa.Table, dim: int, encoder, fingerprints: bool = False) -> dict:
    """Codes of a block's items, their squared errors and norms summed, and with fingerprints
    the 64-bit fingerprint of every embedding (the nightly job's change detection)."""
    ids_N, x_ND = batch_to_arrays(block, dim)
    codes_NL, sq_err_N = encode_rows(encoder, x_ND)
    out = {
        "ids": lists(ids_N, pa.int64()),
        "codes": lists(codes_NL.astype(np.int32).ravel(), pa.int32()),
        "sq_err": [float(np.asarray(sq_err_N).sum(dtype=np.float64))],
        "sq_norm": [sq_norms(x_ND)],
    }
    if fingerprints:
        from semid_dist.math.generations import embedding_fingerprints

        out["fp"] = lists(embedding_fingerprints(x_ND), pa.uint64())
    return out


def encode_result(t: pa.Table, n_layers: int) -> EncodeResult:
    ids_N = flat(t, "ids").astype(np.int64, copy=False)
    codes_NL = flat(t, "codes").astype(np.int64).reshape(-1, n_layers)
    order = np.argsort(ids_N, kind="stable")
    fp_N = flat(t, "fp").astype(np.uint64, copy=False)[order] if "fp" in t.column_names else None
    return EncodeResult(
        ids_N=ids_N[order],
        codes_NL=codes_NL[order],
        sq_err_sum=total(t, "sq_err"),
        sq_norm_sum=total(t, "sq_norm"),
        fp_N=fp_N,
    )


def encode_pass(catalog: Catalog, tokenizer, n_items: int, fingerprints: bool = False) -> EncodeResult:
    """The encode pass over the first n_items rows on CPUs, fused with the read: codes of every
    item (and with fingerprints their embedding fingerprints), sorted by ItemID."""
    t = plumbing.map_catalog(
        plumbing.dataset(catalog, n_items),
        encode_block,
        empty_encode(fingerprints),
        "encode",
        n_items,
        catalog,
        dim=catalog.dim,
        encoder=encoder_of(tokenizer),
        fingerprints=fingerprints,
    )
    return encode_result(t, tokenizer.n_layers)


class DeviceEncoder:
    """Ray Data actor for the encode pass on an accelerator: the tokenizer (kmeans codebooks or
    the RQ-VAE) moves to the device once; each batch is encoded there in one call."""

    def __init__(self, tokenizer, dim: int, device: str, fingerprints: bool = False):
        self.tokenizer, self.dim = tokenizer.to(device), dim
        self.encode = guarded(encode_block, empty_encode(fingerprints))
        self.fingerprints = fingerprints

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.encode(batch, dim=self.dim, encoder=self.tokenizer, fingerprints=self.fingerprints)


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
    fingerprints: bool = False,
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
            "fingerprints": fingerprints,
        },
        concurrency=actors,
        num_gpus=1 if device == "cuda" else 0,
    )
    log.info("encode: %d actor(s) on %s, batches of %d", actors, device, batch_size)
    return encode_result(plumbing.collect(mapped, "encode", n_items, catalog), tokenizer.n_layers)


def encode_catalog(
    catalog: Catalog,
    tokenizer,
    n_items: int,
    where: tuple[str, int],
    batch_size: int,
    fingerprints: bool = False,
) -> EncodeResult:
    """The encode pass where encode_device() said: actors on the GPUs, else the fused CPU pass."""
    device, gpus = where
    if device == "cuda":
        return encode_pass_on_devices(catalog, tokenizer, n_items, device, gpus, batch_size, fingerprints)
    return encode_pass(catalog, tokenizer, n_items, fingerprints)
