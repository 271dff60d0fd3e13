from pathlib import Path

import pytest

from conftest import ROOT
from workflows.config import ConfigError, load_config
from workflows.data import DataError
from workflows.stages import prepare

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert (ROOT / cfg.data.path).exists()
    assert [p.name for p in cfg.perspectives][:3] == ["user_intent", "structured_analysis", "business_rules"]


def test_unknown_key_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\ndata: {path: d.jsonl}\nteacher: {model: m}\ngeneration: {temprature: 0.5}\n")
    with pytest.raises(ConfigError, match=r"generation.temprature: unknown key"):
        load_config(f)


def test_bad_value_is_named(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: x\ndata: {path: d.jsonl, split: {train: 0.9, val: 0.2, test: 0.1}}\nteacher: {model: m}\n")
    with pytest.raises(ConfigError, match=r"data.split.*sum to 1"):
        load_config(f)


def test_set_overrides_values_and_names_bad_ones():
    cfg = load_config(ROOT / "configs" / "local.yaml", ["distill.seeds=[0, 1, 2]", "generation.max_pairs=20", "serve.port=9000"])
    assert cfg.distill.seeds == [0, 1, 2] and cfg.generation.max_pairs == 20 and cfg.serve.port == 9000
    assert load_config(ROOT / "configs" / "local.yaml").distill.seeds != [0, 1, 2]
    with pytest.raises(ConfigError, match=r"expected KEY=VALUE"):
        load_config(ROOT / "configs" / "local.yaml", ["distill.seeds"])
    with pytest.raises(ConfigError, match=r"distill.train.epochs: Input should be"):
        load_config(ROOT / "configs" / "local.yaml", ["distill.train.epochs=many"])
    with pytest.raises(ConfigError, match=r"distill.sedes: unknown key"):
        load_config(ROOT / "configs" / "local.yaml", ["distill.sedes=[1]"])


def test_fourth_perspective_added_in_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "name: x\ndata: {path: d.jsonl}\nteacher: {model: m}\nextra_perspectives:\n"
        "  - name: price_fit\n    instruction: Judge whether the price fits the query.\n"
    )
    cfg = load_config(f)
    assert [p.name for p in cfg.perspectives] == ["user_intent", "structured_analysis", "business_rules", "price_fit"]


def test_malformed_data_writes_nothing(tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"pair_id": "a", "query_id": "1", "query": "q", "product_title": "t", "label": "Z"}\n')
    f = tmp_path / "c.yaml"
    f.write_text(f"name: x\ndata: {{path: {data}}}\nteacher: {{model: m}}\n")
    run_dir = tmp_path / "run"
    with pytest.raises(DataError, match="line 1: label 'Z'"):
        prepare(load_config(f), run_dir)
    assert not run_dir.exists()


def test_cli_reports_bad_data_with_exit_code_2(tmp_path, capsys):
    from workflows.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"pair_id": "a", "query_id": "1", "query": "", "product_title": "t", "label": "E"}\n')
    f = tmp_path / "c.yaml"
    f.write_text(f"name: x\ndata: {{path: {data}}}\nteacher: {{model: m}}\n")
    assert main(["prepare", "--config", str(f), "--run-dir", str(tmp_path / "run")]) == 2
    assert "line 1: empty query" in capsys.readouterr().err
