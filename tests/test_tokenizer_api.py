"""The Python API on its own: a tokenizer object, its file, and safe loading."""

import pickle

import numpy as np
import pytest
import torch

from semid_dist import Tokenizer, load_tokenizer
from semid_dist.errors import UserError
from semid_dist.math.kmeans import fit_residual_codebooks


@pytest.fixture
def kmeans_tokenizer():
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(500, 12)).astype(np.float32))
    books = fit_residual_codebooks(x, 2, 8, 5, seed=0)
    return Tokenizer("kmeans", {"mode": "kmeans"}, codebooks_LKD=torch.stack(books)), x


def test_roundtrip_through_file_is_weights_only(tmp_path, kmeans_tokenizer):
    tok, x = kmeans_tokenizer
    path = tmp_path / "final_model.pt"
    torch.save(tok.payload(), path)
    torch.load(path, weights_only=True)  # must not need pickled classes
    loaded = load_tokenizer(str(path))
    assert np.array_equal(loaded.encode(x.numpy()), tok.encode(x))
    codes, sq_err = loaded.encode_with_error(x)
    recon = loaded.decode(codes)
    np.testing.assert_allclose(sq_err, ((x.numpy() - recon) ** 2).sum(1), rtol=1e-4, atol=1e-5)
    assert loaded.n_layers == 2 and loaded.n_codes == 8 and loaded.input_dim == 12


def test_encodes_read_only_input_without_touching_it(kmeans_tokenizer):
    """The encode pass hands the tokenizer read-only views of Arrow blocks; torch must not
    be given them (it warns that writing would be undefined)."""
    import warnings

    tok, x = kmeans_tokenizer
    ro = x.numpy().copy()
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codes = tok.encode(ro)
    assert np.array_equal(codes, tok.encode(x.numpy())) and np.array_equal(ro, x.numpy())


def test_rejects_wrong_shapes_and_foreign_files(tmp_path, kmeans_tokenizer):
    tok, _ = kmeans_tokenizer
    with pytest.raises(UserError, match=r"shape \(N, 12\)"):
        tok.encode(np.zeros((3, 5), np.float32))
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing.pt"))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(UserError, match="not a semid_dist tokenizer"):
        load_tokenizer(str(foreign))


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_refuses_pickled_code(tmp_path):
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"format": "semid_dist/v1", "x": _Evil()}, f)
    with pytest.raises(UserError, match="not a loadable tokenizer file"):
        load_tokenizer(str(bad))
