"""The figures of README.md and the documentation pages (docs/**/*.md) from docs/*.json, the files the benches
write with --docs (issue 23, item 7; the pages since issue 26).

Two kinds of link, in README.md and every page under docs/, both checked by tests/test_docs_figures.py (the file
names in them are relative to the repository root, whichever page holds them):

- A generated block, for tables and the benches' summary lines: the text between
  `<!-- begin docs/NAME.json: RENDERER -->` and `<!-- end docs/NAME.json -->` is RENDERER's rendering of the file
  (RENDERERS below: the benches' own table() and summary()). A block whose begin marker stands alone on its line is
  compared exactly (blank lines around it aside); an inline one (inside a paragraph) holds the rendering in backticks
  and is compared with line breaks read as spaces, so the paragraph may wrap it.
- A figure marker, for numbers in prose: `<!-- docs/NAME.json: KEY [KEY ...] -->` right after the figures it names:
  the last len(KEY) numbers written before it in the same paragraph (and after any earlier marker) equal the file's
  values at those dotted keys, to the decimals written. A key may end in @neg, @abs, @GB (GiB to GB), @mean or
  @std (sample standard deviation of a list or dict of numbers).

    .venv/bin/python -m bench.docs_tables          # rewrite the pages' generated blocks from docs/*.json
    .venv/bin/python -m bench.docs_tables --check  # list every block and figure that differs from its file; exit 1
    .venv/bin/python -m bench.docs_tables --check docs/results.md   # only these pages
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def pages(root: Path = ROOT) -> list[Path]:
    """Every page whose blocks and markers are checked: README.md, then docs/**/*.md in name order."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def page_name(path: Path, root: Path = ROOT) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _renderer(module: str, fn: str, field: str | None = None) -> Callable[[dict], str]:
    """A bench's own function, imported when first used (the bench's sys.path additions undone: bench/ holds
    modules such as generation.py that must not shadow others in this process)."""
    def render(data: dict) -> str:
        import importlib

        saved = list(sys.path)
        try:
            f = getattr(importlib.import_module(f"bench.{module}"), fn)
        finally:
            sys.path[:] = saved
        return f(data[field] if field else data)
    return render


RENDERERS: dict[str, Callable[[dict], str]] = {
    "scale.table": _renderer("scale", "table"),
    "scale.summary": _renderer("scale", "summary"),
    "code_parity.table": _renderer("code_parity", "table"),
    "code_parity.summary": _renderer("code_parity", "summary"),
    "determinism.table": _renderer("determinism", "table", "groups"),
    "determinism.summary": _renderer("determinism", "summary"),
    "determinism.retrain_table": _renderer("determinism", "table", "retrain_groups"),
    "metrics_memory.summary": _renderer("metrics_memory", "summary"),
    "cv_ablation.table": _renderer("cv_ablation", "table"),
    "cv_ablation.summary": _renderer("cv_ablation", "summary"),
    "quality_parity.summary": _renderer("quality_parity", "summary"),
    "parity_noise.summary": _renderer("parity_noise", "summary"),
}

