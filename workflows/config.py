"""The typed run config: one loader for every YAML file under configs/.

Unknown keys and bad values fail at load time with the key path and the file named.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mpcot.config import GenerationConfig
from mpcot.labels import DEFAULT_ESCI_LABELS, Label
from mpcot.perspectives import DEFAULT_PERSPECTIVES, Perspective
from pairs.config import DataConfig
from serve.config import ServeConfig
from student.config import DistillConfig
from teacher.config import DPOConfig, SFTConfig, TeacherEvalConfig


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file, the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TeacherModel(_Strict):
    # a local HF folder (config.json + safetensors) or a built-in name: see workflows/models.py
    model: str
    chat_template: str | None = None  # override the tokenizer's template (Jinja)
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)  # e.g. {enable_thinking: false} for Qwen3


class PlanThroughput(_Strict):
    """Rates `thinkbroad plan` turns work into hours with; a finished run's stats.json shows the measured one beside."""

    # GPU kind (hardware/gpu.py: A100-80G, H100, ...) -> prompt + completion tokens/s of one vLLM engine on one GPU
    # for this config's teacher; none given = generation time is not estimated
    generation_tokens_per_s: dict[str, float] = Field(default_factory=dict)
    train_mfu: float = Field(0.35, gt=0, le=1, description="share of the GPU's bf16 peak teacher training reaches")
    student_mfu: float = Field(0.15, gt=0, le=1, description="share of the peak the student (BERT-class) training reaches")
    cpu_gflops_per_core: float = Field(50.0, gt=0, description="for work on CPU actors (the rationale embedder)")


class PlanAssumptions(_Strict):
    teacher_accuracy: float = Field(0.6, gt=0, le=1, description="share of rationales with the gold label (SFT rows, "
                                    "DPO conflicts, resampling); a finished run's stats.json replaces it")
    # per model load (engine or trainer start, export): minutes on GPUs (a 14B model from shared storage) and on CPUs
    # (a vLLM-CPU engine starts in 20-30 s, a Ray Train + DeepSpeed group in about as long: ../shared/notes/cpu-stack.md)
    startup_minutes: dict[Literal["gpu", "cpu"], float] = Field(default_factory=lambda: {"gpu": 5.0, "cpu": 0.5})
    gpu_runtime_gib: float = Field(2.0, ge=0, description="per GPU beyond the estimates: CUDA context, NCCL and "
                                   "cuBLAS workspaces, allocator fragmentation")


class PlanConfig(_Strict):
    """`thinkbroad plan`: what a GPU run needs, takes and costs (workflows/plan/)."""

    gpu_hour_usd: float | None = Field(None, gt=0, description="price of one GPU-hour; null = no cost column")
    # prices move (AWS cut its P4/P5 on-demand prices in June 2025): the plan prints the price with its month and age
    gpu_hour_usd_as_of: str | None = Field(None, pattern=r"^\d{4}-(0[1-9]|1[0-2])$",
                                           description="the month the price was in effect, YYYY-MM")
    gpu_hour_usd_source: str | None = Field(None, description="what the price is: instance, region, on-demand or not")
    # model name as the config gives it (teacher.model, distill.embedder, distill.backbone) -> its config.json
    # fields, used when the folder is not on the machine that plans
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)
    throughput: PlanThroughput = Field(default_factory=PlanThroughput)
    assume: PlanAssumptions = Field(default_factory=PlanAssumptions)


class TrackingConfig(_Strict):
    """Experiment tracking with MLflow: one run per run directory, a nested run per stage and per student
    (workflows/tracking.py; docs/tracking.md)."""

    backend: Literal["mlflow", "none"] = Field("mlflow", description="mlflow: log every finished stage's parameters, "
                                               "metrics and files to MLflow; none: log and write nothing")
    uri: str | None = Field(None, description="MLflow tracking URI; null = a SQLite store in RUN_DIR/mlflow (no server: "
                            "`mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow/mlflow.db` shows it); "
                            "http://HOST:PORT = an MLflow tracking server (`mlflow server`), which every run of a team "
                            "can share")
    experiment: str | None = Field(None, description="the MLflow experiment; null = the config's `name`")


