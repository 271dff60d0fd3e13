"""The LRKD student in one file: a BERT-class cross-encoder, a latent reasoning extractor that stays in the model
at inference, and a classifier over concat(h_CLS, z). Imports only torch and transformers.

Extractors (method.md §4):
  mlp  masked mean-pool of the token states, then a 2-layer MLP
  poly m learnable codes attend over the token states (Poly-Encoder style); their contexts are pooled into z
  gat  one graph-attention layer over the token nodes (edges between valid tokens only), masked mean-pooled

Multi-perspective modes: `average` (one target, the mean of the K rationale embeddings), `multi_teacher`
(one projection head per perspective), `unified` (K latent slots, slot k aligned to perspective k, z = mean of
the slots). `lambda_latent = 0` is the vanilla cross-encoder.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

STUDENT_CONFIG = "student_config.json"
WEIGHTS = "model.safetensors"


@dataclass
class StudentConfig:
    labels: list[str]
    perspectives: list[str]
    extractor: str = "poly"  # mlp | poly | gat | none
    mode: str = "unified"  # average | multi_teacher | unified
    latent_dim: int = 256  # z for mlp/gat; poly uses the encoder width
    poly_codes: int = 16
    target_dim: int = 384  # dimension of the rationale embeddings
    max_length: int = 128
    encoder_config: dict = field(default_factory=dict)

    @property
    def num_slots(self) -> int:
        return len(self.perspectives) if self.mode == "unified" else 1


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1) / m.sum(1).clamp(min=1.0)


class MLPExtractor(nn.Module):
    def __init__(self, hidden: int, dim: int, slots: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, dim), nn.GELU(), nn.Linear(dim, dim * slots))
        self.slots, self.dim = slots, dim

    def forward(self, h, mask):
        return self.net(masked_mean(h, mask)).view(h.shape[0], self.slots, self.dim)


class PolyExtractor(nn.Module):
    """m codes attend over the tokens; in unified mode codes are split evenly into K slot groups."""

    def __init__(self, hidden: int, codes: int, slots: int):
        super().__init__()
        codes = max(codes, slots) // slots * slots
        self.codes = nn.Parameter(torch.randn(codes, hidden) * hidden**-0.5)
        self.slots, self.dim = slots, hidden

    def forward(self, h, mask):
        scores = torch.einsum("md,bld->bml", self.codes, h) / math.sqrt(h.shape[-1])
        scores = scores.masked_fill(~mask.bool().unsqueeze(1), torch.finfo(scores.dtype).min)
        ctx = torch.einsum("bml,bld->bmd", scores.softmax(-1), h)
        return ctx.view(h.shape[0], self.slots, -1, self.dim).mean(2)


class GATExtractor(nn.Module):
    """Single-head graph attention (Velickovic et al.) with tokens as nodes and valid-token pairs as edges."""

    def __init__(self, hidden: int, dim: int, slots: int):
        super().__init__()
        self.proj = nn.Linear(hidden, dim, bias=False)
        self.att_src = nn.Parameter(torch.randn(dim) * dim**-0.5)
        self.att_dst = nn.Parameter(torch.randn(dim) * dim**-0.5)
        self.slot_heads = nn.Linear(dim, dim * slots) if slots > 1 else None
        self.slots, self.dim = slots, dim

    def forward(self, h, mask):
        wh = self.proj(h)  # (B, L, d)
        e = F.leaky_relu((wh @ self.att_dst).unsqueeze(2) + (wh @ self.att_src).unsqueeze(1), 0.2)  # (B, L, L)
        valid = mask.bool()
        e = e.masked_fill(~valid.unsqueeze(1), torch.finfo(e.dtype).min)
        nodes = F.elu(e.softmax(-1) @ wh)
        pooled = masked_mean(nodes, mask)
        if self.slot_heads is None:
            return pooled.unsqueeze(1)
        return self.slot_heads(pooled).view(h.shape[0], self.slots, self.dim)


class LatentReasoningExtractor(nn.Module):
    """Token states (B, L, H) + attention mask -> latent slots (B, K, d); z = mean over slots."""

    def __init__(self, kind: str, hidden: int, cfg: StudentConfig):
        super().__init__()
        slots = cfg.num_slots
        if kind == "mlp":
            self.impl = MLPExtractor(hidden, cfg.latent_dim, slots)
        elif kind == "poly":
            self.impl = PolyExtractor(hidden, cfg.poly_codes, slots)
        elif kind == "gat":
            self.impl = GATExtractor(hidden, cfg.latent_dim, slots)
        else:
            raise ValueError(f"extractor must be mlp, poly or gat, not {kind!r}")
        self.dim = self.impl.dim

    def forward(self, h, mask):
        return self.impl(h, mask)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class LRKDStudent(nn.Module):
    def __init__(self, cfg: StudentConfig, encoder: nn.Module | None = None):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        self.cfg = cfg
        if encoder is None:
            encoder = AutoModel.from_config(AutoConfig.for_model(**cfg.encoder_config))
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # h_CLS is read from the last hidden state; an unused pooler only confuses DDP
        self.encoder = encoder
        hidden = encoder.config.hidden_size
        k = len(cfg.perspectives)
        if cfg.extractor == "none":
            self.extractor, zdim = None, 0
        else:
            self.extractor = LatentReasoningExtractor(cfg.extractor, hidden, cfg)
            zdim = self.extractor.dim
        self.classifier = nn.Linear(hidden + zdim, len(cfg.labels))
        # projections P from z (or slot k) to the rationale-embedding space: one, or one per perspective
        n_proj = 1 if cfg.mode == "average" else k
        self.projections = nn.ModuleList(nn.Linear(zdim, cfg.target_dim) for _ in range(n_proj)) if zdim else nn.ModuleList()
        # per-perspective centroids of the teacher's rationale embeddings, for attribution at inference
        self.register_buffer("centroids", torch.zeros(k, cfg.target_dim))

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and "token_type_ids" in self.encoder.forward.__code__.co_varnames:
            kwargs["token_type_ids"] = token_type_ids
        h = self.encoder(**kwargs).last_hidden_state
        cls = h[:, 0]
        if self.extractor is None:
            return {"logits": self.classifier(cls), "slots": None, "z": None, "projected": None}
        slots = self.extractor(h, attention_mask)
        z = slots.mean(1)
        # projections run inside forward so that DDP sees every parameter used in one pass
        return {"logits": self.classifier(torch.cat([cls, z], -1)), "slots": slots, "z": z,
                "projected": self._project(slots, z)}

    def _project(self, slots: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """(B, P, target_dim): P(z) in average mode, P_k(z) for multi_teacher, P_k(slot_k) for unified."""
        if self.cfg.mode == "average":
            return self.projections[0](z).unsqueeze(1)
        if self.cfg.mode == "multi_teacher":
            return torch.stack([p(z) for p in self.projections], 1)
        return torch.stack([p(slots[:, i]) for i, p in enumerate(self.projections)], 1)

    def projected(self, out: dict) -> torch.Tensor:
        return out["projected"]

    def perspective_scores(self, out: dict) -> torch.Tensor:
        """(B, K) cosine similarity of the projected latent to each perspective's centroid."""
        proj = F.normalize(out["projected"], dim=-1)
        cents = F.normalize(self.centroids, dim=-1)
        if proj.shape[1] == 1:
            return proj[:, 0] @ cents.T
        return (proj * cents.unsqueeze(0)).sum(-1)

    def extractor_parameters(self) -> int:
        """Parameters the latent path adds to the vanilla cross-encoder (extractor + wider classifier input)."""
        if self.extractor is None:
            return 0
        return self.extractor.num_parameters() + self.extractor.dim * len(self.cfg.labels)

    # ---- HF-style folder: student_config.json + config.json (encoder) + model.safetensors + tokenizer ----
    def save_pretrained(self, path: str | Path, tokenizer=None) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.cfg) | {"encoder_config": self.encoder.config.to_dict()}
        (path / STUDENT_CONFIG).write_text(json.dumps(cfg, indent=2))
        self.encoder.config.save_pretrained(str(path))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(path / WEIGHTS))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(path))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> "LRKDStudent":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / STUDENT_CONFIG).exists():
            raise FileNotFoundError(f"{path} is not a student folder: {STUDENT_CONFIG} is missing")
        cfg = StudentConfig(**json.loads((path / STUDENT_CONFIG).read_text()))
        model = cls(cfg)
        model.load_state_dict(load_file(str(path / WEIGHTS), device=device))
        return model.to(device).eval()

    @classmethod
    def from_encoder(cls, encoder_path: str, cfg: StudentConfig) -> "LRKDStudent":
        """A new student on a pretrained encoder folder (safetensors), extractor and head freshly initialised."""
        from transformers import AutoModel

        encoder = AutoModel.from_pretrained(encoder_path, use_safetensors=True)
        cfg.encoder_config = encoder.config.to_dict()
        return cls(cfg, encoder=encoder)


