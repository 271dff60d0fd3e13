"""Model cards and `thinkbroad compare` on run folders laid out by the stage's own code: the splits by `prepare`,
tiny students saved by `LRKDStudent.save_pretrained`, test metrics by `classification_metrics`, the cards by
`write_student_cards`, metrics.json by the distill stage's `_report` (aggregates and paired bootstrap verdicts read
from the students' prediction parts) and the seeds' summary by `summarise_cards`. Only training and scoring are
replaced (by seeded predictions), so no Ray: a trained run's cards are checked in tests/test_pipeline.py."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import ROOT

SEEDS = (0, 1)


def _variants(cfg):
    from student.train import Variant

    d = cfg.distill
    return [v for s in SEEDS for v in (Variant("vanilla", "vanilla", seed=s), d.lrkd("poly", "unified", d.lam, s),
                                       d.lrkd("poly", "unified", 0.0, s))]


def _predictions(gold: np.ndarray, name: str, seed: int, accuracy: float) -> np.ndarray:
    rng = np.random.default_rng([seed, len(name)])
    return np.where(rng.random(len(gold)) < accuracy, gold, rng.integers(0, 4, len(gold)))


def build_run(run_dir, lam: float, monkeypatch) -> tuple:
    """A finished distill stage's folder (see the module doc): 3 variants x 2 seeds of tiny BERT students."""
    from transformers import AutoTokenizer

    from student.evaluate import classification_metrics
    from student.model import LRKDStudent, StudentConfig
    from workflows.cards import summarise_cards, write_student_cards
    from workflows.config import load_config
    from workflows.models import TINY_BERT, resolve_model
    from workflows.stages.prepare import prepare
    from workflows.stages.verdicts import variant_report as _report

    monkeypatch.chdir(ROOT)  # the config's data path is relative to the repository
    cfg = load_config("configs/smoke.yaml", ["distill.target_source=label_text", f"distill.lam={lam}",
                                             f"distill.seeds={list(SEEDS)}", f"name=lam{lam:g}"])
    paths = prepare(cfg, run_dir)
    codes, persp = [lab.name for lab in cfg.labels], [p.name for p in cfg.perspectives]
    test = pq.read_table(paths["test"], columns=["pair_id", "label"])
    gold = np.array([codes.index(c) for c in test.column("label").to_pylist()])
    enc = resolve_model(TINY_BERT)
    tok = AutoTokenizer.from_pretrained(enc)
    runs, entries = [], []
    for v in _variants(cfg):
        folder = run_dir / "student" / "variants" / f"{v.name}-seed{v.seed}"
        torch.manual_seed(v.seed)
        model = LRKDStudent.from_encoder(enc, StudentConfig(labels=codes, perspectives=persp, target_dim=8, poly_codes=6,
                                                            extractor="none" if v.kind == "vanilla" else "poly"))
        model.save_pretrained(folder / "best", tokenizer=tok)
        (folder / "best" / "selection.json").write_text(json.dumps({"epoch": 1, "val_macro_f1": 0.3, "val_pairs": 105}))
        (folder / "history.json").write_text(json.dumps([{"epoch": 0, "val_macro_f1": 0.2}, {"epoch": 1, "val_macro_f1": 0.3}]))
        pred = _predictions(gold, v.name, v.seed, 0.35 + 0.1 * (v.lam > 0) + lam / 4)
        (folder / "predictions" / "test").mkdir(parents=True)
        pq.write_table(pa.table({"pair_id": test.column("pair_id"), "label": [codes[i] for i in pred]}),
                       folder / "predictions" / "test" / "part-0.parquet")
        metrics = classification_metrics(gold, pred, codes, persp)
        metrics.pop("predictions")
        metrics |= {"val": {"n": 105, "accuracy": 0.4, "macro_f1": 0.3}, "extractor_params": model.extractor_parameters(),
                    "selected_epoch": 1, "ranking": {"ndcg@10": 0.8}}
        (folder / "eval.json").write_text(json.dumps(metrics))
        runs.append({"variant": v.name, "seed": v.seed, "metrics": metrics, "predictions": str(folder / "predictions" / "test")})
        entries.append((v, v.name, folder))
    write_student_cards(cfg, run_dir, entries, paths)
    report = _report(cfg, run_dir, runs)
    (run_dir / "student" / "metrics.json").write_text(json.dumps(report))
    summarise_cards(run_dir, report, "metrics.json")
    return cfg, report


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("runs")
    try:
        yield {lam: (root / f"lam{lam:g}", *build_run(root / f"lam{lam:g}", lam, mp)) for lam in (0.1, 0.3)}
    finally:
        mp.undo()


