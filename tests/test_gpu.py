"""GPU checks, run by `make bench-gpu` (bench/gpu.sh) on a machine with an NVIDIA GPU; skipped
where torch sees none (CI and the 2-core development machines)."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import make_catalog, write_shards

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_residual_encode_on_the_gpu_matches_the_cpu_kernel():
    from semid_dist.math.nearest import backend_for
    from semid_dist.math.nearest_torch import TorchNearest

    rng = np.random.default_rng(0)
    x = rng.normal(size=(5000, 64)).astype(np.float32)
    books = np.stack([rng.normal(size=(32, 64)).astype(np.float32) * s for s in (1.0, 0.5, 0.25)])
    cpu, _ = backend_for("cpu").quantizer(books).encode(x)
    gpu, _ = TorchNearest("cuda").quantizer(torch.from_numpy(books).cuda()).encode(torch.from_numpy(x).cuda())
    # Float32 sums in another order may flip exact near-ties; anything more is a bug.
    assert (gpu == cpu).all(axis=1).mean() > 0.999


def test_tiger_trains_on_the_gpu_with_nccl(ray_session, tmp_path):
    from semid_dist.commands import train
    from semid_dist.config import Config

    ids, x = make_catalog(3000, 32, seed=1)
    data = str(tmp_path / "data")
    write_shards(data, ids, x, 2)
    out = str(tmp_path / "out")
    cfg = Config(
        data_path=data,
        output_dir=out,
        mode="tiger",
        epochs=3,
        batch_size=256,
        n_layers=2,
        n_embed=16,
        latent_dim=8,
        device="auto",
        num_workers=1,
    )
    results = train.run(cfg, log_dir=str(tmp_path / "logs"))
    assert results["training"]["backend"] == "nccl" and results["training"]["device"] == "cuda"
    with open(os.path.join(out, "training_results.json")) as f:
        assert json.load(f)["metrics"]["levels"][0]["codes_used"] > 1
    assert os.path.exists(os.path.join(out, "_SUCCESS"))


def test_kmeans_fits_and_encodes_on_the_gpu(ray_session, tmp_path):
    """--device auto with a GPU: the fit runs in a GPU task and the encode pass on a GPU actor.
    The published codes are what the CPU kernel gives with the same tokenizer, and the fit is
    as good as the CPU's (float32 sums in another order may flip near-ties, nothing more)."""
    from semid_dist import load_tokenizer
    from semid_dist.commands import train
    from semid_dist.config import Config

    ids, x = make_catalog(4000, 32, seed=2)
    data = str(tmp_path / "data")
    write_shards(data, ids, x, 3)
    runs = {}
    for device in ("cpu", "auto"):
        out = str(tmp_path / device)
        cfg = Config(data_path=data, output_dir=out, mode="kmeans", n_layers=2, n_clusters=16, device=device)
        runs[device] = train.run(cfg, log_dir=str(tmp_path / "logs"))
        with open(os.path.join(out, "semantic_id_mappings.json")) as f:
            runs[device]["ids"] = json.load(f)
    gpu, cpu = runs["auto"], runs["cpu"]
    assert gpu["encode"]["device"] == "cuda" and cpu["encode"]["device"] == "cpu"
    assert gpu["training"]["device"] == "cuda" and cpu["training"]["device"] == "cpu"
    tok = load_tokenizer(os.path.join(str(tmp_path / "auto"), "final_model.pt"))
    codes_cpu_kernel = tok.encode(x)
    same = np.mean([gpu["ids"][str(i)][:2] == codes_cpu_kernel[j].tolist() for j, i in enumerate(ids)])
    assert same > 0.999
    err = {d: runs[d]["metrics"]["relative_reconstruction_error"] for d in runs}
    assert err["auto"] <= err["cpu"] * 1.02, err


def test_gpu_kernels_of_kmeans_match_the_cpu_ones():
    """The GPU paths of the streamed fit, of beam search and of Tokenizer.encode on CUDA
    (faiss-gpu where installed, else torch: nearest.backend_for) against the CPU kernels on the
    same data."""
    from semid_dist.math.beam import beam_encode_np
    from semid_dist.math.nearest import backend_for
    from semid_dist.math.rq_stats import RQStats, Scales, accumulate, lloyd_update
    from semid_dist.tokenizer import Tokenizer

    rng = np.random.default_rng(4)
    x = rng.normal(size=(6000, 64)).astype(np.float32)
    books = np.stack([rng.normal(size=(48, 64)).astype(np.float32) * s for s in (1.0, 0.5, 0.25)])
    scales = Scales.for_catalog(float(np.abs(x).max()), books, len(x))
    cpu, gpu = RQStats.zeros(3, 48, 64), RQStats.zeros(3, 48, 64)
    accumulate(x, books, scales, cpu)
    accumulate(x, books, scales, gpu, backend_for("cuda").quantizer(books))
    assert (cpu.counts_LK != gpu.counts_LK).sum() <= 0.002 * cpu.counts_LK.size * 2
    np.testing.assert_allclose(lloyd_update(books, gpu, scales), lloyd_update(books, cpu, scales), atol=2e-2)
    want, _ = beam_encode_np(x, books, 4)
    got, _ = (
        backend_for("cuda").quantizer(torch.from_numpy(books).cuda(), 4).encode(torch.from_numpy(x).cuda())
    )
    assert (got == want).all(axis=1).mean() > 0.999
    tok = Tokenizer("kmeans", {}, codebooks_LKD=torch.from_numpy(books))
    on_cpu = tok.encode(x)
    assert (tok.to("cuda").encode(x) == on_cpu).all(axis=1).mean() > 0.999


def test_evaluate_trains_the_retriever_on_the_gpu(ray_session, tmp_path):
    """semid evaluate with --device auto trains on the GPU and retrieves with a beam on it."""
    import pyarrow.parquet as pq

    from semid_dist.cli import main
    from walks import write_walks

    films = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "semid_dist", "data")
    films = os.path.join(films, "wikidata_films")
    run, logs = str(tmp_path / "km"), str(tmp_path / "logs")
    km = ["--mode", "kmeans", "--n_layers", "3", "--n_clusters", "32", "--log_dir", logs]
    assert main(["--data_path", films, "--output_dir", run, *km]) == 0
    t = pq.read_table(os.path.join(films, "item_emb.parquet"))
    ids = t.column("ItemID").to_numpy()
    x = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    walks = str(tmp_path / "walks.parquet")
    write_walks(walks, ids, x, n_users=300, length=20, seed=2)
    out = str(tmp_path / "eval")
    argv = ["evaluate", "--run", run, "--interactions", walks, "--output_dir", out, "--log_dir", logs]
    assert main([*argv, "--epochs", "3", "--seeds", "1", "--device", "auto"]) == 0
    with open(os.path.join(out, "evaluation.json")) as f:
        e = json.load(f)
    assert e["training"]["device"] == "cuda"
    dense = e["protocols"]["dense"]["variants"]
    assert dense["run1"]["recall@10"]["value"] > dense["shuffled1"]["recall@10"]["value"]
