"""Benchmark: is the vanilla student a sound fine-tune, and does its Ray Data ingest cost anything? The same
backbone, split, batch, max length and cores, trained two ways over the same seeds: HF
`AutoModelForSequenceClassification` with the library's `Trainer` (linear warm-up and decay, best epoch on validation
macro-F1; one process on every core, the global batch), and thinkbroad's vanilla cross-encoder (lambda = 0, no
extractor) on Ray Train fed by Ray Data (its workers, their per-worker batch). Test macro-F1 of each, the paired
difference with a bootstrap interval, and training pairs/s of each (epochs x train pairs over the training time,
per-epoch validation included on both sides). Goals: vanilla within 0.02 of the library; ours >= 0.9x its pairs/s.

    .venv/bin/python bench/quality_parity.py [--config configs/local.yaml] [--seeds 0 1 2] [--lr LR] [--epochs N]
        [--folds K] [--docs] [--cache DIR|none] [--pool]

The library side gets the student's recipe (`--recipe student`): its optimizer groups and its early stopping
(`patience`, the library's `EarlyStoppingCallback`). The library runs are cached in bench/results/library_cache by
their inputs (they do not depend on this project's code); the vanilla side always trains. With `--pool`, each seed's
predictions are stored in bench/results/quality_parity_runs under a key of the settings, folds, pairs and a hash of
the code, and the verdict pools every stored seed of that key: seeds added in a later session cost only themselves.

Writes bench/results/quality_parity.json (and docs/quality_parity.json with --docs: the README's summary line is
rendered from it by `python -m bench.docs_tables`) and prints one summary line.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def library_finetune(encoder: str, train: dict, val: dict, test: dict, codes: list[str], seed: int, epochs: int,
                     lr: float, batch_size: int, max_length: int, out: Path, head_lr: float | None = None,
                     weight_decay: float = 0.01, patience: int | None = None) -> dict:
    """The library's recipe: Trainer, AdamW, linear warm-up (10%) and decay, one evaluation per epoch, the best epoch
    on validation macro-F1 restored at the end. With `head_lr`, the student's optimizer groups: the newly drawn
    classifier at `head_lr`, the pretrained encoder at `lr`, decay on every parameter (Trainer's own recipe, one
    rate and no decay on biases and LayerNorm, otherwise). With `patience`, the library's `EarlyStoppingCallback`:
    training stops after that many epochs without a better validation macro-F1, as the student's does."""
    import torch
    from datasets import Dataset
    from sklearn.metrics import f1_score
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                              EarlyStoppingCallback, Trainer, TrainingArguments)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    tok = AutoTokenizer.from_pretrained(encoder)

    def dataset(d: dict) -> Dataset:
        enc = tok(d["query"], d["product"], truncation="longest_first", max_length=max_length)
        return Dataset.from_dict({**enc, "labels": list(d["label"])})

    def macro_f1(p):
        return {"macro_f1": f1_score(p.label_ids, p.predictions.argmax(-1), average="macro", labels=list(range(len(codes))), zero_division=0)}

    from transformers import set_seed

    # the new classification head is drawn from the global generator: seed it first (Trainer seeds only later, so
    # the head depended on whatever ran before in this process: seed 0 of fold 0 gave 0.256, then 0.184)
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=len(codes), use_safetensors=True)
    train_set, val_set, test_set = dataset(train), dataset(val), dataset(test)
    args = TrainingArguments(
        output_dir=str(out), seed=seed, num_train_epochs=epochs, learning_rate=lr, warmup_steps=0.1,
        lr_scheduler_type="linear", weight_decay=0.01, per_device_train_batch_size=batch_size, per_device_eval_batch_size=64,
        eval_strategy="epoch", save_strategy="epoch", load_best_model_at_end=True, metric_for_best_model="macro_f1",
        save_total_limit=1, report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no",
    )
    optimizers = (None, None)
    if head_lr is not None:  # the Trainer builds its linear warm-up schedule over these groups' own peaks
        head = {id(p) for p in model.classifier.parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) not in head], "lr": lr},
                  {"params": list(model.classifier.parameters()), "lr": head_lr}]
        optimizers = (torch.optim.AdamW(groups, weight_decay=weight_decay), None)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=val_set,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=macro_f1, optimizers=optimizers,
                      callbacks=[EarlyStoppingCallback(early_stopping_patience=patience)] if patience else None)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    pred = trainer.predict(test_set).predictions.argmax(-1)
    gold = np.asarray(test["label"])
    shutil.rmtree(out, ignore_errors=True)
    return {"macro_f1": float(f1_score(gold, pred, average="macro", labels=list(range(len(codes))), zero_division=0)),
            "predictions": pred.tolist(), "pairs_per_s": len(train["label"]) * epochs / seconds}


