"""The LRKD student in one file: a BERT-class cross-encoder, a latent reasoning extractor that stays in the model
at inference, and a classifier over concat(h_CLS, z). Imports only torch and transformers.

Extractors (method.md §4):
  mlp  masked mean-pool of the token states, then a 2-layer MLP
  poly m learnable codes attend over the token states (Poly-Encoder style); their contexts are pooled into z
  gat  one multi-head GATv2 layer (Brody et al., 2022) over the token nodes, edges between valid tokens only, each
       edge scored with a learned embedding of its segment pair (query->query, query->product, ...), mean-pooled

Multi-perspective modes: `average` (one target, the mean of the K rationale embeddings), `multi_teacher`
(one projection head per perspective), `unified` (K latent slots, slot k aligned to perspective k, z = mean of
the slots). `lambda_latent = 0` is the vanilla cross-encoder.

Guidance (the latent term): the squared L2 distance between P(z) and e summed over dimensions by default (0-4 for
unit targets, the order of the cross-entropy), or 1 - cos; averaged over the perspectives in every mode.
"""
from __future__ import annotations

import inspect
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
    gat_heads: int = 4
    sep_token_id: int | None = None  # splits query from product tokens (gat's edge segments); None = one segment
    # hand the tokenizer's token_type_ids to the encoder: None = wherever the encoder takes them (BERT-class backbones
    # were pretrained with segment ids); a saved folder without the key is read as False, the forward students had
    # before 2026-12-06, so an old student keeps its predictions
    segment_ids: bool | None = None
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

    def forward(self, h, mask, segments):
        return self.net(masked_mean(h, mask)).view(h.shape[0], self.slots, self.dim)


class PolyExtractor(nn.Module):
    """m codes attend over the tokens; in unified mode codes are split evenly into K slot groups."""

    def __init__(self, hidden: int, codes: int, slots: int):
        super().__init__()
        codes = max(codes, slots) // slots * slots
        self.codes = nn.Parameter(torch.randn(codes, hidden) * hidden**-0.5)
        self.slots, self.dim = slots, hidden

    def forward(self, h, mask, segments):
        scores = torch.einsum("md,bld->bml", self.codes, h) / math.sqrt(h.shape[-1])
        scores = scores.masked_fill(~mask.bool().unsqueeze(1), torch.finfo(scores.dtype).min)
        ctx = torch.einsum("bml,bld->bmd", scores.softmax(-1), h)
        return ctx.view(h.shape[0], self.slots, -1, self.dim).mean(2)


