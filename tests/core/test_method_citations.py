"""Code comments cite docs/METHOD.md sections that exist, in one form: docs/METHOD.md, "<heading>"
(several headings: docs/METHOD.md, "A" and "B"). A renamed or removed heading fails here."""
import re
from pathlib import Path

import ecif_core

ROOT = Path(ecif_core.__file__).parent.parent
CITING = ("ecif_core", "services", "workers", "bench")
CITATION = re.compile(r'METHOD\.md,\s+"([^"]+)"((?:\s+and\s+"[^"]+")*)')


def _headings() -> set[str]:
    text = (ROOT / "docs" / "METHOD.md").read_text(encoding="utf-8")
    return {line[3:].strip() for line in text.splitlines() if line.startswith("## ")}


def _code() -> list[Path]:
    return sorted(p for package in CITING for p in (ROOT / package).rglob("*.py"))


def test_every_cited_method_heading_exists():
    headings, cited, problems = _headings(), 0, []
    for path in _code():
        text = path.read_text(encoding="utf-8")
        for mention in re.finditer(r"METHOD\.md", text):
            line = text.count("\n", 0, mention.start()) + 1
            citation = CITATION.match(text, mention.start())
            if citation is None:
                problems.append(f"{path.relative_to(ROOT)}:{line}: cites docs/METHOD.md without a heading")
                continue
            names = [citation.group(1), *re.findall(r'"([^"]+)"', citation.group(2))]
            cited += len(names)
            problems += [f"{path.relative_to(ROOT)}:{line}: no heading {name!r} in docs/METHOD.md"
                         for name in names if " ".join(name.split()) not in headings]
    assert not problems, f"{problems}; headings are {sorted(headings)}"
    assert cited >= 20  # the math modules do cite it


def test_no_reference_to_the_math_document_outside_the_repository():
    paths = [*_code(), *(ROOT / "tests").rglob("*.py"), *(ROOT / "docs").rglob("*.md"), ROOT / "README.md"]
    stale = [str(p.relative_to(ROOT)) for p in paths if "ECIF" + "_MATH" in p.read_text(encoding="utf-8")]
    assert not stale, stale
