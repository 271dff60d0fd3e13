from pathlib import Path

import pytest

from conftest import ROOT, pair, write_jsonl
from workflows.config import ConfigError, load_config
from pairs.errors import DataError
from workflows.stages.prepare import prepare

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    if path.stem not in ("esci", "wands"):  # those read the official downloads (not shipped): see tests/test_layouts.py
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


def test_set_errors_name_the_argument_and_its_value():
    local = ROOT / "configs" / "local.yaml"
    with pytest.raises(ConfigError) as err:
        load_config(local, ["distill.lam=abc"])
    assert str(err.value) == (f"invalid --set value (applied to {local})\n"
                              "  --set distill.lam=abc: distill.lam: Input should be a valid number, unable to parse string as a number")
    with pytest.raises(ConfigError) as err:
        load_config(local, ["generation.max_pairs=20", "data.split={train: 0.9, val: 0.2, test: 0.1}"])
    assert str(err.value).splitlines()[1] == ("  --set data.split={train: 0.9, val: 0.2, test: 0.1}: data.split: "
                                              "Value error, train + val + test must be non-negative and sum to 1, got 1.2")


@pytest.mark.parametrize("split,message", [
    ("{train: 0.0, val: 0.99, test: 0.01}",
     "data.split (train 0, val 0.99, test 0.01) leaves train empty (train 0 pairs in 0 queries, val 992 pairs in 401 "
     "queries, test 42 pairs in 2 queries)"),
    ("{train: 0.5, val: 0.5, test: 0}",
     "data.split (train 0.5, val 0.5, test 0) leaves test empty (train 517 pairs in 204 queries, val 517 pairs in 199 "
     "queries, test 0 pairs in 0 queries)"),
])
def test_degenerate_split_is_rejected_with_counts_and_keeps_the_old_one(tmp_path, split, message):
    run_dir, esci = tmp_path / "run", ROOT / "data" / "esci_us_subset.jsonl"
    prepare(load_config(ROOT / "configs" / "smoke.yaml", [f"data.path={esci}"]), run_dir)
    before = {p.name: p.read_bytes() for p in (run_dir / "data").iterdir()}
    with pytest.raises(DataError) as err:
        prepare(load_config(ROOT / "configs" / "smoke.yaml", [f"data.path={esci}", f"data.split={split}"]), run_dir)
    assert str(err.value) == (
        f"{esci}: {message}; later stages need all three (train: generation and training, val: "
        "early stopping, test: teacher eval and student metrics): give each split a fraction above 0, e.g. "
        "0.8/0.1/0.1, and use data with at least 3 queries")
    assert {p.name: p.read_bytes() for p in (run_dir / "data").iterdir()} == before


def test_two_queries_cannot_fill_three_splits(tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", [pair(i) for i in range(4)])
    f = tmp_path / "c.yaml"
    f.write_text(f"name: x\ndata: {{path: {data}}}\nteacher: {{model: m}}\n")
    with pytest.raises(DataError, match=r"leaves (val|test) empty \(train 2 pairs in 1 queries, .*0 pairs in 0 queries"):
        prepare(load_config(f), tmp_path / "run")
    assert not (tmp_path / "run").exists()


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


OVERLOADED = ("The current node timed out during startup. This could happen because some of the raylet failed to "
              "startup or the GCS has become overloaded.")


@pytest.mark.parametrize("address,error,message", [
    # what ray._private.node raises when the machine is too busy to start Ray's processes
    (None, Exception(OVERLOADED),
     f"Ray could not start on this machine ({OVERLOADED}); this happens when memory or CPU is short or other Ray "
     "instances are running: stop them (`ray stop` stops the ones you started), free memory, then run the same command "
     "again (finished work is kept)"),
    ("10.0.0.5:6379", ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379"),
     "could not connect to the Ray cluster at 10.0.0.5:6379 (Failed to connect to Ray cluster at 10.0.0.5:6379); check "
     "that it is up (`ray status --address 10.0.0.5:6379`) and that RAY_ADDRESS and RAY_AUTH_TOKEN are right, then run "
     "the same command again"),
])
def test_cli_reports_a_ray_start_failure_in_one_line(tmp_path, monkeypatch, capsys, address, error, message):
    import ray

    from workflows.cli import main

    def fail(**kwargs):
        raise error

    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fail)
    assert main(["generate", "--config", str(ROOT / "configs" / "smoke.yaml"), "--run-dir", str(tmp_path / "run"),
                 "--set", f"data.path={ROOT / 'data' / 'esci_us_subset.jsonl'}"]) == 2
    assert capsys.readouterr().err == f"thinkbroad: error: {message}\n"
    assert (tmp_path / "run" / "data" / "manifest.json").exists()