def lrkd_loss(model: LRKDStudent, out: dict, labels: torch.Tensor, targets: torch.Tensor | None, lam: float,
              class_weights: torch.Tensor | None = None, target_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """CE(logits, y) + lambda * MSE(P(z), e). targets: (B, K, target_dim) L2-normalised rationale embeddings.

    average: e = mean_k e_k; multi_teacher: sum_k MSE(P_k(z), e_k); unified: sum_k MSE(P_k(slot_k), e_k).
    target_mask (B,): 1 where the pair has teacher targets; the latent term averages over those pairs only.
    """
    ce = F.cross_entropy(out["logits"], labels, weight=class_weights)
    if lam == 0 or targets is None or out["z"] is None:
        return ce, {"ce": ce.item(), "latent": 0.0}
    proj = model.projected(out)
    if model.cfg.mode == "average":
        per_pair = (proj[:, 0] - targets.mean(1)).pow(2).mean(-1)
    else:
        per_pair = (proj - targets).pow(2).mean(-1).sum(1)
    mask = torch.ones_like(per_pair) if target_mask is None else target_mask.to(per_pair.dtype)
    mse = (per_pair * mask).sum() / mask.sum().clamp(min=1.0)
    return ce + lam * mse, {"ce": ce.item(), "latent": mse.item()}


def logit_kd_loss(out: dict, labels: torch.Tensor, teacher_probs: torch.Tensor, alpha: float, temperature: float = 1.0,
                  class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Baseline: CE + alpha * KL(teacher label distribution || student), the teacher's distribution being the
    share of its perspectives that chose each label."""
    ce = F.cross_entropy(out["logits"], labels, weight=class_weights)
    logp = F.log_softmax(out["logits"] / temperature, -1)
    kd = F.kl_div(logp, teacher_probs, reduction="batchmean") * temperature**2
    return ce + alpha * kd, {"ce": ce.item(), "kd": kd.item()}
