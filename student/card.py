"""A student folder's model card (`README.md`, the Hugging Face model-card layout), rendered from what the stage wrote:
`card.json` (the facts the folder does not hold: variant, teacher, data, training settings; workflows/cards.py), the
folder's own files (student_config.json, selection.json, the variant's eval.json and history.json), the seeds'
summary the stage adds after aggregating them, a current ONNX export (onnx_export.json) and a latency measurement of
this student or its architecture (bench/results/student_latency.json) where there is one. Never written by hand:
the stage writes it, `thinkbroad export` renders it again with the export's parity."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

CARD, CARD_FACTS = "README.md", "card.json"
LATENCY = Path(__file__).resolve().parent.parent / "bench" / "results" / "student_latency.json"
# a model below either is a demonstration of the pipeline, whatever its scores
DEMO_TRAIN_PAIRS, DEMO_TEACHER_PARAMS = 100_000, 1_000_000_000


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def seed_interval(values: list[float]) -> dict:
    """Mean, std (ddof 1) and the 95% t-interval of the mean over seeds (None with one seed): seed-to-seed variation
    only, not the test pairs' sampling error (the paired verdicts hold both)."""
    from scipy.stats import t

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": 0.0, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


def _params(n: int | None) -> str:
    if not n:
        return "size unknown"
    return f"{n / 1e9:.1f}B parameters" if n >= 1e9 else f"{n / 1e6:.1f}M parameters" if n >= 1e6 else f"{n:,} parameters"


def model_size(n: int | None) -> str:
    """'135M', '7.0B', '139,840-parameter': a model's size as an adjective."""
    if not n:
        return "size-unknown"
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n:,}-parameter"