def _card(best):
    text = (best / "README.md").read_text()
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def test_every_student_folder_has_a_card_written_from_its_numbers(two_runs):
    run_dir, cfg, report = two_runs[0.1]
    train = pq.ParquetFile(run_dir / "data" / "train.parquet").metadata.num_rows
    for r in report["runs"]:
        best = run_dir / "student" / "variants" / f"{r['variant']}-seed{r['seed']}" / "best"
        meta, body = _card(best)
        assert meta["pipeline_tag"] == "text-classification" and meta["base_model"] == "tiny-random-bert"
        assert meta["datasets"] == ["esci_us_subset.jsonl"] and {"f1", "accuracy", "ndcg"} <= set(meta["metrics"])
        assert meta["license"] == "apache-2.0"
        m = r["metrics"]
        assert f"| {m['n']} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | 0.800 |" in body  # this seed's test row
        assert f"{train:,} train" in body and f"Trained on {train:,} esci_us_subset.jsonl pairs" in body
        assert "a demonstration of the pipeline, not a production model" in body
        # the seeds' summary: the variant's mean and the interval over both seeds, from metrics.json
        f1 = [x["metrics"]["macro_f1"] for x in report["runs"] if x["variant"] == r["variant"]]
        assert f"test macro-F1 {np.mean(f1):.3f} ± {np.std(f1, ddof=1):.3f}, 95% interval over seeds [" in body
        assert str(run_dir) not in body and str(ROOT) not in body  # the same run elsewhere writes the same card
        if r["variant"] == "vanilla":
            assert meta["library_name"] == "sentence-transformers" and "CrossEncoder(" in body
            assert "teacher | none: gold labels only" in body
        else:
            assert meta["library_name"] == "thinkbroad" and "Not loadable as a sentence-transformers `CrossEncoder`" in body
            assert "extractor (poly)" in body and "`perspective_scores` [batch, 3]" in body
            assert "target source | label_text" in body
    lrkd = report["verdicts"]["lrkd-poly-unified"]
    _, body = _card(run_dir / "student" / "variants" / "lrkd-poly-unified-seed1" / "best")
    assert (f"- lrkd-poly-unified vs lrkd-poly-unified-lam0: {lrkd['mean_diff']:+.3f} [{lrkd['ci95'][0]:+.3f}, "
            f"{lrkd['ci95'][1]:+.3f}]") in body and lrkd["verdict"] in body
    assert "| λ | 0.1 (guidance: l2, CE + λ · guidance) |" in body


def test_export_renders_the_card_again_with_its_parity(two_runs, capsys):
    from workflows.cli import main

    run_dir = two_runs[0.1][0]
    best = run_dir / "student" / "variants" / "lrkd-poly-unified-seed0" / "best"
    before = (best / "README.md").read_text()
    assert "Exported:" not in before
    assert main(["export", str(best)]) == 0
    after = (best / "README.md").read_text()
    assert "Exported: model.onnx (opset" in after and "model.onnx: max |logit diff|" in after
    assert after.replace(after[after.index("Exported:"):after.index("## Intended use")], "") == before  # nothing else


def test_compare_puts_the_runs_students_side_by_side(two_runs, tmp_path, capsys):
    from workflows.cli import main

    (a, _, ra), (b, _, rb) = two_runs[0.1], two_runs[0.3]
    out = tmp_path / "cmp" / "compare.md"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.strip() == out.read_text().strip()
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| lam")]
    assert [(r[0][2:], r[1]) for r in rows] == [(run, v) for run in ("lam0.1", "lam0.3")
                                                for v in ("vanilla", "lrkd-poly-unified", "lrkd-poly-unified-lam0")]
    for r, report in zip(rows, [ra] * 3 + [rb] * 3):
        agg = report["variants"][r[1]]
        assert r[2] == "2" and r[3].startswith(f"{agg['macro_f1']['mean']:.3f} ± {agg['macro_f1']['std']:.3f} [")
    lrkd = {r[0][2:]: r for r in rows if r[1] == "lrkd-poly-unified"}
    assert lrkd["lam0.1"][10] == "0.1" and lrkd["lam0.3"][10] == "0.3" and lrkd["lam0.1"][9] == "label_text"
    assert f"{ra['verdicts']['lrkd-poly-unified']['mean_diff']:+.3f}" in lrkd["lam0.1"][4]
    assert "vs lrkd-poly-unified-lam0" in lrkd["lam0.1"][4]
    assert [r[8] for r in rows if r[1] == "vanilla"] == ["none", "none"]
    png = (tmp_path / "cmp" / "compare.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and "![test macro-F1 per run and variant](compare.png)" in text


def test_compare_names_a_run_without_a_finished_student_stage(two_runs, tmp_path, capsys):
    from workflows.cli import main

    unfinished = tmp_path / "half"
    (unfinished / "data").mkdir(parents=True)
    assert main(["compare", str(two_runs[0.1][0]), str(unfinished)]) == 2
    err = capsys.readouterr().err
    assert f"{unfinished} has no finished student stage" in err and "thinkbroad distill" in err
