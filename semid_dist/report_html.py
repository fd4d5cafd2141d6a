"""The quality report: one self-contained HTML page (plots as base64 PNG, no scripts, no external
assets) for one run or several side by side, from training_results.json's contents.

What it reads (every part but "mode" and "metrics" optional, and rendered as "not recorded" when
absent, so older runs and runs without a collision policy or a coherence sample still render):

    mode, config, input.items, input.dim, timings_s.total, run_id, generation.name
    metrics: collision_rate, max_bucket, distinct_ids, max_dedup_code, relative_reconstruction_error,
        levels[{level, codes_used, dead_codes, perplexity, gini}],
        group_sizes{before, after: {sizes, groups}},
        collisions{policy, rate_before, rate_after, moved, suffix_items, error_before, error_after,
                   seconds},
        coherence{sample, k, knn_same_first, knn_same_first_two, random_same_first,
                  random_same_first_two}
    training.history (tiger): the per-epoch records also drawn in training_curves.png

``semid report`` renders published runs; ``write`` puts the page next to a run's other outputs.
"""

from __future__ import annotations

import base64
import html
import math
from typing import Any

from semid_dist.config import CODES_FIELD
from semid_dist.pipeline.collisions import CollisionSummary
from semid_dist.tiger import plots

QUALITY_REPORT = "quality_report.html"

CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.4em; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: 0.4em 0 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f2f2f2; }
.runs { display: grid; gap: 1.5em; overflow-x: auto; }
.run { border: 1px solid #ddd; border-radius: 6px; padding: 0.4em 1em; min-width: 0; }
.run img { max-width: 100%; height: auto; }
.missing { color: #888; font-style: italic; }
.note { color: #555; font-size: 0.85em; }
"""


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any, spec: str = ".4f") -> str:
    """A number formatted with spec; "–" when missing or not a finite number."""
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:{spec}}" if math.isfinite(v) else "–"
    return _esc(v)


def _pct(v: Any) -> str:
    return "–" if not isinstance(v, (int, float)) or isinstance(v, bool) else f"{100 * v:.2f}%"


def _missing(what: str) -> str:
    return f'<p class="missing">{_esc(what)}: not recorded for this run</p>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    """A table of already escaped/formatted cells."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _figure(ncols: int, size: tuple[float, float]):
    plt, fig, ax = plots.figure(1, ncols, size)
    return plt, fig, ax[0]


def _png(plt, fig) -> bytes:
    return plots.png(plt, fig, dpi=90)


# --- the pieces of one run ---------------------------------------------------------------------


def _codes_per_level(r: dict) -> Any:
    c = r.get("config") or {}
    return c.get(CODES_FIELD.get(r.get("mode"), "n_clusters"))


def _collisions(r: dict, name: str) -> Any:
    """A field of the run's collision summary; None for a run from before the record existed."""
    pol = CollisionSummary.read(r)
    return getattr(pol, name) if pol else None


def _coherence(r: dict) -> dict:
    return (r.get("metrics") or {}).get("coherence") or {}


def _history(r: dict) -> list[dict]:
    for key in ("training", "fit"):
        h = (r.get(key) or {}).get("history")
        if isinstance(h, list) and h:
            return h
    return []


def _mean_gini(r: dict) -> Any:
    g = [lv.get("gini") for lv in (r.get("metrics") or {}).get("levels") or []]
    return sum(g) / len(g) if g and all(isinstance(v, (int, float)) for v in g) else None


COMPARE = [  # (row name, cell of a run)
    ("mode", lambda r: _esc(r.get("mode", "–"))),
    ("items", lambda r: _num((r.get("input") or {}).get("items"))),
    (
        "levels x codes",
        lambda r: f"{_num((r.get('config') or {}).get('n_layers'))} x {_num(_codes_per_level(r))}",
    ),
    ("collision policy", lambda r: _esc(_collisions(r, "policy") or "–")),
    ("collision rate (tokenizer codes)", lambda r: _pct(r["metrics"].get("collision_rate"))),
    ("collision rate after policy", lambda r: _pct(_collisions(r, "rate_after"))),
    ("largest group", lambda r: _num(r["metrics"].get("max_bucket"))),
    ("max dedup code", lambda r: _num(r["metrics"].get("max_dedup_code"))),
    ("relative recon. error", lambda r: _num(r["metrics"].get("relative_reconstruction_error"))),
    ("relative recon. error after policy", lambda r: _num(_collisions(r, "error_after"))),
    ("mean Gini over levels", lambda r: _num(_mean_gini(r), ".3f")),
    ("kNN share, same first code", lambda r: _pct(_coherence(r).get("knn_same_first"))),
    ("random share, same first code", lambda r: _pct(_coherence(r).get("random_same_first"))),
    ("kNN share, same first two codes", lambda r: _pct(_coherence(r).get("knn_same_first_two"))),
    ("random share, same first two codes", lambda r: _pct(_coherence(r).get("random_same_first_two"))),
    ("wall time (s)", lambda r: _num((r.get("timings_s") or {}).get("total"), ".1f")),
]


def _comparison(runs: list[dict], titles: list[str]) -> str:
    rows = [[name, *(cell(r) for r in runs)] for name, cell in COMPARE]
    return _table(["", *(_esc(t) for t in titles)], rows)


def _summary(r: dict) -> str:
    c, inp = r.get("config") or {}, r.get("input") or {}
    keys = ["data_path", "n_layers", "collision_policy", "seed", "device"]
    if r.get("mode") == "tiger":
        keys += ["n_embed", "latent_dim", "epochs", "batch_size", "learning_rate", "use_ema", "keep_model"]
    else:
        keys += ["n_clusters", "max_iters", "kmeans_fit", "beam_size", "sample_per_centroid"]
    rows = [["mode", _esc(r.get("mode", "–"))], ["items", _num(inp.get("items"))]]
    rows += [["embedding dim", _num(inp.get("dim"))]]
    rows += [[k, _num(c[k], ".4g")] for k in keys if k in c]
    for label, v in (
        ("generation", (r.get("generation") or {}).get("name")),
        ("run id", r.get("run_id")),
        ("semid_dist", r.get("semid_dist_version")),
        ("wall time (s)", (r.get("timings_s") or {}).get("total")),
    ):
        if v is not None:
            rows.append([label, _num(v, ".1f")])
    return "<h3>Run</h3>" + _table(["setting", "value"], rows)


def _levels(r: dict) -> str:
    levels = (r.get("metrics") or {}).get("levels") or []
    if not levels:
        return "<h3>Code usage per level</h3>" + _missing("per-level statistics")
    rows = [
        [
            _num(lv.get("level")),
            _num(lv.get("codes_used")),
            _num(lv.get("dead_codes")),
            _num(lv.get("perplexity"), ".1f"),
            _num(lv.get("gini"), ".3f"),
        ]
        for lv in levels
    ]
    note = (
        '<p class="note">perplexity: exp(entropy) of the code distribution (the codes in effective use); '
        "Gini: 0 when every code holds as many items, near 1 when a few codes hold them all.</p>"
    )
    table = _table(["level", "codes used", "dead codes", "perplexity", "Gini"], rows)
    return "<h3>Code usage per level</h3>" + table + note


def group_size_png(before: dict, after: dict | None) -> bytes:
    """Groups of items sharing all L codes, by size, before and after the collision policy: one
    bar slot per size that occurs (sizes can range from 1 to thousands)."""
    plt, fig, ax = _figure(1, (5.6, 3.4))
    a = ax[0]
    series = [("before policy", before)] + ([("after policy", after)] if after else [])
    sizes = sorted({s for _, h in series for s in h.get("sizes", [])})
    slot = {s: i for i, s in enumerate(sizes)}
    width = 0.8 / len(series)
    for i, (label, h) in enumerate(series):
        xs = [slot[s] + (i - (len(series) - 1) / 2) * width for s in h.get("sizes", [])]
        a.bar(xs, h.get("groups", []), width=width, label=label)
    step = max(1, math.ceil(len(sizes) / 12))
    a.set_xticks(range(0, len(sizes), step), [str(s) for s in sizes[::step]])
    a.set_yscale("log")
    a.set_ylim(bottom=0.5)  # a single group of a size still shows as a bar
    a.set_xlabel("items sharing all L codes (group size)")
    a.set_ylabel("groups")
    a.set_title("group sizes (1 = unique)")
    a.legend()
    return _png(plt, fig)


def _groups(r: dict) -> str:
    m = r.get("metrics") or {}
    out = "<h3>Collisions</h3>"
    pol = CollisionSummary.read(r)
    error_before = pol.error_before if pol and pol.error_before is not None else None
    rows = [
        ["collision rate", _pct(m.get("collision_rate")), _pct(pol.rate_after if pol else None)],
        [
            "relative recon. error",
            _num(m.get("relative_reconstruction_error") if error_before is None else error_before),
            _num(pol.error_after if pol else None),
        ],
    ]
    out += _table(["", "before policy", f"after policy ({_esc(pol.policy if pol else '–')})"], rows)
    facts = [
        f"distinct ID prefixes: {_num(m.get('distinct_ids'))}",
        f"largest group: {_num(m.get('max_bucket'))}",
        f"max dedup code: {_num(m.get('max_dedup_code'))}",
    ]
    if pol:
        facts += [
            f"items moved: {_num(pol.moved)}",
            f"items with a dedup code &gt; 0: {_num(pol.suffix_items)}",
            f"policy time: {_num(pol.seconds, '.2f')} s",
        ]
    out += f'<p class="note">{"; ".join(facts)}</p>'
    gs = m.get("group_sizes") or {}
    if gs.get("before") and gs["before"].get("sizes"):
        out += _img(group_size_png(gs["before"], gs.get("after")), "group sizes before and after the policy")
        rows = _group_rows(gs["before"], gs.get("after") or {})
        out += _table(["group size", "groups before", "groups after"], rows)
        if gs.get("source"):
            out += f'<p class="note">derived from the published {_esc(gs["source"])}</p>'
    else:
        out += _missing("group-size histogram")
    return out


def _group_rows(before: dict, after: dict) -> list[list[str]]:
    b = dict(zip(before.get("sizes", []), before.get("groups", []), strict=True))
    a = dict(zip(after.get("sizes", []), after.get("groups", []), strict=True))
    sizes = sorted(set(b) | set(a))
    return [[_num(s), _num(b.get(s, 0)), _num(a.get(s, 0)) if after else "–"] for s in sizes]


def coherence_png(c: dict) -> bytes:
    """kNN vs random pairs: the share sharing the first code and the first two codes."""
    plt, fig, ax = _figure(1, (5.0, 3.2))
    a = ax[0]
    labels = ["first code", "first two codes"]
    knn = [c.get("knn_same_first") or 0.0, c.get("knn_same_first_two") or 0.0]
    rnd = [c.get("random_same_first") or 0.0, c.get("random_same_first_two") or 0.0]
    a.bar([0 - 0.2, 1 - 0.2], [100 * v for v in knn], width=0.4, label=f"{c.get('k')} nearest neighbours")
    a.bar([0 + 0.2, 1 + 0.2], [100 * v for v in rnd], width=0.4, label="random pairs")
    a.set_xticks([0, 1], labels)
    a.set_ylabel("% of pairs sharing it")
    a.set_title(f"semantic coherence ({c.get('sample')} items)")
    a.legend()
    return _png(plt, fig)


def _coherence_html(r: dict) -> str:
    c = _coherence(r)
    out = "<h3>Semantic coherence</h3>"
    if not c:
        return out + _missing("semantic coherence")
    rows = [
        ["first code", _pct(c.get("knn_same_first")), _pct(c.get("random_same_first"))],
        ["first two codes", _pct(c.get("knn_same_first_two")), _pct(c.get("random_same_first_two"))],
    ]
    out += _table(["shared", f"{_num(c.get('k'))} nearest neighbours", "random pairs"], rows)
    out += (
        f'<p class="note">on a sample of {_num(c.get("sample"))} items: the share of each item\'s nearest '
        "neighbours (cosine) with the same leading codes, against two different items drawn at random. "
        "The larger the gap, the more the codes follow the embedding space.</p>"
    )
    if c.get("knn_same_first") is not None:
        out += _img(coherence_png(c), "semantic coherence")
    return out


def _curves(r: dict) -> str:
    if r.get("mode") != "tiger":
        return ""
    hist = _history(r)
    out = "<h3>Training curves</h3>"
    if not hist:
        return out + _missing("per-epoch history")

    try:
        png = plots.training_curves(hist)
    except (KeyError, TypeError, IndexError, ValueError) as e:  # an older or partial history
        return out + f'<p class="missing">training curves: cannot draw ({_esc(type(e).__name__)})</p>'
    kept = (r.get("training") or {}).get("kept_model") or {}
    note = f'<p class="note">published model: epoch {_num(kept.get("epoch"))}</p>' if kept else ""
    return out + _img(png, "training curves") + note


def _run(r: dict, title: str) -> str:
    parts = [_summary(r), _levels(r), _groups(r), _coherence_html(r), _curves(r)]
    return f'<div class="run"><h2>{_esc(title)}</h2>{"".join(parts)}</div>'


def _title(r: dict, i: int) -> str:
    out = r.get("output_dir") or (r.get("config") or {}).get("output_dir")
    return str(out) if out else f"run {i + 1}"


def render(results: dict | list[dict], titles: list[str] | None = None) -> str:
    """The report page for one run's results or several side by side (a comparison table
    first); titles name the runs (default: their output dirs)."""
    runs = [results] if isinstance(results, dict) else list(results)
    if not runs:
        raise ValueError("no runs to report")
    runs = [r if isinstance(r.get("metrics"), dict) else {**r, "metrics": {}} for r in runs]
    names = list(titles) if titles else []
    names += [_title(r, i) for i, r in enumerate(runs)][len(names) :]
    cols = f"grid-template-columns: repeat({len(runs)}, minmax(440px, 1fr));"
    body = [
        "<h1>Semantic ID quality report</h1>",
        "<h2>Comparison</h2>" if len(runs) > 1 else "<h2>Summary</h2>",
        _comparison(runs, names),
        f'<div class="runs" style="{cols}">',
        *(_run(r, t) for r, t in zip(runs, names, strict=True)),
        "</div>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>semid quality report: {_esc(', '.join(names))}</title>"
        f"<style>{CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write(pub, results: dict) -> None:
    """quality_report.html through a Publisher (published with the run's other files)."""
    with pub.open(QUALITY_REPORT, "w") as f:
        f.write(render(results))
