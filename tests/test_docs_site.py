"""The documentation site builds with `mkdocs build --strict` (a broken link, a missing anchor or a page left out
of the nav fails it), and the README stays a guide (issue 26, item 3). Fast, no Ray: CI runs this in `make test`."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _build(root: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` (never with -q: it hides the warnings strict mode counts, and nothing fails)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(site)], cwd=root, env=env, capture_output=True, text=True, timeout=300)


def _copy_site_sources(dst: Path) -> Path:
    shutil.copy(ROOT / "mkdocs.yml", dst / "mkdocs.yml")
    shutil.copy(ROOT / "README.md", dst / "README.md")  # docs/index.md includes its overview
    shutil.copytree(ROOT / "docs", dst / "docs")
    return dst


def test_the_site_builds_strict(tmp_path):
    r = _build(ROOT, tmp_path / "site")
    assert r.returncode == 0, r.stdout + r.stderr
    for page in ("index.html", "results/index.html", "reproducibility/index.html", "config-reference/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    index = (tmp_path / "site" / "index.html").read_text()
    assert 'id="the-two-commands"' in index and "pipeline proves the mechanics" in index  # the README's overview


@pytest.mark.parametrize("link, named", [("no-such-page.md", "no-such-page.md"),
                                         ("results.md#no-such-section", "no-such-section")])
def test_a_broken_link_or_anchor_fails_the_build(tmp_path, link, named):
    root = _copy_site_sources(tmp_path)
    page = root / "docs" / "design.md"
    page.write_text(page.read_text() + f"\nSee [it]({link}).\n")
    r = _build(root, tmp_path / "site")
    assert r.returncode != 0 and named in r.stdout + r.stderr, r.stdout + r.stderr


def _nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [p for item in nav for p in _nav_pages(item)]
    if isinstance(nav, dict):
        return [p for v in nav.values() for p in _nav_pages(v)]
    return []


def test_every_page_is_in_the_nav():
    cfg = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    nav = _nav_pages(cfg["nav"])
    pages = sorted(p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(nav) == pages
    assert cfg["theme"]["name"] == "material"
    assert [p if isinstance(p, str) else next(iter(p)) for p in cfg.get("plugins", [])] == ["search"]


def test_the_readme_is_a_guide():
    lines = README.splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move the detail to a page under docs/"
    for heading in ("## The two commands", "## Running a stage", "## Results", "## Documentation"):
        assert heading in lines, heading
    assert "make demo" in README and "make test " in README


def test_the_readmes_links_into_docs_resolve():
    """GitHub renders the README, not MkDocs: its links to docs/ pages (and their anchors) are checked here."""
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", README)
    assert len(links) >= 15
    for target, anchor in links:
        path = ROOT / target
        assert path.is_file(), target
        if anchor:
            slugs = {_slug(h) for h in re.findall(r"^#+ (.+)$", path.read_text(), re.M)}
            assert anchor in slugs, (target, anchor)


def _slug(heading: str) -> str:
    """Python-Markdown's toc slug (GitHub's agrees for these headings)."""
    s = re.sub(r"[^\w\s-]", "", heading.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", s)


@pytest.mark.parametrize("make_target", ["docs"])
def test_make_docs_builds_strict(make_target):
    text = (ROOT / "Makefile").read_text()
    recipe = text.split(f"\n{make_target}:", 1)[1].split("\n\n", 1)[0]
    assert "mkdocs build --strict" in recipe
