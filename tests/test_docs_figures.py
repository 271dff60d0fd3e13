"""Every figure README.md and the documentation pages (docs/**/*.md) quote from a docs/*.json equals the file
(issue 23, item 7; issue 26 moved most of them to docs/results.md and docs/reproducibility.md). Fast, no Ray.

The pages link their figures to the files (bench/docs_tables.py): generated blocks (tables, the benches' summary
lines) must equal what the bench's own renderer makes of the file, and every marked number in prose must equal the
file's value at its key to the decimals written. The negative checks show that a number edited by hand, in a page
or in the file, is caught."""
from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import pytest

from bench import docs_tables as dt

ROOT = Path(__file__).resolve().parent.parent
PAGES = {dt.page_name(p): p.read_text() for p in dt.pages()}
DOCS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.json"))
ALL = [(name, b) for name, text in PAGES.items() for b in dt.blocks(text)]
FIGURES = [f for name, text in PAGES.items() for f in dt.figures(text, name)]


def _page_holding(s: str) -> str:
    """The one page that holds `s` exactly once."""
    holders = [name for name, text in PAGES.items() if s in text]
    assert len(holders) == 1 and PAGES[holders[0]].count(s) == 1, (s, holders)
    return holders[0]


def test_pages_are_the_readme_and_every_docs_page():
    assert "README.md" in PAGES and "docs/results.md" in PAGES and "docs/reproducibility.md" in PAGES
    assert set(PAGES) == {"README.md"} | {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md")}


@pytest.mark.parametrize("name", sorted(PAGES))
def test_page_figures_equal_their_docs_files(name):
    assert dt.check(PAGES[name], name=name) == []


def test_the_pages_quote_the_benches_files():
    """The moved results keep their links: the tables, summaries and marked figures are still checked somewhere."""
    assert len(ALL) >= 7 and len(FIGURES) >= 15
    assert {b["file"] for _, b in ALL} >= {"docs/code_parity.json", "docs/scale.json", "docs/determinism.json",
                                            "docs/metrics_memory.json"}
    assert any(f["page"] == "README.md" for f in FIGURES)  # the README's results summary is checked too


@pytest.mark.parametrize("name", sorted(PAGES))
def test_every_docs_file_a_page_names_is_linked(name):
    """A docs/*.json a page names has its figures linked there (a block or a marker), so none is quoted unchecked."""
    text = PAGES[name]
    linked = {b["file"] for b in dt.blocks(text)} | {f["file"] for f in dt.figures(text, name)}
    named = set(re.findall(r"docs/[\w.-]+\.json", dt.BLOCK.sub(" ", text)))
    assert named <= linked, f"named in {name} without a generated block or figure marker: {sorted(named - linked)}"
    for rel in linked:
        assert (ROOT / rel).is_file(), rel


def test_the_bench_files_are_all_linked():
    linked = {b["file"] for _, b in ALL} | {f["file"] for f in FIGURES}
    for f in ("docs/code_parity.json", "docs/scale.json", "docs/scale_100k_private.json"):
        assert f in linked


def test_docs_files_have_the_layout_the_benches_write():
    """The benches write json.dumps(result, indent=2): the files are exactly that (nothing hand-formatted)."""
    for rel in DOCS:
        text = (ROOT / rel).read_text()
        data = json.loads(text)
        assert text.rstrip("\n") == json.dumps(data, indent=2), rel
    for bench in ("scale", "code_parity", "determinism"):
        assert '"--docs"' in (ROOT / "bench" / f"{bench}.py").read_text(), f"bench/{bench}.py has no --docs"


def _perturb(obj, ints: bool = False):
    """Every float of a JSON object moved by a visible amount (and ints by 7 with `ints`; seeds and sizes, which
    are also keys, stay as they are by default)."""
    if isinstance(obj, dict):
        return {k: _perturb(v, ints) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_perturb(v, ints) for v in obj]
    if isinstance(obj, bool) or not isinstance(obj, (int, float)):
        return obj
    if isinstance(obj, int):
        return obj + 7 if ints else obj
    return round(obj * 1.37 + 0.11, 4)


def test_a_changed_file_changes_every_generated_block():
    for _, b in ALL:
        data = dt.load(b["file"])
        rendered = dt.render(b["renderer"], data)
        assert dt.block_matches(b, rendered)
        if dt.block_matches(b, dt.render(b["renderer"], _perturb(copy.deepcopy(data)))):
            # a table of counts (determinism's): the floats moved change nothing, so every number moves
            assert not dt.block_matches(b, dt.render(b["renderer"], _perturb(copy.deepcopy(data), ints=True))), b


def test_a_changed_file_fails_every_marked_figure():
    for fig in FIGURES:
        data = dt.load(fig["file"])
        assert dt.figure_errors(fig, data) == []
        for key in fig["keys"]:
            path = key.partition("@")[0].split(".")
            bad = copy.deepcopy(data)
            node = bad
            for part in path[:-1]:
                node = node[int(part)] if isinstance(node, list) else node[part]
            last = int(path[-1]) if isinstance(node, list) else path[-1]
            node[last] = _perturb(node[last], ints=True)  # a list or dict (@mean, @std): all its numbers
            assert dt.figure_errors(fig, bad), (fig, key)


def test_a_number_edited_by_hand_in_a_page_fails(tmp_path):
    """Edit one figure in a generated table, one in an inline summary, one marked in prose and one marked in the
    README's summary table: each is caught, in whichever page holds it."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    table_row = "| | 1M | 628,960 | 1,590.3 | 396 (464) |"
    summary = "driver_peak_gib_at_largest 1.18`"
    prose = "1.17 GiB (1.25<!-- docs/scale_100k_private.json"
    readme_row = "segment ids) | −0.038 [−0.078, +0.005]<!--"
    for old, new in ((table_row, table_row.replace("1,590.3", "1,490.3")), (summary, summary.replace("1.18", "1.08")),
                     (prose, prose.replace("1.17", "1.12")), (readme_row, readme_row.replace("−0.038", "−0.083"))):
        name = _page_holding(old)
        errors = dt.check(PAGES[name].replace(old, new), tmp_path, name)
        assert len(errors) == 1 and errors[0].startswith(name), errors
    # and a changed file with an unchanged README
    data = json.loads((tmp_path / "docs" / "scale_100k_private.json").read_text())
    data["sizes"]["100000"]["score"]["peak_private_gib"]["score_actor"] = 0.5
    (tmp_path / "docs" / "scale_100k_private.json").write_text(json.dumps(data, indent=2))
    name = _page_holding(prose)
    errors = dt.check(PAGES[name], tmp_path, name)
    assert len(errors) == 1 and "score_actor" in errors[0], errors


@pytest.mark.parametrize("name", sorted(n for n, t in PAGES.items() if dt.blocks(t)))
def test_regenerate_restores_blocks_and_leaves_a_current_page_alone(name):
    text = PAGES[name]
    assert dt.regenerate(text) == text
    emptied = dt.BLOCK.sub(lambda m: m.group(0).replace(m.group(3), "\n\n| stale |\n\n" if "\n" in m.group(3)
                                                        else "`stale`"), text)
    assert len(dt.check(emptied)) == len(dt.blocks(text))
    again = dt.regenerate(emptied)
    assert dt.check(again) == []
    inline = [line for b in dt.blocks(again) if b["inline"] for line in b["content"].splitlines()]
    assert max(map(len, inline), default=0) <= 120


def test_figure_parsing():
    text = ("Intro 1M pairs.\n\nLRKD − vanilla is +0.024 [−0.029, +0.079]<!-- docs/x.json: d c.0 c.1 --> and "
            "1,590.3 s at 1M (0.70<!-- docs/x.json: s@neg -->).\n\nNext 437 → 464<!-- docs/x.json: a.0 a.1 -->")
    figs = dt.figures(text)
    assert [f["written"] for f in figs] == [["+0.024", "−0.029", "+0.079"], ["0.70"], ["437", "464"]]
    data = {"d": 0.0237, "c": [-0.0291, 0.0792], "s": -0.7049, "a": [437.4, 463.6]}
    assert all(dt.figure_errors(f, data) == [] for f in figs)
    assert dt.figure_errors(figs[1], {"s": -0.706})  # 0.706 is written 0.71
    assert dt.figure_errors(figs[2], {"a": [437.4]})  # a key the file lacks
    assert dt.value({"x": {"0": 1.0, "1": 3.0}}, "x@mean") == 2.0
    assert dt.value({"x": 1.0}, "x@GB") == pytest.approx(1.073741824)
    with pytest.raises(KeyError):
        dt.render("nope.table", {})


def test_determinism_renderers_read_the_bench_result():
    """docs/determinism.json (bench/determinism.py --docs) is quoted through these blocks once it exists."""
    result = {"config": "configs/smoke.yaml", "groups": {
        "prepare: splits": {"files": 3, "identical_bytes": 3, "identical_content": 3, "only_one_run": [], "differ": []},
        "students": {"files": 2, "identical_bytes": 1, "identical_content": 1, "only_one_run": [], "differ": ["a"]}}}
    text = ("x\n\n<!-- begin docs/determinism.json: determinism.table -->\n\n"
            + dt.render("determinism.table", result) + "\n\n<!-- end docs/determinism.json -->\n\nso "
            "<!-- begin docs/determinism.json: determinism.summary -->`" + dt.render("determinism.summary", result)
            + "`<!-- end docs/determinism.json -->.\n")
    assert "| students | 2 | 1 | 1 | a |" in text and "4/5 artifacts identical" in text
    bs = dt.blocks(text)
    assert [b["inline"] for b in bs] == [False, True]
    assert all(dt.block_matches(b, dt.render(b["renderer"], result)) for b in bs)
    result["groups"]["students"]["identical_content"] = 2
    assert not any(dt.block_matches(b, dt.render(b["renderer"], result)) for b in bs)
