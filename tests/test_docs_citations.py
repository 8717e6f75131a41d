"""Citations resolve inside the repository.

Code cites the design document as ``design §N.N`` (``design.md §N.N`` in the docs); every such section
number must be a numbered heading of docs/design.md. No file may cite a document the repository does not
have: the old external spec ("spec 2.4"), the style guide ("STYLE point 4"), a path outside the
repository ("../shared") or an issue tracker entry ("issue 18") as the place where a reason is written.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
# where citations are written; benchmarks/results/ holds measurement records as they were made
SCANNED = ("src", "tests", "benchmarks", "docs", "recipes", "README.md")
SKIPPED = ("benchmarks/results/",)
SELF = Path(__file__).resolve()  # this file's examples cite on purpose
TEXT_SUFFIXES = {".py", ".md", ".sh", ".json", ".toml", ".txt", ".yaml", ".yml", ".jinja"}

_NUMBER = r"\d+(?:\.\d+)*"
# "design §2.4", "design.md §3.5", "design §2.2-§2.5", "design §3.2, §3.4", "design §1.2 and §2.2"
CITATION = re.compile(rf"\b[Dd]esign(?:\.md)? §{_NUMBER}(?:(?:-|, | and )§{_NUMBER})*")
HEADING = re.compile(rf"^#{{2,4}} ({_NUMBER})\.? ", re.MULTILINE)
FORBIDDEN = {
    "an external spec section": re.compile(r"\bspec(?: section)?\s+§?\d", re.IGNORECASE),
    "the style guide": re.compile(r"\bSTYLE\b"),
    "a path outside the repository": re.compile(r"\.\./shared|/shared/spec|qwen2\.5-1m\.md"),
    "an issue number": re.compile(r"\bissues?\s+#?\d", re.IGNORECASE),
}


def design_sections(text: str) -> set[str]:
    """The section numbers of the numbered headings of a markdown text ("## 2. X" -> "2", "### 2.4 Y" -> "2.4")."""
    return set(HEADING.findall(text))


def dangling(text: str, sections: set[str], bare_marks: bool = True) -> list[str]:
    """Every cited section number of ``text`` that is not in ``sections``, and (bare_marks) every '§' that
    is not part of a design citation (a citation in a form this test does not read would otherwise pass
    unchecked)."""
    problems, covered = [], set()
    for m in CITATION.finditer(text):
        covered.update(range(m.start(), m.end()))
        problems += [f"§{n} (in {m.group(0)!r})" for n in re.findall(rf"§({_NUMBER})", m.group(0))
                     if n not in sections]
    problems += [f"a '§' outside a design citation: {text[max(0, i - 30):i + 10]!r}"
                 for i, ch in enumerate(text) if bare_marks and ch == "§" and i not in covered]
    return problems


def forbidden(text: str) -> list[str]:
    """Citations of documents outside the repository, as (what, the matched text) descriptions."""
    return [f"{what}: {m.group(0)!r} in {text[max(0, m.start() - 30):m.end() + 20]!r}"
            for what, pattern in FORBIDDEN.items() for m in pattern.finditer(text)]


def _files() -> list[Path]:
    files = []
    for name in SCANNED:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(path.rglob("*"))
        for f in candidates:
            rel = f.relative_to(ROOT).as_posix()
            if (f.is_file() and f.suffix in TEXT_SUFFIXES and not rel.startswith(SKIPPED)
                    and "__pycache__" not in rel and f.resolve() != SELF):
                files.append(f)
    return files


def test_design_has_the_cited_kind_of_sections():
    sections = design_sections(DESIGN.read_text(encoding="utf-8"))
    # the architecture, DCA/YaRN, sparse prefill, engine, training and evaluation chapters, with subsections
    assert {"1", "2", "3", "4", "5", "6", "2.2", "2.4", "2.5", "3.4", "3.5"} <= sections


def test_every_design_citation_resolves():
    sections = design_sections(DESIGN.read_text(encoding="utf-8"))
    problems = {}
    for f in _files():
        if f == DESIGN:
            continue  # the design document's own "§" refer to the report's sections (its sources)
        # JSON is data: a tokenizer's vocabulary holds a "§" token
        found = dangling(f.read_text(encoding="utf-8"), sections, bare_marks=f.suffix != ".json")
        if found:
            problems[f.relative_to(ROOT).as_posix()] = found
    assert not problems, f"citations that docs/design.md does not have: {problems}"


def test_no_file_cites_a_document_outside_the_repository():
    problems = {}
    for f in _files():
        found = forbidden(f.read_text(encoding="utf-8"))
        if found:
            problems[f.relative_to(ROOT).as_posix()] = found
    assert not problems, f"citations of documents the repository does not have: {problems}"


def test_the_scan_sees_the_files_that_cite():
    rel = {f.relative_to(ROOT).as_posix() for f in _files()}
    assert {"src/qwen1m/attention/dca.py", "tests/attention/test_dca.py", "benchmarks/bench_sparse.py",
            "docs/results.md", "README.md"} <= rel
    assert not any(r.startswith("benchmarks/results/") for r in rel)


@pytest.mark.parametrize(
    "text, bad",
    [
        ("keys rotated at p mod s (design §2.2).", []),
        ("the ranges of design §2.2-§2.5 and design §3.2, §3.4", []),
        ("see design.md §1.2 and §2.2", []),
        ("see design §9.9", ["§9.9"]),
        ("see design §2.2-§9.1", ["§9.1"]),
        ("a bare §2.2 reference", ["outside"]),
    ],
)
def test_dangling_finds_what_does_not_resolve(text, bad):
    found = dangling(text, {"1.2", "2", "2.2", "2.5", "3.2", "3.4"})
    assert len(found) == len(bad)
    for problem, expected in zip(found, bad):
        assert expected in problem


@pytest.mark.parametrize(
    "text, n",
    [
        ("DCA position maps (spec 2.2, vLLM convention)", 1),
        ("Spec 2.4 for each sequence", 1),
        ("YaRN temperature (spec section 2).", 1),
        ("Module names are the checkpoint keys (STYLE point 7).", 1),
        ("see ../shared/spec/qwen2.5-1m.md", 2),
        ("the batched sparse path (issue #18) and issues 6 and 7", 2),
        ("from a picklable spec (the driver uses it); design §2.4; a BuildSpec 3 times", 0),
    ],
)
def test_forbidden_finds_external_citations(text, n):
    assert len(forbidden(text)) == n


LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_links_in_the_docs_resolve():
    pages = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = [f"{page.relative_to(ROOT).as_posix()}: {target}" for page in pages
              for target in LINK.findall(page.read_text(encoding="utf-8"))
              if "://" not in target and not target.startswith(("#", "mailto:"))
              and not (page.parent / target.split("#")[0]).exists()]
    assert not broken, f"links to files the repository does not have: {broken}"
