"""semid_dist: distributed trainer for semantic-ID tokenizers (tiger RQ-VAE, residual k-means)."""

__version__ = "0.1.0"

__all__ = ["Tokenizer", "load_tokenizer", "__version__"]


def __getattr__(name: str):
    """Tokenizer and load_tokenizer are imported on first use (PEP 562): they need torch, and a
    Ray worker that only reads and validates parquet (or encodes with numpy) must not pay for
    importing torch (hundreds of MB per process)."""
    if name in ("Tokenizer", "load_tokenizer"):
        from semid_dist import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'semid_dist' has no attribute {name!r}")