def _f(x, spec=".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def write_card(best: str | Path) -> Path:
    """Render best/README.md from best/card.json and the files around it (atomically)."""
    best = Path(best)
    text = render(best)
    tmp = best / f".{CARD}.tmp"
    tmp.write_text(text)
    os.replace(tmp, best / CARD)
    return best / CARD


def refresh_card(best: str | Path) -> Path | None:
    """Render the card again (after an export or the seeds' summary); None for a folder the stage did not write
    (no card.json): a hand-made folder gets no invented card."""
    return write_card(best) if (Path(best) / CARD_FACTS).exists() else None


def render(best: Path) -> str:
    facts = json.loads((best / CARD_FACTS).read_text())
    scfg = json.loads((best / "student_config.json").read_text())
    ev = _read(best.parent / "eval.json") or {}
    history = _read(best.parent / "history.json") or []
    selection = _read(best / "selection.json") or {}
    from student.interop import ST_FILES

    cross_encoder = (best / ST_FILES[0]).exists()
    lines = _header(facts, cross_encoder) + _model(facts, scfg, ev) + _data(facts) + _evaluation(facts, ev, history, selection)
    lines += _latency(best, facts) + _usage(best, facts, scfg, cross_encoder) + _limits(facts, ev, cross_encoder)
    return "\n".join(lines) + "\n"


def _header(facts: dict, cross_encoder: bool) -> list[str]:
    tags = ["cross-encoder", "e-commerce", "search-relevance", "thinkbroad", facts["kind"].replace("_", "-")]
    return ["---", f"library_name: {'sentence-transformers' if cross_encoder else 'thinkbroad'}",
            "pipeline_tag: text-classification", f"base_model: {facts['backbone']['name']}",
            "datasets:", f"- {facts['data']['file']}", "metrics:", "- f1", "- accuracy", "- ndcg", "license: apache-2.0",
            "language:", "- en", "tags:", *[f"- {t}" for t in tags], "---", "",
            f"# {facts['run']}: {facts['variant']}, seed {facts['seed']}", "",
            f"A {_what(facts)} that grades how relevant a product is to a search query ("
            + ", ".join(f"{lab['name']} {lab['title']}" for lab in facts["labels"]) + "). Written by thinkbroad's student "
            "stage from what it trained and measured; a rerun of the stage rewrites it.", ""]


def _what(facts: dict) -> str:
    kind = {"vanilla": "plain BERT-class cross-encoder", "logit_kd": "BERT-class cross-encoder distilled from the "
            "teacher's label votes (logit KD)"}.get(facts["kind"])
    if kind:
        return kind
    if facts["lambda"] == 0:
        return f"BERT-class cross-encoder with a {facts['extractor']} latent reasoning extractor and no guidance (λ = 0)"
    return f"BERT-class cross-encoder with a {facts['extractor']} latent reasoning extractor (LRKD)"


def _model(facts: dict, scfg: dict, ev: dict) -> list[str]:
    b, teacher = facts["backbone"], facts["teacher"]
    rows = [("encoder", f"{b['name']} ({_params(b['params'])}), [CLS] query [SEP] product text [SEP], "
             f"max {scfg['max_length']} tokens")]
    if facts["extractor"] != "none":
        rows.append(("extractor", f"{facts['extractor']} ({ev.get('extractor_params', 0):,} parameters added); the "
                     "classifier reads concat(h_CLS, z)"))
        rows.append(("mode", f"{facts['mode']} ({len(scfg['perspectives'])} perspectives: {', '.join(scfg['perspectives'])})"))
    else:
        rows.append(("extractor", "none: the classifier reads h_CLS"))
    if facts["lambda"] is not None:
        rows.append(("λ", f"{facts['lambda']:g} (guidance: {facts['guidance']}, " + ("off)" if facts["lambda"] == 0 else
                                                                                   "CE + λ · guidance)")))
    if facts["kd_alpha"] is not None:
        rows.append(("KD weight α", f"{facts['kd_alpha']:g} (CE + α · KL(teacher votes ‖ student))"))
    if teacher:
        trained = f"{teacher['choice'].upper()}-trained " if teacher["trained"] else ""
        rows.append(("teacher", f"{trained}{teacher['model']} ({_params(teacher['params'])})"))
    else:
        rows.append(("teacher", "none: " + ("gold labels only" if facts["kind"] == "vanilla" else "no LLM")))
    source = facts["target_source"]
    if facts["kind"] == "lrkd":
        what = {"teacher": "the teacher's own rationales (it judges each pair)", "gold_conditioned": "the teacher's "
                "rationales for the gold label (told the label)", "label_text": "the gold label's description (a control)"}
        use = "guidance targets" if facts["lambda"] else "centroids for attribution only"
        rows.append(("target source", f"{source}: {what.get(source, source)}, embedded by {facts['embedder']}; {use}"
                     + (f"; perspectives: {', '.join(facts['target_perspectives'])}" if facts["target_perspectives"] else "")))
    elif facts["kind"] == "logit_kd":
        rows.append(("target source", "the teacher's answer per perspective (votes)"))
    return ["## Model", "", "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


def _data(facts: dict) -> list[str]:
    d, t = facts["data"], facts["training"]
    p = d["pairs"]
    fold = f" (cross-validation fold {d['fold']} of {d['cv_folds']})" if d["fold"] is not None else ""
    lines = ["## Training data", "",
             f"`{d['file']}`{fold}, split by query: {p['train']:,} train, {p['val']:,} validation, {p['test']:,} test "
             "pairs. Labels (nDCG gain):", ""]
    for lab in facts["labels"]:
        gain = "" if lab["gain"] is None else f" (gain {lab['gain']:g})"
        lines.append(f"- **{lab['name']}** {lab['title']}{gain}" + (f": {lab['description']}" if lab["description"] else ""))
    if facts["target_pairs"]:
        tp = facts["target_pairs"]
        rest = p["train"] - tp.get("train", 0)
        lines += ["", f"Targets: {tp.get('train', 0):,} train pairs" + (f" (the other {rest:,} train on labels only)" if rest > 0 else "")
                  + ", "
                  f"{tp.get('val', 0):,} validation pairs (latent fidelity only; never training or selection); filter "
                  f"`{facts['target_filter']}`."]
    lines += ["", f"Training: up to {t['epochs']} epochs (stop after {t['patience']} without a better validation macro-F1), "
              f"batch {t['batch_size']} × {t['workers']} worker{'s' if t['workers'] > 1 else ''}, learning rate {t['learning_rate']:g} (encoder) / "
              f"{t['head_learning_rate']:g} (new parts), class weighting {t['class_weighting']}, seed {facts['seed']}.", ""]
    return lines


def _evaluation(facts: dict, ev: dict, history: list, selection: dict) -> list[str]:
    lines = ["## Evaluation", ""]
    val = ev.get("val", {})
    lines.append(f"This seed: validation macro-F1 {_f(val.get('macro_f1', selection.get('val_macro_f1')))} on "
                 f"{val.get('n', selection.get('val_pairs', 'n/a'))} pairs (selects the epoch: {selection.get('epoch', 0) + 1} "
                 f"of {len(history)} run); test, scored once:")
    if "macro_f1" in ev:
        ndcg = (ev.get("ranking") or {}).get("ndcg@10")
        lines += ["", "| test pairs | accuracy | macro-F1 | nDCG@10 | " + " | ".join(f"F1 {k}" for k in ev["per_class_f1"]) + " |",
                  "|---|---|---|---|" + "---|" * len(ev["per_class_f1"]),
                  f"| {ev.get('n', 'n/a')} | {_f(ev['accuracy'])} | {_f(ev['macro_f1'])} | {_f(ndcg)} | "
                  + " | ".join(_f(v) for v in ev["per_class_f1"].values()) + " |"]
    fid = ev.get("fidelity") or {}
    if "mean_gain" in fid:
        lines += ["", f"Latent fidelity (validation pairs with targets): mean cosine gain over the trivial predictor "
                  f"{fid['mean_gain']:+.3f}."]
    s = facts.get("summary")
    if s:
        f1 = seed_interval(list(s["per_seed_macro_f1"].values()))
        ci = f", 95% interval over seeds [{f1['ci95'][0]:.3f}, {f1['ci95'][1]:.3f}]" if f1["ci95"] else ""
        lines += ["", f"The variant over {f1['n']} seed(s) (`{s['summary_file']}`): test macro-F1 {f1['mean']:.3f} ± "
                  f"{f1['std']:.3f}{ci}; per seed " + ", ".join(f"{k}: {v:.3f}" for k, v in s["per_seed_macro_f1"].items())
                  + f"; {s['test_pairs']} test pairs."]
        if "val_macro_f1" in s["variant"]:
            lines[-1] += f" Validation macro-F1 {s['variant']['val_macro_f1']['mean']:.3f} ± {s['variant']['val_macro_f1']['std']:.3f}."
        for v in s["verdicts"]:
            lines.append(f"- {v['variant']} vs {v['against']}: {v['mean_diff']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}] "
                         f"test macro-F1 (paired by seed, 95% bootstrap over seeds and pairs): {v['verdict']}")
    return lines + [""]


def measured_latency(best: Path, facts: dict) -> dict | None:
    """This student's latency from bench/student_latency.py: its serving paths when the bench measured this folder
    ("student"), else its architecture's per-pair time (same backbone and extractor, random weights;
    "architecture"), else None."""
    bench = _read(LATENCY)
    if not bench:
        return None
    served = bench.get("serving")
    if served and Path(bench.get("student", "")).resolve() == Path(best).resolve():
        paths = {k: r["lrkd"] for k, r in served["paths"].items()}
        fp32 = paths.get("torch-fp32", {}).get("batch16_items_per_s")
        return {"kind": "student", "cpu": bench.get("cpu"), "paths": paths, "macro_f1": {k: r.get("macro_f1") for k, r in served["paths"].items()},
                "batch16_ms_per_pair": 1000 / fp32 if fp32 else None}
    arch = bench.get("students", {}).get(facts["extractor"])
    if arch and Path(bench.get("backbone", "")).name in (facts["backbone"]["name"].split("/")[-1], facts["backbone"]["name"]):
        return {"kind": "architecture", "cpu": bench.get("cpu"), "batch1_ms_per_pair": arch["batch1_ms_per_pair"],
                "batch16_ms_per_pair": arch["batch16_ms_per_pair"]}
    return None


def _latency(best: Path, facts: dict) -> list[str]:
    lines = ["## Latency", ""]
    lat = measured_latency(best, facts)
    if lat and lat["kind"] == "student":
        lines += [f"Measured for this student by `bench/student_latency.py` ({lat['cpu']}), items/s per serving path:",
                  "", "| path | batch 1 | batch 16 | test macro-F1 |", "|---|---|---|---|"]
        lines += [f"| {name} | {_f(r.get('batch1_items_per_s'), '.0f')} | {_f(r.get('batch16_items_per_s'), '.0f')} | "
                  f"{_f(lat['macro_f1'][name])} |" for name, r in lat["paths"].items()]
    elif lat:
        lines.append(f"Not measured for this student. Its architecture ({facts['backbone']['name']}, extractor "
                     f"{facts['extractor']}, random weights) by `bench/student_latency.py` on {lat['cpu']}: "
                     f"{lat['batch1_ms_per_pair']:.1f} ms per pair alone, {lat['batch16_ms_per_pair']:.2f} ms at batch 16.")
    else:
        lines.append("Not measured for this student: `python bench/student_latency.py --student <this folder>` "
                     "measures every serving path.")
    return lines + [""]


def _usage(best: Path, facts: dict, scfg: dict, cross_encoder: bool) -> list[str]:
    from student.export import export_status, summarize

    labels = ", ".join(scfg["labels"])
    lines = ["## Use", ""]
    if cross_encoder:
        lines += ["With sentence-transformers (this folder is also a `CrossEncoder`; same logits as thinkbroad's "
                  "forward within 1e-5, tests/test_interop.py):", "", "```python",
                  "from sentence_transformers import CrossEncoder", "", 'model = CrossEncoder("path/to/this/folder")',
                  'logits = model.predict([("usb c cable", "Anker USB-C to USB-C cable 2 m | color: black")])',
                  f"# one column per label: {labels}; softmax for probabilities", "```", "",
                  "transformers reports `classifier.*` and `centroids` as unexpected keys of the encoder on load: the "
                  "classifier is read by the `2_Dense` module, the centroids are unused here.", ""]
    else:
        lines += ["Not loadable as a sentence-transformers `CrossEncoder` or a transformers "
                  "`AutoModelForSequenceClassification`: its latent reasoning extractor "
                  f"({facts['extractor']}) sits between the encoder and the classifier and has no counterpart in "
                  "either library. Use thinkbroad, or the ONNX export below, which any ONNX runtime serves.", ""]
    lines += ["With thinkbroad: `thinkbroad serve <this folder>` (HTTP), `thinkbroad score PAIRS --student <this folder> "
              "--output scored.parquet` (files), `LRKDStudent.from_pretrained(<this folder>)` (Python).", "",
              "### ONNX interface", "",
              "`thinkbroad export <this folder> [--quantize int8]` writes `model.onnx` (and `model.int8.onnx`) here. "
              "Inputs `input_ids`, `attention_mask` (and `token_type_ids` where the tokenizer makes them): int64 "
              "[batch, sequence], from this folder's tokenizer on (query, product text), at most "
              f"{scfg['max_length']} tokens. Outputs (float32): `logits` [batch, {len(scfg['labels'])}] in the order {labels}"
              + ("" if scfg["extractor"] == "none" else
                 f"; `perspective_scores` [batch, {len(scfg['perspectives'])}] (cosine of the latent to each "
                 f"perspective's centroid: {', '.join(scfg['perspectives'])})") + "."]
    report = export_status(best)
    if report:
        lines += ["", f"Exported: {', '.join(report['files'])} (opset {report['opset']}); parity with torch fp32:", "",
                  *[f"- {line}" for line in summarize(report).splitlines()]]
    return lines + [""]


def _limits(facts: dict, ev: dict, cross_encoder: bool) -> list[str]:
    train = facts["data"]["pairs"]["train"]
    teacher = facts["teacher"]
    small_teacher = teacher is not None and teacher["params"] is not None and teacher["params"] < DEMO_TEACHER_PARAMS
    source = f" with a {model_size(teacher['params'])} teacher ({teacher['model']})" if teacher else ""
    lines = ["## Intended use and limits", ""]
    if train < DEMO_TRAIN_PAIRS or small_teacher:
        lines.append(f"Trained on {train:,} {facts['data']['file']} pairs{source}: a demonstration of the pipeline, not a "
                     "production model. Measure it on your own queries and catalogue before any use.")
    else:
        lines.append(f"Trained on {train:,} pairs{source}. Measure it on your own queries and catalogue before serving it.")
    n = ev.get("n") or facts["data"]["pairs"]["test"]
    lines += ["", f"- The test split holds {n} pairs: macro-F1 moves by several points between seeds and resamples at "
              "that size; read the paired verdicts, not single numbers."
              + (" One seed: no verdict." if facts.get("summary") and len(facts["summary"]["per_seed_macro_f1"]) < 2 else ""),
              "- Labels and gains are the training config's; the product text is the title and attributes, truncated to "
              "the maximum length; queries and products in English.",
              "- It grades (query, product) pairs one by one; it retrieves nothing."]
    if not cross_encoder and facts["extractor"] != "none":
        lines.append("- Served by thinkbroad or from the ONNX export only (see Use).")
    return lines
