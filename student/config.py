"""Config of the distillation stage: targets, the variants trained side by side, and the ablation sweep."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from student.train import StudentTrainConfig, Variant

EXTRACTORS = ("mlp", "poly", "gat")
MODES = ("average", "multi_teacher", "unified")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DistillConfig(_Strict):
    # which teacher writes the distillation rationales: the trained ones, the base model, or a model folder
    teacher: str = Field("dpo", description="dpo | sft | base | a local model folder")
    max_target_pairs: int | None = Field(None, ge=1, description="train pairs given teacher targets (the rest: CE only)")
    embedder: str = Field("all-minilm-l6-v2", description="frozen sentence encoder for the rationale targets")
    embed_pooling: Literal["mean", "cls"] = Field("mean", description="mean for MiniLM, cls for BGE-M3")
    embed_batch_size: int = Field(64, ge=1)
    backbone: str = Field("all-minilm-l6-v2", description="student encoder: a built-in name or a local BERT-class folder")
    train: StudentTrainConfig = Field(default_factory=StudentTrainConfig)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    extractors: list[Literal["mlp", "poly", "gat"]] = Field(default_factory=lambda: list(EXTRACTORS))
    modes: list[Literal["average", "multi_teacher", "unified"]] = Field(default_factory=lambda: list(MODES))
    lam: float = Field(0.1, ge=0, description="weight of the latent MSE term")
    kd_alpha: float = Field(0.5, ge=0, description="logit-KD baseline: weight of KL(teacher || student)")
    ablation_lambdas: list[float] = Field(default_factory=lambda: [0.0, 0.05, 0.1, 0.3, 1.0])
    ablate_teacher: bool = Field(True, description="the ablation also trains the default LRKD variant on the other "
                                 "trained teacher's rationales (SFT when `teacher` is dpo), when that model exists")

    default_extractor: Literal["mlp", "poly", "gat"] = "poly"
    default_mode: Literal["average", "multi_teacher", "unified"] = "unified"

    def main_variants(self) -> list[Variant]:
        """vanilla, logit-KD, LRKD with each extractor (in the default mode) and in each mode (with the default
        extractor), at lambda = `lam`, each for every seed. The full extractor x mode x lambda grid is `ablate`."""
        out = []
        for seed in self.seeds:
            out.append(Variant("vanilla", "vanilla", seed=seed))
            out.append(Variant("logit_kd", "logit_kd", kd_alpha=self.kd_alpha, seed=seed))
            combos = [(e, self.default_mode) for e in self.extractors] + [(self.default_extractor, m) for m in self.modes]
            for ext, mode in dict.fromkeys(combos):
                out.append(Variant(f"lrkd-{ext}-{mode}", "lrkd", ext, mode, lam=self.lam, seed=seed))
        return out

    def ablation_variants(self) -> list[Variant]:
        """extractor x mode x lambda (lambda = 0 keeps the extractor but no latent loss)."""
        out = []
        for seed in self.seeds:
            for ext in self.extractors:
                for mode in self.modes:
                    for lam in self.ablation_lambdas:
                        name = f"lrkd-{ext}-{mode}" if lam == self.lam else f"lrkd-{ext}-{mode}-lam{lam:g}"
                        out.append(Variant(name, "lrkd", ext, mode, lam=lam, seed=seed))
        return out
