"""The repository stands alone: nothing refers to documents a user's clone does not have, every
document the code and docs cite is in it, and no package module outgrows one concern."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT_SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".toml", ".txt", ".json", ".cfg", ""}
MAX_MODULE_LINES = 400

# Built from pieces so that this file does not match its own patterns.
OUTSIDE = [
    re.compile("DESIGN" + r"\.md"),
    re.compile("SEED" + r"\.md"),
    re.compile(r"\.\./" + "shared"),
    re.compile(r"\bshared/" + "data"),
    re.compile(r"\b" + "issues?" + r"\s+#?\d+", re.IGNORECASE),
    re.compile(r"\b" + "issue" + r"-\d+\b", re.IGNORECASE),
]
# Repo paths cited in code and docs: semid_dist/..., docs/..., bench/..., cluster/..., jobs/...,
# tests/..., and the top-level documents.
CITED = re.compile(
    r"(?<![\w/.-])((?:semid_dist|docs|bench|cluster|jobs|tests)/[\w./-]*\.[A-Za-z]+"
    r"|(?:README|BENCHMARKS)\.md)"
)
MD_LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def tracked_text_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    files = [ROOT / p for p in out]
    return [
        f
        for f in files
        if f.is_file() and f.suffix in TEXT_SUFFIXES and f.stat().st_size < 2_000_000 and f.name != "LICENSE"
    ]


def test_nothing_refers_to_documents_outside_the_repo():
    hits = []
    for f in tracked_text_files():
        text = f.read_text(errors="replace")
        for pat in OUTSIDE:
            for m in pat.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                hits.append(f"{f.relative_to(ROOT)}:{line}: {m.group(0)!r}")
    assert not hits, "references to things a clone does not contain:\n" + "\n".join(hits)


def _exists(ref: str, base: Path) -> bool:
    ref = ref.rstrip(".,:;")
    for candidate in (ROOT / ref, base / ref):
        if candidate.exists() or any(candidate.parent.glob(candidate.name)):
            return True
    return False


def test_every_cited_repo_path_exists():
    missing = []
    for f in tracked_text_files():
        if f == Path(__file__).resolve():  # its own self-check cites a missing file on purpose
            continue
        text = f.read_text(errors="replace")
        refs = set(CITED.findall(text))
        if f.suffix == ".md":
            refs |= {r for r in MD_LINK.findall(text) if "://" not in r and not r.startswith("mailto:")}
        for ref in sorted(refs):
            if "*" in ref or "{" in ref or "<" in ref:  # patterns and placeholders, not files
                continue
            if not _exists(ref, f.parent):
                missing.append(f"{f.relative_to(ROOT)}: {ref}")
    assert not missing, "cited paths that do not exist:\n" + "\n".join(missing)


def test_the_checks_catch_what_they_look_for(tmp_path):
    """The patterns above match the references they exist to catch (and a real path resolves)."""
    samples = ["see " + "DESIGN" + ".md §6", "as in " + "issue" + " 3", "../" + "shared/seed"]
    assert all(any(p.search(s) for p in OUTSIDE) for s in samples)
    assert not any(p.search("ray-project/ray#32435, the pickle protocol") for p in OUTSIDE)
    assert CITED.findall("see semid_dist/math/kmeans.py and docs/nope.md") == [
        "semid_dist/math/kmeans.py",
        "docs/nope.md",
    ]
    assert _exists("semid_dist/math/kmeans.py", tmp_path) and not _exists("docs/nope.md", tmp_path)


def test_no_package_module_outgrows_one_concern():
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "semid_dist").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"