BLOCK = re.compile(r"<!-- begin (docs/[\w.-]+\.json): ([\w.]+) -->(.*?)<!-- end \1 -->", re.S)
MARKER = re.compile(r"<!-- (docs/[\w.-]+\.json): ([^>]*?) -->")
NUMBER = re.compile(r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def load(rel: str, root: Path = ROOT) -> dict:
    return json.loads((root / rel).read_text())


def _inline(text: str, start: int) -> bool:
    """Whether the block opening at `start` sits inside a line (a paragraph) rather than alone on it."""
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", start)
    line = text[line_start:line_end if line_end >= 0 else len(text)]
    return not re.fullmatch(r"\s*<!-- begin [^>]*-->\s*", line)


def _norm(s: str) -> str:
    return " ".join(s.split())


def blocks(text: str) -> list[dict]:
    """Every generated block: its file, renderer, content, span and whether it is inline."""
    return [{"file": m.group(1), "renderer": m.group(2), "content": m.group(3), "span": m.span(3),
             "inline": _inline(text, m.start())} for m in BLOCK.finditer(text)]


def render(renderer: str, data: dict) -> str:
    if renderer not in RENDERERS:
        raise KeyError(f"no renderer {renderer!r} (known: {', '.join(RENDERERS)})")
    return RENDERERS[renderer](data)


def block_matches(block: dict, rendered: str) -> bool:
    if block["inline"]:
        content = block["content"].strip()
        return content.startswith("`") and content.endswith("`") and _norm(content[1:-1]) == _norm(rendered)
    return block["content"].strip("\n") == rendered.strip("\n")


def value(data, key: str) -> float:
    """The number at a dotted key (list items by index), after an optional @transform."""
    path, _, op = key.partition("@")
    v = data
    for part in path.split("."):
        v = v[int(part)] if isinstance(v, list) else v[part]
    if op in ("mean", "std"):
        xs = list(v.values()) if isinstance(v, dict) else list(v)
        return statistics.mean(xs) if op == "mean" else statistics.stdev(xs)
    ops = {"": lambda x: x, "neg": lambda x: -x, "abs": abs, "GB": lambda x: x * 2**30 / 1e9}
    if op not in ops:
        raise KeyError(f"unknown transform @{op} in {key!r}")
    return float(ops[op](v))


def _parse(number: str) -> tuple[float, int]:
    s = number.replace("−", "-").replace(",", "")
    return float(s), len(s.split(".")[1]) if "." in s else 0


def figures(text: str, name: str = "README.md") -> list[dict]:
    """Every figure marker with the numbers written before it: file, keys, written strings, line number (and the
    page's name, for messages)."""
    out = []
    prev = 0
    for m in MARKER.finditer(text):
        para = max(text.rfind("\n\n", 0, m.start()), prev)
        before = BLOCK.sub(" ", text[para:m.start()])  # figures inside a generated block are the block's
        before = re.sub(r"<!--.*?-->", " ", before, flags=re.S)
        keys = m.group(2).split()
        nums = NUMBER.findall(before)
        out.append({"file": m.group(1), "keys": keys, "written": nums[-len(keys):] if len(nums) >= len(keys) else nums,
                    "line": text.count("\n", 0, m.start()) + 1, "page": name})
        prev = m.end()
    return out


def figure_errors(fig: dict, data: dict) -> list[str]:
    """What is wrong with one marker: too few numbers before it, a key the file lacks, or a number that differs."""
    where = f"{fig.get('page', 'README.md')}:{fig['line']} ({fig['file']})"
    if len(fig["written"]) < len(fig["keys"]):
        return [f"{where}: {len(fig['keys'])} keys but only {len(fig['written'])} numbers before the marker"]
    errors = []
    for key, written in zip(fig["keys"], fig["written"]):
        try:
            v = value(data, key)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            errors.append(f"{where}: {key}: {e!r}")
            continue
        w, decimals = _parse(written)
        if abs(w - v) > 0.5 * 10 ** -decimals + 1e-9:
            errors.append(f"{where}: {key} is {v!r} in the file, the page writes {written}")
    return errors


def check(text: str, root: Path = ROOT, name: str = "README.md") -> list[str]:
    """Every generated block and marked figure of `text` (the page `name`) that differs from its docs file (empty:
    all agree)."""
    errors = []
    for b in blocks(text):
        rendered = render(b["renderer"], load(b["file"], root))
        if not block_matches(b, rendered):
            errors.append(f"{name}: {b['file']} {b['renderer']}: the block differs from the rendering:\n{rendered}")
    for fig in figures(text, name):
        errors += figure_errors(fig, load(fig["file"], root))
    return errors


def regenerate(text: str, root: Path = ROOT, width: int = 116) -> str:
    """`text` with every generated block that differs replaced by its rendering (inline ones wrapped at `width`)."""
    for b in reversed(blocks(text)):
        rendered = render(b["renderer"], load(b["file"], root))
        if block_matches(b, rendered):
            continue
        start, end = b["span"]
        if b["inline"]:
            col = start - (text.rfind("\n", 0, start) + 1)
            new = textwrap.fill(f"`{rendered}`", width, initial_indent="x" * col, break_on_hyphens=False,
                                break_long_words=False)[col:]
        else:
            new = f"\n\n{rendered.strip()}\n\n"
        text = text[:start] + new + text[end:]
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pages", nargs="*", help="the pages to rewrite or check (default: README.md and docs/**/*.md)")
    ap.add_argument("--check", action="store_true", help="only report what differs (exit 1 if anything does)")
    args = ap.parse_args()
    paths = [Path(p) for p in args.pages] or pages()
    n_blocks = n_fig = 0
    errors = []
    for path in paths:
        name = page_name(path)
        text = path.read_text()
        if not args.check:
            new = regenerate(text)
            if new != text:
                path.write_text(new)
                print(f"docs_tables: {name} rewritten where a generated block differed from its file")
            text = new
        errors += check(text, name=name)
        n_blocks += len(blocks(text))
        n_fig += sum(len(f["keys"]) for f in figures(text, name))
    for e in errors:
        print(e)
    print(f"docs_tables: {len(paths)} pages, {n_blocks} generated blocks, {n_fig} marked figures; {len(errors)} differ")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
