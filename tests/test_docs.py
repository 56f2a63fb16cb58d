"""The documentation's own rules: the README is short, shows a recorded run's figure and names only
paths that exist; measured numbers live in the READMEs, not in the library's docstrings and help."""

import pathlib
import re
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parents[1]
README_MAX_BYTES = 11_000


def test_the_readme_is_short_and_shows_a_recorded_figure_near_the_top():
    readme = ROOT / "README.md"
    assert readme.stat().st_size <= README_MAX_BYTES, readme.stat().st_size
    text = readme.read_text()
    first = re.search(r"!\[[^\]]*\]\(([^)\s]+)\)", text)
    assert first, "README.md shows no figure"
    assert first.start() < 2_000, first.start()  # on the front page, not after the reference material
    assert first.group(1).startswith("experiments/") and first.group(1).endswith(".png"), first.group(1)


def _anchors(markdown: pathlib.Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (lower case, punctuation dropped, spaces to -)."""
    headings = re.findall(r"^#+ (.+)$", markdown.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_path_and_anchor_the_readmes_name_exists():
    readmes = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted(ROOT.glob("experiments/*/README.md"))]
    missing = []
    for md in readmes:
        for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", md.read_text()):
            if urllib.parse.urlparse(target).scheme:
                continue
            path, _, anchor = target.partition("#")
            file = md.parent / path if path else md
            if not file.exists():
                missing.append(f"{md.relative_to(ROOT)}: {target}")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                missing.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert not missing, missing
    assert len(re.findall(r"\]\((?:experiments|benchmarks)/", (ROOT / "README.md").read_text())) >= 5


# Speeds, speed-ups, page faults, times and accuracies to the decimal, as measurements are written.
MEASURED = [r"\d(?:\.\d+)?(?:\s*[-–]\s*\d+(?:\.\d+)?)?\s?[x×],? (?:faster|slower)", r"\d[\d,.]*\s?(?:img|images)/s",
            r"\d[\d,]* page faults", r"\d+\.\d+ ?%", r"~?\d+(?:\.\d+)? ?(?:s|ms|min) (?:for|on|in|at)\b"]


def test_no_measured_numbers_in_the_library_docstrings_and_help():
    """Each measurement lives in benchmarks/README.md or an experiment's README; the code points there."""
    found = []
    for path in sorted((ROOT / "jaxcnn").rglob("*.py")):
        text = re.sub(r"\"\s*\n\s*f?\"", "", path.read_text())  # a help text split over string literals
        for pattern in MEASURED:
            found += [f"{path.relative_to(ROOT)}: {m.group(0)!r}" for m in re.finditer(pattern, text)]
    assert not found, found
