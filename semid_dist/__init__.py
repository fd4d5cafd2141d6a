"""semid_dist: distributed trainer for semantic-ID tokenizers (tiger RQ-VAE, residual k-means)."""
__version__ = "0.1.0"

from semid_dist.tokenizer import Tokenizer, load_tokenizer  # noqa: E402

__all__ = ["Tokenizer", "load_tokenizer", "__version__"]
