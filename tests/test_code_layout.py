"""The layout issue 26 asks for, kept: files a reader can hold (none over 400 lines, no class over 120), one module
per stage under workflows/stages/, and imports that run one way (stages -> domain packages -> hardware)."""
import ast
import importlib

import pytest

from conftest import ROOT

PACKAGES = ["workflows", "mpcot", "teacher", "student", "serve", "pairs", "hardware", "bench", "tests"]
DOMAIN = ["mpcot", "teacher", "student", "serve", "pairs", "hardware"]
MAX_FILE_LINES, MAX_CLASS_LINES = 400, 120


def _sources(packages):
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path, path.read_text()


def test_no_file_over_400_lines_and_no_class_over_120():
    too_long = []
    for path, text in _sources(PACKAGES):
        name = path.relative_to(ROOT).as_posix()
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{name}: class {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert too_long == [], "split by concern: " + "; ".join(too_long)


def test_domain_packages_never_import_workflows():
    upward = []
    for path, text in _sources(DOMAIN):
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            upward += [f"{path.relative_to(ROOT).as_posix()}: {n}" for n in names if n.split(".")[0] in ("workflows", "bench")]
    assert upward == []


@pytest.mark.parametrize("module, names", [
    ("prepare", ["prepare"]), ("generate", ["generate", "summary"]), ("teacher", ["sft", "dpo", "teacher_eval"]),
    ("targets", ["targets"]), ("students", ["distill"]), ("ablate", ["ablate"]),
    ("score", ["score_file", "evaluate_folder"]), ("report", ["write_report"]),
])
def test_each_stage_is_one_module_under_workflows_stages(module, names):
    mod = importlib.import_module(f"workflows.stages.{module}")
    assert all(callable(getattr(mod, n, None)) for n in names), (module, names)
