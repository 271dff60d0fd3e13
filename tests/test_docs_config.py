"""The configuration reference (docs/config-reference.md) is generated from the config models and cannot drift
(issue 26, item 3). Fast, no Ray: imports the models only."""
from __future__ import annotations

from pathlib import Path

from bench import docs_config as dc
from workflows.config import RunConfig

ROOT = Path(__file__).resolve().parent.parent


def test_the_committed_reference_equals_the_models():
    """A field added, removed, renamed, re-typed, re-defaulted or re-described fails here until the page is
    regenerated (`python -m bench.docs_config`)."""
    assert (ROOT / "docs" / "config-reference.md").read_text() == dc.render(), \
        "docs/config-reference.md differs from the config models: run .venv/bin/python -m bench.docs_config"


def test_every_section_and_field_is_on_the_page():
    page = dc.render()
    secs = dc.sections(RunConfig)
    assert {p for p, _ in secs} >= {"", "data", "data.columns", "data.split", "labels[]", "perspectives[]", "teacher",
                                    "generation", "sft", "sft.lora", "sft.distributed", "dpo", "teacher_eval",
                                    "distill", "distill.train", "distill.score", "serve", "serve.autoscaling", "plan",
                                    "plan.throughput", "plan.assume"}
    for path, model in secs:
        section = page.split(f"## `{path}`\n" if path else "## Top level\n", 1)[1].split("\n## ", 1)[0]
        for name in model.model_fields:
            assert f"- **`{name}`** (" in section, (path, name)


def test_descriptions_types_and_defaults_come_from_the_models():
    page = dc.render()
    info = RunConfig.model_fields["serve"].annotation.model_fields["max_batch_size"]
    assert f"- **`max_batch_size`** (integer, ≥ 1; default `64`): {info.description}" in page
    # a field described only by the comment beside it in the code
    assert "- **`host`** (string; default `\"127.0.0.1\"`): bind to loopback unless told otherwise" in page
    # a field with neither: type and default only
    assert "- **`seed`** (integer; default `0`)\n" in page
    assert "- **`name`** (string; required)\n" in page


def test_a_changed_model_changes_the_page(monkeypatch):
    info = RunConfig.model_fields["serve"].annotation.model_fields["max_batch_size"]
    before = dc.render()
    monkeypatch.setattr(info, "description", "something else")
    assert dc.render() != before