class RunConfig(_Strict):
    name: str
    run_dir: str | None = None
    seed: int = 0
    data: DataConfig
    labels: list[Label] = Field(default_factory=lambda: [Label(**lab) for lab in DEFAULT_ESCI_LABELS])
    perspectives: list[Perspective] = Field(default_factory=lambda: [Perspective(**p) for p in DEFAULT_PERSPECTIVES])
    teacher: TeacherModel
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    teacher_eval: TeacherEvalConfig = Field(default_factory=TeacherEvalConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    plan: PlanConfig = Field(default_factory=PlanConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[Label]) -> list[Label]:
        if len(labels) < 2:
            raise ValueError("need at least two labels")
        for attr in ("name", "title"):
            seen = [getattr(lab, attr).lower() for lab in labels]
            dup = {s for s in seen if seen.count(s) > 1}
            if dup:
                raise ValueError(f"label {attr}s must be unique (case-insensitive), repeated: {sorted(dup)}")
        return labels

    @field_validator("perspectives")
    @classmethod
    def _perspectives(cls, persps: list[Perspective]) -> list[Perspective]:
        if not persps:
            raise ValueError("need at least one perspective")
        names = [p.name for p in persps]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"perspective names must be unique, repeated: {sorted(dup)}")
        return persps

    def section_hash(self, *sections: str) -> str:
        """Stable hash of the named top-level sections: what a stage's cache key depends on."""
        payload = {s: _dump(getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _dump(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_dump(v) for v in value]
    return value


def read_yaml(path: Path, error: type[Exception], what: str) -> Any:
    """A YAML file's contents; `error` naming the file when it is missing or not YAML."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read and validate a run config. Relative data paths resolve against the current directory.

    `overrides`: `dotted.key=value` strings (the value is YAML), applied on top of the file, e.g.
    `distill.seeds=[0,1,2]` or `generation.max_pairs=20`.
    """
    path = Path(path)
    raw = read_yaml(path, ConfigError, "config file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    for item in overrides or []:
        _apply_override(raw, item)
    raw = _include_files(raw, path.parent)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        lines, from_file = [], False
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see configs/ for the accepted keys)"
            given = _override_for(where, overrides or [])
            from_file = from_file or given is None
            lines.append(f"  {where}: {msg}" if given is None else f"  --set {given}: {where}: {msg}")
        head = f"{path}: invalid config" if from_file else f"invalid --set value (applied to {path})"
        raise ConfigError(head + "\n" + "\n".join(lines)) from None


def _override_for(where: str, overrides: list[str]) -> str | None:
    """The last `--set` item whose key is `where` or contains it or lies inside it: the one a bad value came from."""
    for item in reversed(overrides):
        key = item.partition("=")[0].strip()
        if key == where or where.startswith(key + ".") or key.startswith(where + "."):
            return item
    return None


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. distill.seeds=[0,1,2]")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
    *parents, last = key.strip().split(".")
    node = raw
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {item!r}: {name!r} is not a section")
        node = child
    node[last] = value


def _include_files(raw: dict, base: Path) -> dict:
    """`perspectives` and `labels` may be a path to a YAML list instead of an inline list."""
    for key in ("perspectives", "labels"):
        value = raw.get(key)
        if isinstance(value, str):
            file = (base / value) if not Path(value).is_absolute() else Path(value)
            if not file.exists():
                file = Path(value)
            try:
                raw[key] = yaml.safe_load(file.read_text())
            except FileNotFoundError:
                raise ConfigError(f"{key}: file {value!r} not found (relative to {base} or the current directory)") from None
    extra = raw.pop("extra_perspectives", None)
    if extra:
        base_list = raw.get("perspectives") or [dict(p) for p in DEFAULT_PERSPECTIVES]
        raw["perspectives"] = list(base_list) + list(extra)
    return raw


def load_serve_config(path: str | Path | None, overrides: list[str] | None = None) -> ServeConfig:
    """`thinkbroad serve`'s settings: the `serve:` section of a run config with `--set` applied, or, without a
    config, the defaults with `--set serve.KEY=VALUE` items."""
    if path is not None:
        return load_config(path, overrides).serve
    raw: dict = {}
    for item in overrides or []:
        if item.partition("=")[0].strip().split(".")[0] != "serve":
            raise ConfigError(f"--set {item!r}: without --config only serve.* keys apply, e.g. serve.replicas=2")
        _apply_override(raw, item)
    try:
        return ServeConfig.model_validate(raw.get("serve", {}))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(["serve", *map(str, err["loc"])])
            msg = "unknown key (see docs/config-reference.md)" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  --set {_override_for(where, overrides or [])}: {where}: {msg}")
        raise ConfigError("invalid --set value\n" + "\n".join(lines)) from None