def cached_library(cache: Path | None, parts: dict, run) -> dict:
    """The library run's result from `cache` when one was made from the same inputs (the fold's pairs, the seed, the
    recipe, this function's source, the library versions), else `run()`, stored there. Only the library side is
    cached: it does not depend on this project's code, which the vanilla side measures. A cached result is marked
    (its pairs/s come from the run that made it)."""
    import hashlib
    import inspect

    import torch
    import transformers

    if cache is None:
        return run()
    parts = parts | {"source": inspect.getsource(library_finetune), "transformers": transformers.__version__,
                     "torch": torch.__version__}
    path = cache / (hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20] + ".json")
    if path.exists():
        return json.loads(path.read_text()) | {"cached": True}
    out = run()
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out))
    return out


def code_fingerprint() -> str:
    """A hash of the Python sources the vanilla side trains and scores with (the packages student, pairs, hardware
    and the prepare and score stages, tracked files read from the work tree, so uncommitted edits count): seeds
    trained by other code are never pooled with this code's."""
    import hashlib
    import subprocess

    paths = ["student", "pairs", "hardware", "workflows/stages/prepare.py", "workflows/stages/score.py"]
    files = subprocess.run(["git", "ls-files", *paths], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    h = hashlib.sha256()
    for f in sorted(f for f in files if f.endswith(".py")):
        h.update(f.encode() + b"\0" + (ROOT / f).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def pooled_runs(store: Path, key: dict, runs: dict[int, dict]) -> dict[int, dict]:
    """This run's per-seed predictions (`runs`: seed -> library and vanilla predictions and per-fold macro-F1) added to
    `store`'s file for `key` (the settings, folds, recipe, pairs and code fingerprint), and every seed stored there
    returned: a later session adds seeds to the same comparison, paying only for the new ones. A seed trained again
    replaces its stored run (the same inputs give the same predictions: the stream is deterministic)."""
    import hashlib

    path = store / (hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20] + ".json")
    stored = {int(s): r for s, r in json.loads(path.read_text())["runs"].items()} if path.exists() else {}
    stored.update(runs)
    store.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "runs": {str(s): r for s, r in sorted(stored.items())}}))
    return dict(sorted(stored.items()))


