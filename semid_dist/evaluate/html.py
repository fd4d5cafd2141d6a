"""evaluation.html: one evaluation, or several side by side (``semid report``). Self-contained:
the plots are embedded PNGs (the quality report's helpers, semid_dist/report_html.py)."""

from __future__ import annotations

from semid_dist.report_html import CSS, _esc, _img, _num, _pct, _png, _table
from semid_dist.tiger import plots

NOTE = (
    "Each figure is the mean over the seeds; [a, b] is a 95% bootstrap interval over users. "
    "Differences are paired (the same resampled users for both sides): an interval that "
    "contains 0 is no difference."
)


def _ci(m: dict) -> str:
    lo, hi = m["ci95"]
    return f"{_num(m['value'])} <span class='note'>[{_num(lo)}, {_num(hi)}]</span>"


def _variants(e: dict) -> str:
    rows = []
    for d in e["variants"]:
        rows.append(
            [
                _esc(d["name"]),
                _esc(d.get("run") or d.get("what", "")),
                _esc(d.get("id_shape", "")),
                _esc(d.get("collision_policy", "")),
                _pct(d.get("collision_rate")),
                _num(d.get("relative_reconstruction_error")),
                _pct(d.get("coherence_knn_same_first")),
            ]
        )
    head = ["variant", "what", "ID", "policy", "collisions", "recon. error", "10-NN share 1st code"]
    return "<h3>Variants and their proxies</h3>" + _table(head, rows)


def _protocol(e: dict, p: str, fig: dict) -> str:
    metrics = ("recall@5", "recall@10", "ndcg@5", "ndcg@10")
    rows = [[_esc(v)] + [_ci(m[k]) for k in metrics] for v, m in fig["variants"].items()]
    out = [
        f"<h3>{_esc(p)}: {fig['targets']:,} targets, {fig['users']:,} users</h3>",
        f"<p class='note'>{_esc(fig['description'])}</p>",
        _table(["variant", "Recall@5", "Recall@10", "NDCG@5", "NDCG@10"], rows),
    ]
    diffs = [
        [_esc(d["a"]), _esc(d["b"]), _esc(d["metric"]), f"{d['diff']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"]
        for d in fig["differences"]
    ]
    if diffs:
        out.append(_table(["a", "b", "metric", "a - b [95%]"], diffs))
    cold = [c for c in fig["cold"] if c.get("targets")]
    if cold:
        head = ["training interactions of the target", "targets"] + list(fig["variants"])
        rows = [
            [_esc(c["bucket"]), f"{c['targets']:,}"] + [_ci(c["recall@10"][v]) for v in fig["variants"]]
            for c in cold
        ]
        out.append("<p>Recall@10 by how often the target item occurs in training (cold items)</p>")
        out.append(_table(head, rows))
    return "".join(out)


def recall_png(e: dict) -> bytes:
    """Recall@10 with its interval, per variant, one panel per protocol."""
    protos = list(e["protocols"].items())
    plt, fig, ax = plots.figure(1, len(protos), (5.5 * len(protos), 3.2))
    for a, (p, f) in zip(ax[0], protos, strict=True):
        names = list(f["variants"])
        vals = [f["variants"][v]["recall@10"]["value"] for v in names]
        lo = [v - f["variants"][n]["recall@10"]["ci95"][0] for v, n in zip(vals, names, strict=True)]
        hi = [f["variants"][n]["recall@10"]["ci95"][1] - v for v, n in zip(vals, names, strict=True)]
        a.barh(range(len(names)), vals, xerr=[lo, hi], color="#6a9ed8", capsize=3)
        a.set_yticks(range(len(names)), names)
        a.invert_yaxis()
        a.set_xlabel("Recall@10 (95% interval)")
        a.set_title(p)
    return _png(plt, fig)


def curves_png(e: dict) -> bytes:
    """Validation Recall@10 per epoch of every model trained, one panel per protocol."""
    models = e["training"]["models"]
    protos = list(e["protocols"])
    plt, fig, ax = plots.figure(1, len(protos), (5.5 * len(protos), 3.2))
    colors = {}
    for a, p in zip(ax[0], protos, strict=True):
        for m in (m for m in models if m["protocol"] == p):
            c = colors.setdefault(m["variant"], f"C{len(colors) % 10}")
            ep = [h["epoch"] for h in m["history"]]
            label = m["variant"] if m["seed"] == e["config"]["seed"] else None
            a.plot(ep, [h["val_recall@10"] for h in m["history"]], color=c, label=label, alpha=0.8)
        a.set_xlabel("epoch")
        a.set_ylabel("validation Recall@10")
        a.set_title(p)
        a.legend(fontsize=7)
    return _png(plt, fig)


def _one(e: dict, title: str) -> str:
    parts = [f"<h2>{_esc(title)}</h2>", f"<p class='note'>{_esc(NOTE)}</p>", _variants(e)]
    parts += [_protocol(e, p, f) for p, f in e["protocols"].items()]
    if e["protocols"]:
        parts.append(_img(recall_png(e), "Recall@10 per variant"))
    if e["training"].get("models"):
        parts.append(_img(curves_png(e), "training curves"))
    c = e["config"]
    parts.append(
        f"<p class='note'>{_esc(e['order'])}; seen items {_esc(e['seen_items'])}; "
        f"{c['seeds']} seed(s); beam {c['beam_size']}; history {c['max_history']} items; "
        f"{e['interactions']['users_dropped']:,} user(s) with fewer than 3 interactions dropped.</p>"
    )
    return f'<div class="run">{"".join(parts)}</div>'


def render(evaluations: list[dict], titles: list[str]) -> str:
    cols = f"grid-template-columns: repeat({len(evaluations)}, minmax(560px, 1fr));"
    body = [
        "<h1>Semantic IDs, judged downstream</h1>",
        f'<div class="runs" style="{cols}">',
        *(_one(e, t) for e, t in zip(evaluations, titles, strict=True)),
        "</div>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>semid evaluation: {_esc(', '.join(titles))}</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
