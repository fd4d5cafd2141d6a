"""PNG plots a user looks at after a TIGER run: training curves and per-level code usage."""

from __future__ import annotations

import io

import numpy as np

CURVES = "training_curves.png"
USAGE = "code_usage.png"


def figure(nrows: int, ncols: int, size: tuple[float, float]):
    """(pyplot, figure, axes (nrows x ncols)) on the Agg backend; shared with report_html."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(nrows, ncols, figsize=size, squeeze=False)


def png(plt, fig, dpi: int = 100) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def training_curves(history: list[dict]) -> bytes:
    """Loss terms and validation reconstruction per epoch; codes used, perplexity, duplicate rate
    and the reconstruction over all items for the epochs that evaluated every item."""
    plt, fig, ax = figure(2, 2, (11, 7.5))
    ep = [h["epoch"] for h in history]
    a = ax[0][0]
    for key in ("loss", "recon", "commit", "codebook"):
        vals = [h[key] for h in history]
        if any(v > 0 for v in vals):
            a.plot(ep, vals, label=key)
    a.set_yscale("log")
    a.set_title("training loss (per item, summed over dims)")
    a.set_xlabel("epoch")
    a.legend()
    a = ax[0][1]
    # catalog-wide metrics exist for the epochs that evaluated every item (--eval_every)
    cat = [h for h in history if h.get("rel_recon") is not None]
    cat_ep = [h["epoch"] for h in cat]
    a.plot(cat_ep, [h["rel_recon"] for h in cat], marker=".", label="all items")
    if any(h.get("val_rel_recon") is not None for h in history):
        a.plot(ep, [h.get("val_rel_recon") for h in history], label="validation")
    a.set_title("relative reconstruction error")
    a.set_xlabel("epoch")
    a.legend()
    a = ax[1][0]
    levels = len(cat[0]["codes_used"]) if cat else 0
    for lvl in range(levels):
        a.plot(cat_ep, [h["codes_used"][lvl] for h in cat], marker=".", label=f"level {lvl} used")
        a.plot(cat_ep, [h["perplexity"][lvl] for h in cat], ls="--", label=f"level {lvl} perplexity")
    a.set_title("codes used and perplexity per level")
    a.set_xlabel("epoch")
    a.legend(fontsize=7)
    a = ax[1][1]
    a.plot(cat_ep, [100 * h["dup_rate"] for h in cat], marker=".")
    a.set_title("duplicate rate before dedup (%)")
    a.set_xlabel("epoch")
    return png(plt, fig)


def code_usage(usage_LK: np.ndarray) -> bytes:
    """Per level: how many items each code holds, codes sorted from most to least used."""
    usage_LK = np.asarray(usage_LK)
    n_lvl, k = usage_LK.shape
    plt, fig, ax = figure(1, n_lvl, (4.2 * n_lvl, 3.6))
    for lvl in range(n_lvl):
        counts = np.sort(usage_LK[lvl])[::-1]
        a = ax[0][lvl]
        # one filled step outline, not an artist per bar: the same picture, drawn several times
        # faster than a bar chart
        a.stairs(counts, np.arange(k + 1) - 0.5, fill=True)
        a.axhline(counts.sum() / k, color="k", lw=0.8, ls="--", label="uniform")
        a.set_title(f"level {lvl}: {int((counts > 0).sum())}/{k} codes used")
        a.set_xlabel("code (sorted by usage)")
        a.set_ylabel("items")
        a.legend()
    return png(plt, fig)