def _plain_examples(split_paths: dict, out: Path, codes: list[str], persp: list[str]):
    """The plain examples (pairs only) of a split's train and val files, as the vanilla student streams them."""
    from student.examples import PROBE, SUMMARY, examples_summary, write_examples
    from student.train import TrainData

    write_examples({s: split_paths[s] for s in ("train", "val")}, out, codes, persp, targets=False)
    summary = examples_summary(out / "train", codes, persp, 32)
    assert (out / f"train.{SUMMARY}").exists()
    return TrainData(train=str(out / "train"), val=str(out / "val"), centroids=[[0.0]] * len(persp),
                       label_counts=summary["label_counts"], rows=summary["rows"], target_dim=1,
                       probe=str(out / f"train.{PROBE}"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/local.yaml")
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=None, help="the library run's learning rate (default: the student's, "
                    "distill.train.learning_rate)")
    ap.add_argument("--epochs", type=int, default=None, help="both runs (default: distill.train.epochs)")
    ap.add_argument("--recipe", choices=["student", "single_lr"], default="student", help="the library run's optimizer: "
                    "the student's groups (classifier at distill.train.head_learning_rate, decay on all; the same "
                    "hyperparameters, so a difference is the implementation's) or the Trainer's default (one rate)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--folds", type=int, default=1, help="k-fold cross-validation by query over all labelled pairs "
                    "(each pair a test pair once); 1 = the run's test split")
    ap.add_argument("--docs", action="store_true", help="also write docs/quality_parity.json (the README's figures)")
    ap.add_argument("--pool", action="store_true", help="pool these seeds with the seeds earlier runs of the same "
                    "comparison stored in bench/results/quality_parity_runs (same settings, folds, pairs and code)")
    ap.add_argument("--cache", default=str(ROOT / "bench" / "results" / "library_cache"),
                    help="reuse the library runs made from the same inputs (more seeds later cost only the new ones); "
                    "'none' retrains them")
    args = ap.parse_args()

    import pyarrow.parquet as pq

    from student.data import pair_rows
    from student.evaluate import macro_f1_fast, paired_bootstrap
    from student.train import Variant, train_student
    from workflows.config import load_config
    from workflows.models import resolve_model
    from hardware.runtime import ensure_ray
    from pairs.folds import pooled_gold, write_folds
    from workflows.stages.common import run_dir_for
    from workflows.stages.prepare import prepare
    from workflows.stages.score import score_split

    cfg = load_config(args.config, args.overrides)
    code = code_fingerprint()  # the code that trains, read before it does (an edit during the run is not it)
    run_dir = run_dir_for(cfg, args.run_dir)
    settings = cfg.distill.train
    if args.epochs:
        settings = settings.model_copy(update={"epochs": args.epochs})
    lr = args.lr or settings.learning_rate
    codes, persp = [lab.name for lab in cfg.labels], [p.name for p in cfg.perspectives]
    paths = prepare(cfg, run_dir)
    encoder = resolve_model(cfg.distill.backbone)
    work = run_dir / "bench_quality_parity"
    shutil.rmtree(work, ignore_errors=True)
    ensure_ray()
    # the split once, or k folds by query (every pair a test pair once; folds x seeds pooled in the verdict)
    folds = [paths] if args.folds < 2 else write_folds(paths, args.folds, cfg.seed, work / "cv")
    lib, ours = {s: {"predictions": [], "f1": []} for s in args.seeds}, {s: {"predictions": [], "f1": []} for s in args.seeds}
    speed, cached = {"library": [], "vanilla": []}, 0
    t0 = time.time()
    for f, fp in enumerate(folds):
        data = {s: pair_rows(pq.read_table(fp[s]), codes).to_pydict() for s in ("train", "val", "test")}
        examples = _plain_examples(fp, work / f"examples-{f}", codes, persp)  # what every vanilla student streams
        for seed in args.seeds:
            # the student's recipe: its optimizer groups and its early stopping (the Trainer's default: neither)
            head_lr = settings.head_learning_rate if args.recipe == "student" else None
            patience = settings.patience if args.recipe == "student" else None
            lr_run = cached_library(
                None if args.cache == "none" else Path(args.cache),
                {"encoder": str(encoder), "data": data, "codes": codes, "seed": seed, "epochs": settings.epochs, "lr": lr,
                 "batch": settings.batch_size * settings.num_workers, "max_length": settings.max_length,
                 "head_lr": head_lr, "weight_decay": settings.weight_decay, "patience": patience},
                lambda: library_finetune(encoder, data["train"], data["val"], data["test"], codes, seed, settings.epochs, lr,
                                         settings.batch_size * settings.num_workers, settings.max_length,
                                         work / f"hf-{f}-{seed}", head_lr=head_lr, weight_decay=settings.weight_decay,
                                         patience=patience))
            cached += bool(lr_run.get("cached"))
            out = work / f"vanilla-{f}-{seed}"
            history = train_student(Variant("vanilla", "vanilla", seed=seed), settings, examples, encoder, codes, persp, out)
            m = score_split(cfg, out / "best", fp["test"], out / "predictions", order=fp["test"])
            lib[seed]["predictions"] += lr_run["predictions"]
            ours[seed]["predictions"] += m["predictions"]
            lib[seed]["f1"].append(lr_run["macro_f1"])
            ours[seed]["f1"].append(m["macro_f1"])
            speed["library"].append(lr_run["pairs_per_s"])
            speed["vanilla"].append(sum(h["train_pairs"] for h in history) / sum(h["seconds"] for h in history))
            print(f"fold {f}, seed {seed}: library {lr_run['macro_f1']:.3f} ({lr_run['pairs_per_s']:.1f} pairs/s), vanilla "
                  f"{m['macro_f1']:.3f} ({speed['vanilla'][-1]:.1f} pairs/s)", flush=True)
    ids, gold = pooled_gold(folds, codes)
    runs = {s: {"library": lib[s], "vanilla": ours[s]} for s in args.seeds}
    if args.pool:
        key = {"backbone": cfg.distill.backbone, "seed": cfg.seed, "settings": settings.model_dump(), "lr": lr, "recipe": args.recipe,
               "folds": len(folds), "pairs": ids, "gold": gold, "code": code}
        runs = pooled_runs(ROOT / "bench" / "results" / "quality_parity_runs", key, runs)
        lib, ours = {s: r["library"] for s, r in runs.items()}, {s: r["vanilla"] for s, r in runs.items()}
    pooled = lambda rs: {s: float(macro_f1_fast(np.asarray([gold]), np.asarray([r["predictions"]]), len(codes))[0])  # noqa: E731
                         for s, r in rs.items()}
    lib = {s: {"macro_f1": v, "predictions": lib[s]["predictions"], "folds": lib[s]["f1"]} for s, v in pooled(lib).items()}
    ours = {s: {"macro_f1": v, "predictions": ours[s]["predictions"], "folds": ours[s]["f1"]} for s, v in pooled(ours).items()}
    paired = paired_bootstrap(gold, {s: r["predictions"] for s, r in ours.items()}, {s: r["predictions"] for s, r in lib.items()},
                              len(codes), margin=cfg.distill.equivalence_margin)
    stat = lambda rs: (float(np.mean([r["macro_f1"] for r in rs.values()])), float(np.std([r["macro_f1"] for r in rs.values()], ddof=1)) if len(rs) > 1 else 0.0)  # noqa: E731
    from hardware.cpu import cpu_info

    cpu = cpu_info().model
    result = {
        "cpu": cpu, "config": args.config, "backbone": cfg.distill.backbone, "seeds": sorted(lib), "folds": len(folds),
        "trained_now": args.seeds,
        "test_pairs": len(gold),
        "settings": settings.model_dump(), "library_lr": lr, "library_recipe": args.recipe,
        "library_patience": settings.patience if args.recipe == "student" else None, "seconds": round(time.time() - t0, 1),
        "library": {"mean": stat(lib)[0], "std": stat(lib)[1], "per_seed": {s: r["macro_f1"] for s, r in lib.items()},
                    "per_fold": {s: r["folds"] for s, r in lib.items()}},
        "vanilla": {"mean": stat(ours)[0], "std": stat(ours)[1], "per_seed": {s: r["macro_f1"] for s, r in ours.items()},
                    "per_fold": {s: r["folds"] for s, r in ours.items()}},
        "vanilla_minus_library": paired,
        "pairs_per_s": {"library": float(np.mean(speed["library"])), "vanilla": float(np.mean(speed["vanilla"]))},
        "library_runs_cached": cached,  # their pairs/s come from the runs that made them
    }
    speed = result["pairs_per_s"]["vanilla"] / result["pairs_per_s"]["library"]
    result["pairs_per_s"]["vanilla_over_library"] = speed
    out = ROOT / "bench" / "results" / "quality_parity.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    if args.docs:  # the parity figure (same hyperparameters) and the recipe comparison, each in its own file
        name = "quality_parity" if args.recipe == "student" else "quality_parity_single_lr"
        (ROOT / "docs" / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(summary(result))


def summary(result: dict) -> str:
    """The one-line summary the bench prints (and the README quotes) from its results."""
    d, speed = result["vanilla_minus_library"], result["pairs_per_s"]
    recipe = {"student": "the student's optimizer groups", "single_lr": "one learning rate"}[result.get("library_recipe", "single_lr")]
    if result.get("library_patience"):  # runs before 2026-12-06 trained the library every epoch
        recipe += f" and early stopping, patience {result['library_patience']}"
    return (f"quality parity ({result['cpu']}, {result['backbone']}, {len(result['seeds'])} seeds x {result['folds']} folds, "
            f"{result['test_pairs']} test pairs): library Trainer ({recipe}) {result['library']['mean']:.3f} ± {result['library']['std']:.3f}, "
            f"vanilla student {result['vanilla']['mean']:.3f} ± {result['vanilla']['std']:.3f} test macro-F1; vanilla - library "
            f"{d['mean_diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]: {d['verdict']}; training "
            f"{speed['vanilla']:.1f} vs {speed['library']:.1f} pairs/s = {speed['vanilla_over_library']:.2f}x (goal >= 0.9x)"
            + (f"; {result['library_runs_cached']} library runs from the cache" if result.get("library_runs_cached") else ""))


if __name__ == "__main__":
    main()
