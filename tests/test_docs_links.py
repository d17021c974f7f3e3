"""Every relative link and anchor in README.md and docs/*.md points at a file and heading that
exist, every docs page is in mkdocs.yml's nav, and the site's home page written from README.md
(scripts/readme_to_index.py) links only inside docs/. Pure Python: ``make docs`` is not needed."""
import importlib.util
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
GENERATED = {"index.md"}  # written by `make docs` from README.md, not committed

LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"(`+).*?\1")
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _load_readme_to_index():
    spec = importlib.util.spec_from_file_location("readme_to_index", REPO / "scripts" / "readme_to_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.readme_to_index


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks, inline code spans removed."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, CODE_SPAN.sub("", line)


def github_slug(heading: str) -> str:
    """A heading's anchor as GitHub (and MkDocs, for these headings) writes it: link syntax reduced
    to its text, lower case, punctuation dropped, each space a hyphen."""
    text = LINK.sub(lambda m: m.group(1), heading).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text; a repeated heading gets -1, -2, ... as on GitHub."""
    seen: dict[str, int] = {}
    out = set()
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        m = None if fenced else HEADING.match(line)
        if m:
            slug = github_slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """'file:line: target (why)' for each relative link of a Markdown file whose file or anchor
    does not exist; web links (scheme:...) are not followed."""
    text = path.read_text(encoding="utf-8") if text is None else text
    problems = []
    for number, line in _prose_lines(text):
        for m in LINK.finditer(line):
            target = m.group(2)
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.name}:{number}: {target}"
            if not dest.exists():
                problems.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{where} (no heading with anchor #{anchor})")
    return problems


def _pages() -> list[Path]:
    return [REPO / "README.md"] + sorted(p for p in DOCS.glob("*.md") if p.name not in GENERATED)


def _nav_files(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [f for item in nav for f in _nav_files(item)]
    if isinstance(nav, dict):
        return [f for value in nav.values() for f in _nav_files(value)]
    return []


def test_every_relative_link_and_anchor_in_readme_and_docs_exists():
    problems = [p for page in _pages() for p in broken_links(page)]
    assert problems == []


def test_the_checker_reports_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "B.md").write_text("# Title\n\n## Two words: `code`\n\n## Two words: `code`\n")
    page = tmp_path / "A.md"
    page.write_text(
        "# A\n\n[ok](B.md#two-words-code) [ok](B.md#two-words-code-1) [ok](#a) [web](https://x.org/y)\n"
        "`[in code](missing.md)`\n```\n[fenced](missing.md)\n```\n"
        "[gone](missing.md) [bad anchor](B.md#three-words) [bad own](#b)\n"
    )
    assert broken_links(page) == [
        "A.md:8: missing.md (no such file)",
        "A.md:8: B.md#three-words (no heading with anchor #three-words)",
        "A.md:8: #b (no heading with anchor #b)",
    ]


def test_github_slugs_of_headings_used_as_anchors():
    assert github_slug("The main demo: `make demo`") == "the-main-demo-make-demo"
    assert github_slug("DPO quickstart (RPO)") == "dpo-quickstart-rpo"
    assert github_slug("Agentic demo: a model that uses a tool") == "agentic-demo-a-model-that-uses-a-tool"


def test_every_docs_page_is_in_the_mkdocs_nav_and_every_nav_entry_exists():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"
    nav = _nav_files(config["nav"])
    assert len(nav) == len(set(nav)), "a page appears twice in mkdocs.yml's nav"
    pages = {p.name for p in DOCS.glob("*.md")} - GENERATED
    assert sorted(pages - set(nav)) == [], "docs pages missing from mkdocs.yml's nav"
    assert sorted(set(nav) - pages - GENERATED) == [], "nav entries with no page in docs/"
    assert "index.md" in nav


def test_readme_to_index_rewrites_links_for_the_site():
    readme_to_index = _load_readme_to_index()
    text = (
        "[a](docs/X.md#h) [b](configs/q.yaml) [c](https://e.org/p) [d](#h) ![img](docs/i.png) `[e](docs/Y.md)`\n"
        "```\n[f](docs/Z.md)\n```\n"
    )
    assert readme_to_index(text) == (
        "[a](X.md#h) b [c](https://e.org/p) [d](#h) ![img](docs/i.png) `[e](docs/Y.md)`\n```\n[f](docs/Z.md)\n```\n"
    )


def test_the_site_home_page_from_readme_links_only_to_existing_docs_pages():
    readme_to_index = _load_readme_to_index()
    home = readme_to_index((REPO / "README.md").read_text(encoding="utf-8"))
    assert broken_links(DOCS / "index.md", text=home) == []
    for _, line in _prose_lines(home):
        for m in LINK.finditer(line):
            assert "/" not in m.group(2).split("#")[0] or "://" in m.group(2), m.group(0)
