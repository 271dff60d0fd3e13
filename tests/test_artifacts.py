"""A stage interrupted between two of its output files is redone, never reported "up to date" over mixed outputs."""
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import ROOT
from pairs import write as write_module
from workflows.stages import prepare as stages
from workflows.artifacts import MANIFEST, invalidate, write_manifest
from workflows.config import load_config
from pairs.scan import load_pairs
from pairs.splits import split_by_query


def test_interrupted_prepare_is_redone_and_no_query_is_in_two_splits(tmp_path, monkeypatch, capsys):
    smoke, esci = ROOT / "configs" / "smoke.yaml", f"data.path={ROOT / 'data' / 'esci_us_subset.jsonl'}"
    cfg, reseeded = load_config(smoke, [esci]), load_config(smoke, [esci, "data.split.seed=1"])
    run_dir, data = tmp_path / "run", tmp_path / "run" / "data"
    stages.prepare(cfg, run_dir)
    publish = write_module.publish_file

    def killed_while_writing_test(tmp, path):  # what `kill -9` during the third file leaves behind
        if Path(path).name == "test.parquet":
            assert Path(tmp).name == f".test.parquet.{os.getpid()}.tmp"
            Path(tmp).write_bytes(b"PAR1 half written")
            raise KeyboardInterrupt
        publish(tmp, path)

    monkeypatch.setattr(write_module, "publish_file", killed_while_writing_test)
    with pytest.raises(KeyboardInterrupt):
        stages.prepare(reseeded, run_dir)  # train and val now come from seed 1, test still from seed 0
    monkeypatch.undo()
    assert not (data / MANIFEST).exists()
    capsys.readouterr()
    stages.prepare(cfg, run_dir)  # back to seed 0: the old manifest must not vouch for the mixed files
    assert "up to date" not in capsys.readouterr().out
    written = {s: pq.read_table(data / f"{s}.parquet") for s in stages.SPLITS}
    queries = {s: set(t.column("query_id").to_pylist()) for s, t in written.items()}
    assert not (queries["train"] & queries["val"] or queries["train"] & queries["test"] or queries["val"] & queries["test"])
    expected = split_by_query(load_pairs(cfg.data.path, "auto", cfg.data.columns, [lab.name for lab in cfg.labels]), cfg.data.split)
    assert all(written[s].equals(expected[s]) for s in stages.SPLITS)
    assert sorted(p.name for p in data.iterdir()) == ["manifest.json", "test.parquet", "train.parquet", "val.parquet"]
    stages.prepare(cfg, run_dir)
    assert "prepare: up to date" in capsys.readouterr().out


def test_invalidate_drops_the_manifest_and_only_our_leftover_temp_files(tmp_path):
    stage = tmp_path / "mpcot"
    write_manifest(stage, "generate", "key", {}, 0.0)
    (stage / "parts").mkdir()
    leftovers = [stage / ".sft.parquet.4242.tmp", stage / "parts" / ".part-ab12cd34-00003.parquet.77.tmp"]
    kept = [stage / "parts" / "part-ab12cd34-00002.parquet", stage / "notes.tmp", stage / ".config_hash"]
    for p in leftovers + kept:
        p.write_text("x")
    invalidate(stage)
    assert not (stage / MANIFEST).exists()
    assert [p.exists() for p in leftovers] == [False, False]
    assert all(p.exists() for p in kept)


def test_a_stage_says_up_to_date_once_per_process(tmp_path, capsys):
    """Every stage checks the stages it reads, so one `thinkbroad run` checks prepare before each later stage: the
    first check of a folder says so, the others are silent, and another run folder's check still speaks."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.path={ROOT / 'data' / 'esci_us_subset.jsonl'}"])
    stages.prepare(cfg, tmp_path / "a")
    assert "up to date" not in capsys.readouterr().out  # written, not checked
    for _ in range(3):
        stages.prepare(cfg, tmp_path / "a")
    assert capsys.readouterr().out.count("prepare: up to date") == 1
    stages.prepare(cfg, tmp_path / "b")
    stages.prepare(cfg, tmp_path / "b")
    assert capsys.readouterr().out.count(f"prepare: up to date ({tmp_path / 'b' / 'data'})") == 1
