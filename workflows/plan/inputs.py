"""The plan's inputs: split sizes and a sample of pairs, token lengths, the models' shapes, and what a finished run in
the run folder measured (stats.json, each stage's seconds)."""
from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mpcot.perspectives import NEUTRAL_PERSPECTIVE
from mpcot.prompts import build_messages
from workflows.cluster import PlanError
from workflows.config import RunConfig
from workflows.models import BUILTIN, local_folder, resolve_model
from workflows.shapes import ModelShape, model_shape

SPLITS = ("train", "val", "test")
SAMPLE_PAIRS = 64


@dataclass
class Pairs:
    counts: dict[str, int]
    sample: list[dict]  # {"query", "title", "attributes": dict, "label"}: a spread of training pairs
    source: str


def _sample(path: Path, n: int = SAMPLE_PAIRS) -> list[dict]:
    """A spread of n pairs of a split file's first row group (what prompts need; the rest is not read)."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if not f.metadata.num_rows:
        return []
    table = f.read_row_group(0, columns=[c for c in ("query", "title", "attributes", "label") if c in f.schema_arrow.names])
    step = max(1, table.num_rows // n)
    rows = table.take(list(range(0, table.num_rows, step))[:n]).to_pylist()
    return [{"query": r["query"], "title": r["title"], "attributes": json.loads(r.get("attributes") or "{}"),
             "label": r["label"]} for r in rows]


def _split_sizes(paths: dict[str, Path]) -> tuple[dict[str, int], list[dict]]:
    import pyarrow.parquet as pq

    return {s: pq.ParquetFile(p).metadata.num_rows for s, p in paths.items()}, _sample(paths["train"])


def plan_pairs(cfg: RunConfig, run_dir: Path, total: int | None = None) -> Pairs:
    """Split sizes and a sample of pairs: the run's prepared splits when there, else the data file through the run's
    own `prepare` (into a temporary folder), else the perspectives' few-shot pairs with `total` split by the config's
    fractions. `total` (--pairs) scales the counts to a data set not on this machine."""
    prepared = {s: run_dir / "data" / f"{s}.parquet" for s in SPLITS}
    counts = None
    if all(p.exists() for p in prepared.values()) and (run_dir / "data" / "manifest.json").exists():
        (counts, sample), source = _split_sizes(prepared), f"the prepared splits in {run_dir / 'data'}"
    elif Path(cfg.data.path).exists():
        from workflows.stages.prepare import prepare

        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            counts, sample = _split_sizes(prepare(cfg, Path(tmp)))
        source = f"{cfg.data.path} split by the config"
    if counts is not None:
        if total:
            n = sum(counts.values())
            counts = {s: round(total * c / n) for s, c in counts.items()}
            source = f"--pairs {total:,} in the split shares and token lengths of {source}"
        return Pairs(counts, sample, source)
    if not total:
        raise PlanError(f"data.path {cfg.data.path!r} is not on this machine: give --pairs N (the number of labelled pairs)")
    frac = cfg.data.split
    counts = {s: round(total * getattr(frac, s)) for s in SPLITS}
    sample = [{"query": ex.query, "title": ex.title, "attributes": dict(ex.attributes or {}), "label": ex.label}
              for p in cfg.perspectives for ex in p.examples]
    return Pairs(counts, sample, f"--pairs {total:,} split by data.split; token lengths from the few-shot pairs "
                                 f"(data.path {cfg.data.path} is not on this machine)")


class TokenCounter:
    """Tokens of text with a model folder's tokenizer.json (the `tokenizers` library: no transformers import), else
    characters / 4."""

    def __init__(self, folder: Path | None):
        self.tok = None
        if folder is not None and (folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))

    @property
    def how(self) -> str:
        return "tokenizer" if self.tok else "characters / 4 (no tokenizer on this machine)"

    def text(self, text: str, pair: str | None = None) -> int:
        if self.tok is None:
            return math.ceil((len(text) + len(pair or "")) / 4) + (3 if pair is not None else 0)
        return len(self.tok.encode(text, pair).ids) if pair is not None else len(self.tok.encode(text, add_special_tokens=False).ids)

    def messages(self, messages: list[dict]) -> int:
        """A chat prompt: each message's content plus 5 tokens of template (role, start/end markers), plus 3 for the
        assistant turn it ends with (ChatML's count; other templates are within a few tokens)."""
        return sum(self.text(m["content"]) + 5 for m in messages) + 3


@dataclass
class Lengths:
    prompt_mean: float  # tokens of an MPCoT prompt (mean over sampled pairs and perspectives)
    prompt_max: int
    neutral_mean: float  # the perspective-neutral prompt (DPO, teacher eval)
    completion: float  # tokens of an answer
    completion_how: str
    prompt_how: str
    student_mean: float  # tokens of a student input ([CLS] query [SEP] product [SEP]), capped at max_length
    student_how: str
    rationale_chars: float


def token_lengths(cfg: RunConfig, pairs: Pairs, teacher_folder: Path | None, backbone_folder: Path | None,
                  stats: dict | None) -> Lengths:
    from student.data import product_text

    g = cfg.generation
    tok = TokenCounter(teacher_folder)
    per = [tok.messages(build_messages(p, persp, cfg.labels, g.output_mode, g.rationale_max_chars, g.max_attribute_chars))
           for p in pairs.sample for persp in cfg.perspectives]
    neutral = [tok.messages(build_messages(p, NEUTRAL_PERSPECTIVE, cfg.labels, g.output_mode, g.rationale_max_chars,
                                           g.max_attribute_chars)) for p in pairs.sample]
    longest_title = max(len(lab.title) for lab in cfg.labels)
    if stats:
        done = [s["mean_completion_tokens"] for s in stats["per_perspective"].values() if "mean_completion_tokens" in s]
        completion, how = sum(done) / len(done), "measured (mean of the finished run's stats.json)"
    elif g.output_mode == "json":
        bound = math.ceil((g.rationale_max_chars + len('{"rationale": "", "label": ""}') + longest_title) / 4)
        completion, how = min(g.max_tokens, bound), (f"at most rationale_max_chars {g.rationale_max_chars} + the JSON, / 4 "
                                                     f"(json mode), capped by max_tokens {g.max_tokens}")
    else:
        completion, how = g.max_tokens, f"max_tokens {g.max_tokens} (an upper bound)"
    s = cfg.distill.train
    stok = TokenCounter(backbone_folder)
    student = [min(s.max_length, stok.text(p["query"], product_text(p["title"], json.dumps(p["attributes"]))))
               for p in pairs.sample]
    return Lengths(sum(per) / max(len(per), 1), max(per, default=0), sum(neutral) / max(len(neutral), 1), completion, how,
                   tok.how, sum(student) / max(len(student), 1), stok.how, min(g.rationale_max_chars, completion * 4))


def finished_run(run_dir: Path) -> tuple[dict | None, dict[str, float]]:
    """stats.json of a finished generation and each stage's measured seconds (manifest.json) in `run_dir`."""
    stats_path = run_dir / "mpcot" / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    dirs = {"generate": ["mpcot"], "sft": ["teacher/sft"], "dpo": ["teacher/dpo"], "teacher_eval": ["teacher/eval"],
            "distill": ["student/targets/*", "student/variants/*"]}
    seconds = {}
    for stage, patterns in dirs.items():
        found = [json.loads(p.read_text()).get("seconds", 0) for pat in patterns for d in run_dir.glob(pat)
                 for p in [d / "manifest.json"] if p.exists()]
        if found:
            seconds[stage] = sum(found)
    return stats, seconds


def model_shapes(cfg: RunConfig) -> tuple[dict[str, ModelShape], dict[str, Path | None]]:
    """Role -> shape and local folder of each model the run loads. Built-in models are resolved (built once, in seconds,
    as the run would); other folders are read where they are on this machine, else taken from plan.models."""
    d = cfg.distill
    names = {"teacher": cfg.teacher.model, "embedder": d.embedder, "backbone": d.backbone}
    if d.teacher not in ("dpo", "sft", "base"):  # a model folder writes the distillation targets
        names["targets teacher"] = d.teacher
    folders = {role: Path(resolve_model(name)) if name in BUILTIN else local_folder(name)
               for role, name in names.items()}
    shapes = {role: model_shape(names[role], folders[role], cfg.plan.models, drop_pooler=role == "backbone") for role in names}
    return shapes, folders
