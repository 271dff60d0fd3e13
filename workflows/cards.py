"""The model card of every student folder, written by the student stage (never by hand): what it was trained from
(workflows side: the config, the splits, the targets' manifest, the variant) is gathered here into
`best/card.json`; `student/card.py` renders `best/README.md` from it, from the folder's own files and, once the
stage has aggregated the seeds, from `student/metrics.json` (or `ablation.json`): the variant's mean over seeds and
its paired verdicts.

Nothing in card.json depends on where the run lies or when it ran (paths are relative to the run folder): two
identical runs write identical cards."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from student.card import CARD_FACTS, refresh_card, write_card
from workflows.artifacts import write_json_atomic

HUB_IDS = {"all-minilm-l6-v2": "sentence-transformers/all-MiniLM-L6-v2"}  # built-in models (workflows/models.py)


def safetensors_params(folder: str | Path | None) -> int | None:
    """Parameters in a model folder's *.safetensors files, counted from their headers (nothing is loaded)."""
    if folder is None or not Path(folder).is_dir():
        return None
    total, found = 0, False
    for f in sorted(Path(folder).glob("*.safetensors")):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for name, meta in header.items():
            if name != "__metadata__":
                n = 1
                for d in meta["shape"]:
                    n *= d
                total, found = total + n, True
    return total if found else None


def _model_name(spec: str) -> str:
    """A model as a card names it: the hub id of a built-in model, a built-in's name, a folder's last component."""
    return HUB_IDS.get(spec) or (Path(spec).name if "/" in spec and Path(spec).expanduser().exists() else spec)


def _teacher(cfg, variant, teacher: str | None) -> dict | None:
    """Who wrote the targets (or votes) this student learnt from; None for a student trained on gold labels only."""
    from workflows.models import local_folder

    d = cfg.distill
    source = variant.target_source or d.target_source
    if variant.kind == "vanilla" or (variant.kind == "lrkd" and source == "label_text"):
        return None
    choice = teacher or d.teacher
    base = cfg.teacher.model if choice in ("dpo", "sft", "base") else choice
    return {"choice": choice, "model": _model_name(base), "params": safetensors_params(local_folder(base)),
            "trained": choice in ("dpo", "sft")}


def _pairs(path: Path) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def card_facts(cfg, run_dir: Path, variant, name: str, paths: dict, teacher: str | None, fold=None) -> dict:
    """The facts a student's card is written from that its folder does not hold (card.json)."""
    from workflows.models import local_folder

    d, t = cfg.distill, cfg.distill.train
    source = variant.target_source or d.target_source if variant.kind != "vanilla" else None
    targets = None
    if variant.kind == "lrkd" and variant.lam > 0:
        from workflows.stages.targets import targets_folder

        manifest = targets_folder(cfg, run_dir, source, teacher) / "manifest.json"
        targets = json.loads(manifest.read_text()).get("pairs") if manifest.exists() else None
    backbone = local_folder(d.backbone)
    return {
        "run": cfg.name, "variant": name, "seed": variant.seed, "kind": variant.kind, "extractor": variant.extractor,
        "mode": variant.mode if variant.kind == "lrkd" else None, "lambda": variant.lam if variant.kind == "lrkd" else None,
        "kd_alpha": variant.kd_alpha if variant.kind == "logit_kd" else None, "guidance": t.guidance,
        "target_source": source, "target_filter": d.target_filter if variant.kind != "vanilla" else None,
        "target_perspectives": variant.target_perspectives, "target_pairs": targets,
        "teacher": _teacher(cfg, variant, teacher), "embedder": _model_name(d.embedder) if source else None,
        "backbone": {"name": _model_name(d.backbone), "params": safetensors_params(backbone)},
        "labels": [{"name": lab.name, "title": lab.title, "description": lab.description, "gain": lab.gain}
                   for lab in cfg.labels],
        "data": {"file": Path(cfg.data.path).name, "pairs": {s: _pairs(paths[s]) for s in ("train", "val", "test")},
                 "fold": None if fold is None else getattr(fold, "index", str(fold)), "cv_folds": d.cv_folds},
        "training": {"epochs": t.epochs, "patience": t.patience, "batch_size": t.batch_size, "workers": t.num_workers,
                     "learning_rate": t.learning_rate, "head_learning_rate": t.head_learning_rate,
                     "max_length": t.max_length, "class_weighting": t.class_weighting},
        "margin": d.equivalence_margin,
    }


def write_student_cards(cfg, run_dir: Path, entries: list[tuple], paths: dict, teacher: str | None = None, fold=None) -> None:
    """entries: (variant, name with the teacher tag, its folder) for every student train_variants returns: each
    `best/` gets card.json and README.md (from its eval.json and the stage's facts)."""
    for variant, name, folder in entries:
        best = Path(folder) / "best"
        if not (Path(folder) / "eval.json").exists() or not best.is_dir():
            continue
        # the seeds' summary comes after, from the stage's report (summarise_cards): none here is stale
        write_json_atomic(card_facts(cfg, run_dir, variant, name, paths, teacher, fold), best / CARD_FACTS)
        write_card(best)


def summarise_cards(run_dir: Path, report: dict, source: str) -> None:
    """After the stage aggregated its students (`report`: student/metrics.json or ablation.json, `source` its file
    name): each student's card gains its variant's mean over seeds, the interval, and the paired verdicts."""
    by_name: dict[str, list[dict]] = {}
    for r in report["runs"]:
        by_name.setdefault(r["variant"], []).append(r)
    groups = ("verdicts", "vanilla_verdicts", "perspective_verdicts")
    for name, runs in by_name.items():
        summary = {"variant": report["variants"][name], "test_pairs": report["test_pairs"], "summary_file": f"student/{source}",
                   "per_seed_macro_f1": {str(r["seed"]): r["metrics"]["macro_f1"] for r in runs},
                   "verdicts": [v | {"variant": n} for g in groups for n, v in (report.get(g) or {}).items()
                                if name in (n, v["against"])]}
        for r in runs:
            if isinstance(r["predictions"], list):  # cross-validation: one student per fold, each carded by its fold
                continue
            best = Path(r["predictions"]).parent.parent / "best"
            if not (best / CARD_FACTS).exists():
                continue
            facts = json.loads((best / CARD_FACTS).read_text())
            facts["summary"] = summary
            write_json_atomic(facts, best / CARD_FACTS)
            refresh_card(best)