class GATExtractor(nn.Module):
    """GATv2 over the token graph (Brody et al., 2022): node i attends to node j with
    a_h . LeakyReLU(W_dst h_i + W_src h_j + r[seg_i, seg_j]), so the ranking of neighbours depends on the node
    (dynamic attention, which GATv1's a.[Wh_i || Wh_j] cannot express) and on which side of [SEP] both ends are.
    Heads attend in a small scoring space (att_dim); values are projected to `dim`."""

    def __init__(self, hidden: int, dim: int, slots: int, heads: int = 4, att_dim: int = 64):
        super().__init__()
        heads = max(1, min(heads, dim))
        while dim % heads or att_dim % heads:
            heads -= 1
        self.dst = nn.Linear(hidden, att_dim)
        self.src = nn.Linear(hidden, att_dim, bias=False)
        self.edge = nn.Embedding(4, att_dim)  # segment pairs: (query|product) -> (query|product)
        self.att = nn.Parameter(torch.randn(heads, att_dim // heads) * (att_dim // heads) ** -0.5)
        self.value = nn.Linear(hidden, dim)
        self.slot_heads = nn.Linear(dim, dim * slots) if slots > 1 else None
        self.slots, self.dim, self.heads = slots, dim, heads

    def forward(self, h, mask, segments):
        b, n, _ = h.shape
        heads = self.heads
        seg = segments.long()
        pair = self.edge(seg.unsqueeze(2) * 2 + seg.unsqueeze(1))  # (B, L, L, att_dim)
        x = F.leaky_relu(self.dst(h).unsqueeze(2) + self.src(h).unsqueeze(1) + pair, 0.2)
        e = (x.view(b, n, n, heads, -1) * self.att).sum(-1)  # (B, L_dst, L_src, heads)
        e = e.masked_fill(~mask.bool()[:, None, :, None], torch.finfo(e.dtype).min)
        alpha = e.softmax(2)
        v = self.value(h).view(b, n, heads, -1)
        nodes = F.elu(torch.einsum("bijh,bjhd->bihd", alpha, v).reshape(b, n, self.dim))
        pooled = masked_mean(nodes, mask)
        if self.slot_heads is None:
            return pooled.unsqueeze(1)
        return self.slot_heads(pooled).view(b, self.slots, self.dim)


class LatentReasoningExtractor(nn.Module):
    """Token states (B, L, H), attention mask, segments (B, L; 0 query, 1 product) -> latent slots (B, K, d);
    z = mean over slots."""

    def __init__(self, kind: str, hidden: int, cfg: StudentConfig):
        super().__init__()
        slots = cfg.num_slots
        if kind == "mlp":
            self.impl = MLPExtractor(hidden, cfg.latent_dim, slots)
        elif kind == "poly":
            self.impl = PolyExtractor(hidden, cfg.poly_codes, slots)
        elif kind == "gat":
            self.impl = GATExtractor(hidden, cfg.latent_dim, slots, cfg.gat_heads)
        else:
            raise ValueError(f"extractor must be mlp, poly or gat, not {kind!r}")
        self.dim = self.impl.dim

    def forward(self, h, mask, segments):
        return self.impl(h, mask, segments)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


class LRKDStudent(nn.Module):
    def __init__(self, cfg: StudentConfig, encoder: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        if encoder is None:
            from transformers import AutoConfig, AutoModel

            encoder = AutoModel.from_config(AutoConfig.for_model(**cfg.encoder_config))
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # h_CLS is read from the last hidden state; an unused pooler only confuses DDP
        self.encoder = encoder
        cfg.segment_ids = (cfg.segment_ids is not False) and takes_segment_ids(encoder)
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
        if token_type_ids is not None and self.cfg.segment_ids:
            kwargs["token_type_ids"] = token_type_ids
        h = self.encoder(**kwargs).last_hidden_state
        cls = h[:, 0]
        if self.extractor is None:
            return {"logits": self.classifier(cls), "slots": None, "z": None, "projected": None}
        slots = self.extractor(h, attention_mask, self.segments(input_ids))
        z = slots.mean(1)
        # projections run inside forward so that DDP sees every parameter used in one pass
        return {"logits": self.classifier(torch.cat([cls, z], -1)), "slots": slots, "z": z,
                "projected": self._project(slots, z)}

    def segments(self, input_ids: torch.Tensor) -> torch.Tensor:
        """0 for [CLS] query [SEP], 1 for the product side; from the [SEP] token, so the model needs no
        token_type_ids (RoBERTa-class backbones have none) and an exported graph takes the same two inputs."""
        if self.cfg.sep_token_id is None:
            return torch.zeros_like(input_ids)
        sep = (input_ids == self.cfg.sep_token_id).long()
        return ((sep.cumsum(1) - sep) > 0).long()

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
        from student.interop import write_cross_encoder_files

        write_cross_encoder_files(self, path, tokenizer)  # a vanilla student also loads as a CrossEncoder

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> "LRKDStudent":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / STUDENT_CONFIG).exists():
            raise FileNotFoundError(f"{path} is not a student folder: {STUDENT_CONFIG} is missing")
        cfg = StudentConfig(**({"segment_ids": False} | json.loads((path / STUDENT_CONFIG).read_text())))
        model = cls(cfg)
        model.load_state_dict(load_file(str(path / WEIGHTS), device=device))
        return model.to(device).eval()

    @classmethod
    def from_encoder(cls, encoder_path: str, cfg: StudentConfig) -> "LRKDStudent":
        """A new student on a pretrained encoder folder (safetensors), extractor and head freshly initialised."""
        from transformers import AutoModel

        from transformers import AutoTokenizer

        encoder = AutoModel.from_pretrained(encoder_path, use_safetensors=True)
        cfg.encoder_config = encoder.config.to_dict()
        if cfg.sep_token_id is None:
            cfg.sep_token_id = AutoTokenizer.from_pretrained(encoder_path).sep_token_id
        return cls(cfg, encoder=encoder)


def takes_segment_ids(encoder: nn.Module) -> bool:
    """Whether the encoder's forward takes token_type_ids and has more than one segment embedding to read them
    with (BERT, MiniLM: yes; RoBERTa: one type; ModernBERT: no such argument). The signature, not the code object:
    transformers 5 wraps forwards in decorators whose code holds only (args, kwargs)."""
    try:
        params = inspect.signature(encoder.forward).parameters
    except (TypeError, ValueError):
        return False
    return "token_type_ids" in params and getattr(encoder.config, "type_vocab_size", 0) > 1


class _Width(nn.Module):
    """A stand-in encoder with no parameters: only its hidden size, which the student's head is built from."""

    def __init__(self, hidden: int):
        super().__init__()
        from types import SimpleNamespace

        self.config = SimpleNamespace(hidden_size=hidden)


def head_parameters(cfg: StudentConfig, hidden: int) -> int:
    """Parameters the student adds to an encoder of width `hidden` (extractor, classifier, projections), counted on
    the meta device from the real modules: what `thinkbroad plan` adds to the backbone's own count."""
    with torch.device("meta"):
        return sum(p.numel() for p in LRKDStudent(cfg, encoder=_Width(hidden)).parameters())


GUIDANCE = ("l2", "cosine")


def guidance_loss(model: LRKDStudent, out: dict, targets: torch.Tensor, target_mask: torch.Tensor | None = None,
                  kind: str = "l2") -> torch.Tensor:
    """The latent term: how far P(z) is from the teacher's rationale embeddings, averaged over the perspectives a
    pair has targets for (so one lambda means the same in every mode), then over the pairs that have any.

    targets (B, K, D) L2-normalised; target_mask (B, K) 1 where that perspective's rationale is a target (None: all).
    average: one term against the mean of the pair's targets; multi_teacher: P_k(z) vs e_k; unified: P_k(slot_k) vs e_k.
    kind: `l2` = squared L2 distance summed over dimensions (0..4 against a unit target once P(z) is near unit
    length), or `cosine` = 1 - cos (0..2, blind to the norm of P(z)). l2 is the default because it acts: at
    initialisation with MiniLM-L6 and 384-dim unit targets, lambda = 0.1 sends the encoder 0.06-1.5x CE's gradient
    norm with l2 but 0.004-0.016x with 1 - cos (its gradient shrinks as 1/|P(z)|), no more than the old per-dimension
    mean (0.0002-0.01x), which changed no prediction.
    """
    if kind not in GUIDANCE:
        raise ValueError(f"guidance must be one of {GUIDANCE}, not {kind!r}")
    proj = model.projected(out)
    mask = torch.ones(targets.shape[:2], dtype=proj.dtype, device=proj.device) if target_mask is None else target_mask.to(proj.dtype)
    if model.cfg.mode == "average":
        mean = (targets * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
        targets, mask = mean.unsqueeze(1), (mask.sum(1, keepdim=True) > 0).to(proj.dtype)
    if kind == "cosine":
        dist = 1 - F.cosine_similarity(proj, targets, dim=-1, eps=1e-6)
    else:
        dist = (proj - targets).pow(2).sum(-1)
    n = mask.sum(1)
    per_pair = (dist * mask).sum(1) / n.clamp(min=1.0)
    has = (n > 0).to(proj.dtype)
    return (per_pair * has).sum() / has.sum().clamp(min=1.0)


def lrkd_loss(model: LRKDStudent, out: dict, labels: torch.Tensor, targets: torch.Tensor | None, lam: float,
              class_weights: torch.Tensor | None = None, target_mask: torch.Tensor | None = None,
              guidance: str = "l2") -> tuple[torch.Tensor, dict]:
    """CE(logits, y) + lambda * guidance(P(z), e) (see `guidance_loss`). Returns the loss and its parts as floats."""
    ce = F.cross_entropy(out["logits"], labels, weight=class_weights)
    if lam == 0 or targets is None or out["z"] is None:
        return ce, {"ce": ce.item(), "guidance": 0.0}
    g = guidance_loss(model, out, targets, target_mask, guidance)
    return ce + lam * g, {"ce": ce.item(), "guidance": g.item()}


def logit_kd_loss(out: dict, labels: torch.Tensor, teacher_probs: torch.Tensor, alpha: float, temperature: float = 1.0,
                  class_weights: torch.Tensor | None = None, has_votes: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Baseline: CE + alpha * KL(teacher label distribution || student), the teacher's distribution being the
    share of its perspectives that chose each label. The KL term averages over the pairs the teacher voted on
    (`has_votes`, (B,) 1/0); pairs without votes train on CE alone rather than towards a uniform distribution."""
    ce = F.cross_entropy(out["logits"], labels, weight=class_weights)
    logp = F.log_softmax(out["logits"] / temperature, -1)
    per_pair = F.kl_div(logp, teacher_probs, reduction="none").sum(-1) * temperature**2
    has = torch.ones_like(per_pair) if has_votes is None else has_votes.to(per_pair.dtype)
    kd = (per_pair * has).sum() / has.sum().clamp(min=1.0)
    return ce + alpha * kd, {"ce": ce.item(), "kd": kd.item()}
