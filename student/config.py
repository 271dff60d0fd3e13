"""Config of the distillation stage: targets, the variants trained side by side, and the ablation sweep."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from student.score import ScoreConfig
from student.train import StudentTrainConfig, Variant

EXTRACTORS = ("mlp", "poly", "gat")
MODES = ("average", "multi_teacher", "unified")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


TARGET_SOURCES = ("teacher", "gold_conditioned", "label_text")


class DistillConfig(_Strict):
    # which teacher writes the distillation rationales: the trained ones, the base model, or a model folder
    teacher: str = Field("dpo", description="dpo | sft | base | a local model folder")
    target_source: Literal["teacher", "gold_conditioned", "label_text"] = Field(
        "teacher", description="teacher: the teacher judges each pair as in MPCoT; gold_conditioned: the teacher is "
        "told the gold label and explains from each perspective why it holds (rationalisation, beyond the paper); "
        "label_text: the embedding of the gold label's description, no LLM (a control: the label and nothing more)")
    target_filter: Literal["correct", "parsed", "all"] = Field(
        "correct", description="which rationales become targets: correct = its label equals the gold label (the SFT "
        "consistency rule), parsed = any parsed answer, all = every row")
    max_target_pairs: int | None = Field(None, ge=1, description="train pairs given teacher targets, a seeded sample "
                                         "stratified by label (the rest: CE only); null = all")
    fidelity_pairs: int | None = Field(None, ge=1, description="val pairs given teacher targets to measure latent "
                                       "fidelity (never trained or selected on), a stratified sample; null = all")
    embedder: str = Field("all-minilm-l6-v2", description="frozen sentence encoder for the rationale targets")
    embed_pooling: Literal["mean", "cls"] = Field("mean", description="mean for MiniLM, cls for BGE-M3")
    embed_batch_size: int = Field(64, ge=1)
    backbone: str = Field("all-minilm-l6-v2", description="student encoder: a built-in name or a local BERT-class folder")
    train: StudentTrainConfig = Field(default_factory=StudentTrainConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig, description="scoring: `thinkbroad score` and `eval` on Ray Data actors; "
                               "distill's students in their training workers (batch_size only)")
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    extractors: list[Literal["mlp", "poly", "gat"]] = Field(default_factory=lambda: list(EXTRACTORS))
    modes: list[Literal["average", "multi_teacher", "unified"]] = Field(default_factory=lambda: list(MODES))
    controls: list[Literal["vanilla", "logit_kd", "lambda0"]] = Field(
        default_factory=lambda: ["vanilla", "logit_kd", "lambda0"], description="the students trained beside LRKD: "
        "vanilla (the baseline of the LRKD-vs-vanilla verdicts), logit-KD, and each LRKD variant's lambda = 0 twin "
        "(isolates the guidance term); the demo's smallest profile keeps vanilla only (workflows/demo.py)")
    lam: float = Field(0.1, ge=0, description="weight of the guidance (latent) term")
    kd_alpha: float = Field(0.5, ge=0, description="logit-KD baseline: weight of KL(teacher || student)")
    ablation_lambdas: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.3, 0.5])
    ablation_sources: list[Literal["teacher", "gold_conditioned", "label_text"]] = Field(
        default_factory=lambda: ["teacher", "label_text"], description="target sources the ablation's lambda sweep runs")
    ablate_perspectives: bool = Field(True, description="the ablation also trains the default variant on each "
                                      "perspective's targets alone (the claim MPCoT rests on)")
    ablate_teacher: bool = Field(True, description="the ablation also trains the default LRKD variant on the other "
                                 "trained teacher's rationales (SFT when `teacher` is dpo), when that model exists")
    bootstrap_resamples: int = Field(2000, ge=100, description="paired bootstrap resamples for each verdict")
    equivalence_margin: float = Field(0.02, gt=0, description="macro-F1 margin of the verdicts: equivalent when the whole "
                                      "95% interval of the difference lies inside +-margin; an interval that holds 0 but "
                                      "reaches past it is 'not enough data to tell'")

    cv_folds: int = Field(1, ge=1, description="k > 1: `distill` cross-validates by query instead of using the test "
                          "split: every labelled pair is a test pair once (k students per variant and seed, trained on "
                          "the other folds), folds x seeds pooled in the paired verdicts; the report goes to "
                          "RUN_DIR/student/cv/metrics.json (the served student still comes from a plain `distill`)")

    default_extractor: Literal["mlp", "poly", "gat"] = "poly"
    default_mode: Literal["average", "multi_teacher", "unified"] = "unified"

    def lrkd(self, ext: str, mode: str, lam: float, seed: int, source: str | None = None,
             perspectives: list[str] | None = None) -> Variant:
        """An LRKD variant named by what differs from the defaults: -lam<x> unless lambda = `lam`, -<source> unless
        the configured source, -only_<perspective> for a subset. lambda = 0 reads no targets, so it has no source."""
        source = source or self.target_source
        name = f"lrkd-{ext}-{mode}"
        if lam == 0:
            return Variant(name + "-lam0", "lrkd", ext, mode, lam=0.0, seed=seed)
        if lam != self.lam:
            name += f"-lam{lam:g}"
        if source != self.target_source:
            name += f"-{source}"
        if perspectives:
            name += "-only_" + "+".join(perspectives)
        return Variant(name, "lrkd", ext, mode, lam=lam, seed=seed, target_source=source, target_perspectives=perspectives)

    def main_variants(self) -> list[Variant]:
        """vanilla, logit-KD, and LRKD with each extractor (in the default mode) and in each mode (with the default
        extractor), each at lambda = `lam` and at lambda = 0 (its paired control), for every seed; the controls only
        where `controls` names them."""
        out = []
        for seed in self.seeds:
            if "vanilla" in self.controls:
                out.append(Variant("vanilla", "vanilla", seed=seed))
            if "logit_kd" in self.controls:
                out.append(Variant("logit_kd", "logit_kd", kd_alpha=self.kd_alpha, seed=seed))
            combos = [(e, self.default_mode) for e in self.extractors] + [(self.default_extractor, m) for m in self.modes]
            for ext, mode in dict.fromkeys(combos):
                out.append(self.lrkd(ext, mode, self.lam, seed))
                if "lambda0" in self.controls:
                    out.append(self.lrkd(ext, mode, 0.0, seed))
        return out

    def ablation_variants(self, perspectives: list[str]) -> list[Variant]:
        """The default extractor and mode: the lambda sweep for every source in `ablation_sources`, and (when
        `ablate_perspectives`) each perspective's targets alone at lambda = `lam`; every seed."""
        ext, mode = self.default_extractor, self.default_mode
        out = []
        for seed in self.seeds:
            for source in self.ablation_sources:
                out += [self.lrkd(ext, mode, lam, seed, source) for lam in self.ablation_lambdas]
            if self.ablate_perspectives and len(perspectives) > 1:
                out += [self.lrkd(ext, mode, self.lam, seed, perspectives=[p]) for p in perspectives]
        return list({(v.name, v.seed): v for v in out}.values())  # lambda = 0 once, whatever the source
