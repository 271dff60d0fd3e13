"""Frozen sentence encoder for rationale targets: mean- (all-MiniLM-L6-v2) or CLS-pooled (BGE-M3) token states,
L2-normalised. A Ray Data `map_batches` actor; also usable directly."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F


class RationaleEmbedder:
    def __init__(self, encoder_path: str, max_length: int = 256, pooling: str = "mean", device: str | None = None):
        from transformers import AutoModel, AutoTokenizer

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tok = AutoTokenizer.from_pretrained(encoder_path)
        self.model = AutoModel.from_pretrained(encoder_path, use_safetensors=True).to(self.device).eval()
        self.max_length = max_length
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be mean or cls, not {pooling!r}")
        self.pooling = pooling

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def embed(self, texts: list[str]) -> np.ndarray:
        enc = self.tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(self.device)
        with torch.no_grad():
            h = self.model(**enc).last_hidden_state
        if self.pooling == "cls":  # e.g. BGE-M3
            pooled = h[:, 0]
        else:  # e.g. all-MiniLM-L6-v2
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1)
        return F.normalize(pooled, dim=-1).float().cpu().numpy()

    def __call__(self, batch: pa.Table) -> pa.Table:
        """The batch with an `embedding` column (fixed_size_list<float32>[D]) of its `rationale` text; each distinct
        text is embedded once (unparsed rows embed as empty text)."""
        texts = [t or "" for t in batch.column("rationale").to_pylist()]
        position = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        vecs = self.embed(list(position))
        rows = vecs[[position[t] for t in texts]]
        emb = pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1), pa.float32()), vecs.shape[1])
        return batch.append_column("embedding", emb)


def embedder_placement(cluster_gpus: float) -> tuple[int, dict]:
    """(actors, Ray resources of each) for the rationale embedder: one actor per GPU of the cluster, holding one each,
    when it has GPUs; else one actor on one CPU. What workflows/stages/targets.py `_embed` asks Ray for, and what
    `thinkbroad plan` plans."""
    if cluster_gpus:
        return max(1, int(cluster_gpus)), {"num_gpus": 1}
    return 1, {"num_cpus": 1}
