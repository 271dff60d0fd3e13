import re

import pytest
from transformers import AutoTokenizer

from mpcot.perspectives import DEFAULT_PERSPECTIVES, FewShotExample, Perspective
from mpcot.prompts import build_messages, clean_text, format_completion, json_regex, render_prompt

PERSPECTIVES = [Perspective(**p) for p in DEFAULT_PERSPECTIVES]


def test_attributes_appear_only_when_present(labels):
    with_attrs = {"query": "red shoes", "title": "Nike Air", "attributes": {"brand": "Nike", "color": "red"}}
    msgs = build_messages(with_attrs, PERSPECTIVES[0], labels)
    user = msgs[-1]["content"]
    assert "Query: red shoes" in user and "Product title: Nike Air" in user
    assert "Product brand: Nike" in user and "Product color: red" in user
    bare = build_messages({"query": "red shoes", "title": "Nike Air", "attributes": {}}, PERSPECTIVES[0], labels)
    assert "brand" not in bare[-1]["content"].lower()


def test_each_perspective_instruction_and_label_set_in_system_prompt(labels):
    pair = {"query": "q", "title": "t", "attributes": {}}
    systems = [build_messages(pair, p, labels)[0]["content"] for p in PERSPECTIVES]
    assert len(set(systems)) == 3
    for p, system in zip(PERSPECTIVES, systems):
        assert p.instruction in system
        for lab in labels:
            assert lab.title in system


def test_html_is_cleaned_and_long_attributes_cut():
    assert clean_text("<b>Features</b><br> ●Fast&amp;quiet") == "Features ●Fast&quiet"
    assert len(clean_text("x" * 1000, 50)) == 50


def test_few_shot_examples_become_turns(labels):
    p = Perspective(
        name="price",
        instruction="Judge the price fit.",
        examples=[FewShotExample(query="cheap tv", title="OLED 85in", rationale="Too expensive.", label="S")],
    )
    msgs = build_messages({"query": "q", "title": "t", "attributes": {}}, p, labels, output_mode="choice")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == "Too expensive.\nLabel: Substitute"


def test_unknown_few_shot_label_is_an_error_naming_the_perspective(labels):
    p = Perspective(name="price", instruction="x", examples=[FewShotExample(query="a", title="b", rationale="c", label="Z")])
    with pytest.raises(ValueError, match="perspective 'price'.*'Z'"):
        build_messages({"query": "q", "title": "t", "attributes": {}}, p, labels)


def test_prompt_rendered_through_chat_template(labels, tiny_qwen2):
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    msgs = build_messages({"query": "red shoes", "title": "Nike Air", "attributes": {}}, PERSPECTIVES[1], labels)
    text = render_prompt(tok, msgs)
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>assistant\n")
    assert "Query: red shoes" in text


def test_json_regex_accepts_completions_and_only_known_labels(labels):
    rx = json_regex(labels, 40)
    assert re.fullmatch(rx, format_completion("Same model, same size.", "Exact", "json"))
    assert not re.fullmatch(rx, '{"rationale": "x", "label": "Perfect"}')
    assert not re.fullmatch(rx, '{"rationale": "' + "x" * 41 + '", "label": "Exact"}')
    assert not re.fullmatch(rx, '{"rationale": "say \\"hi\\"", "label": "Exact"}')
