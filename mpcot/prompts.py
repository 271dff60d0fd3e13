"""The one place that builds what the teacher is asked: messages per (pair, perspective), and completions.

A pair is a plain dict with `query`, `title` and `attributes` (name -> text, absent ones omitted).
"""
from __future__ import annotations

import hashlib
import html
import json
import re
from typing import Any

from mpcot.labels import Label
from mpcot.perspectives import Perspective

SYSTEM_ROLE = (
    "You are an expert judge of e-commerce search relevance. You are given a shopper's search query and one "
    "product, and you decide how relevant the product is to the query."
)

_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def clean_text(text: Any, max_chars: int | None = None) -> str:
    """Plain one-line text: HTML tags and entities removed, whitespace collapsed, cut to max_chars."""
    if text is None:
        return ""
    out = _SPACE.sub(" ", html.unescape(_TAG.sub(" ", str(text)))).strip()
    if max_chars is not None and len(out) > max_chars:
        out = out[: max_chars - 1].rstrip() + "…"
    return out


def describe_pair(pair: dict, max_attribute_chars: int = 300) -> str:
    lines = [f"Query: {clean_text(pair['query'])}", f"Product title: {clean_text(pair['title'])}"]
    for name, value in (pair.get("attributes") or {}).items():
        value = clean_text(value, max_attribute_chars)
        if value:
            lines.append(f"Product {name.replace('_', ' ')}: {value}")
    return "\n".join(lines)


def label_legend(labels: list[Label]) -> str:
    return "\n".join(f"- {lab.title}: {lab.description}" if lab.description else f"- {lab.title}" for lab in labels)


def format_instruction(labels: list[Label], output_mode: str, rationale_max_chars: int) -> str:
    titles = ", ".join(lab.title for lab in labels)
    if output_mode == "json":
        return (
            'Answer with a JSON object {"rationale": "...", "label": "..."}: the rationale is your reasoning '
            f"(at most {rationale_max_chars} characters), the label is one of {titles}."
        )
    return f'Write your reasoning in a few sentences, then end with a final line "Label: <label>", where <label> is one of {titles}.'


def format_completion(rationale: str, label_title: str, output_mode: str) -> str:
    """The assistant text for a (rationale, label): what SFT trains on and few-shot examples show."""
    if output_mode == "json":
        return json.dumps({"rationale": rationale, "label": label_title}, ensure_ascii=False)
    return f"{rationale.rstrip()}\nLabel: {label_title}"


def build_messages(
    pair: dict,
    perspective: Perspective,
    labels: list[Label],
    output_mode: str = "json",
    rationale_max_chars: int = 400,
    max_attribute_chars: int = 300,
    gold: Label | None = None,
) -> list[dict[str, str]]:
    """Chat messages asking for one perspective's judgement of one pair (few-shot turns first).

    `gold`: rationalisation (STaR, SCOTT): every user turn states the correct label and asks why it holds from
    this perspective. Only distillation targets are written this way, never the student's inputs or SFT data."""
    by_key = {lab.name.lower(): lab for lab in labels} | {lab.title.lower(): lab for lab in labels}
    system = (
        f"{SYSTEM_ROLE}\n\nRelevance labels:\n{label_legend(labels)}\n\n"
        f"Perspective ({perspective.name}): {perspective.instruction}\n\n"
        f"{format_instruction(labels, output_mode, rationale_max_chars)}"
    )
    messages = [{"role": "system", "content": system}]
    for ex in perspective.examples:
        lab = by_key.get(ex.label.lower())
        if lab is None:
            raise ValueError(
                f"perspective {perspective.name!r}: few-shot label {ex.label!r} is not one of "
                f"{', '.join(x.name for x in labels)}"
            )
        shown = {"query": ex.query, "title": ex.title, "attributes": ex.attributes}
        messages.append({"role": "user", "content": describe_pair(shown, max_attribute_chars) + gold_hint(lab if gold else None)})
        messages.append({"role": "assistant", "content": format_completion(ex.rationale, lab.title, output_mode)})
    messages.append({"role": "user", "content": describe_pair(pair, max_attribute_chars) + gold_hint(gold)})
    return messages


def gold_hint(gold: Label | None) -> str:
    if gold is None:
        return ""
    return f"\n\nThe correct label is {gold.title}. Explain from this perspective why it holds."


def prompt_hash(messages: list[dict[str, str]]) -> str:
    """16 hex digits of the SHA-256 of the messages as JSON: a rationale row keeps this instead of its prompt, so a
    prompt rebuilt later (SFT, DPO) is checked to be the one the teacher was given."""
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False).encode()).hexdigest()[:16]


def render_prompt(tokenizer, messages: list[dict[str, str]], **template_kwargs) -> str:
    """Render through the model's chat template, ending where the assistant's answer starts."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **template_kwargs)


def json_regex(labels: list[Label], rationale_max_chars: int) -> str:
    """json mode's output constraint: exactly `{"rationale": "...", "label": "<title>"}`.

    A regex rather than a JSON schema: with a schema, grammar backends let a model emit unbounded whitespace
    between tokens, and small models do (a tiny random Qwen2 wrote only whitespace until max_tokens).
    The rationale excludes quotes, backslashes and control characters, so the output is always valid JSON.
    """
    titles = "|".join(re.escape(lab.title) for lab in labels)
    return r'\{"rationale": "[^"\\\x00-\x1f]{1,%d}", "label": "(%s)"\}' % (rationale_max_chars, titles)
