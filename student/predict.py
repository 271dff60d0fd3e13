"""The one prediction path: a student's logits, probabilities, perspective scores and projected latents for the rows
of an examples table (training's validation, the scoring actors, evaluation and the tests all call it)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch


def predict(model, table: pa.Table, tok, max_length: int, batch_size: int = 64, device="cpu") -> dict:
    """Logits, probabilities, perspective scores and projected latents (N, P, D) for every row of an examples
    table, in its order (eval mode, no grad). The one prediction path: training's validation, the scoring actors
    and the tests all call it."""
    from student.data import Collator

    model.eval()
    collate = Collator(tok, max_length, len(model.cfg.labels), len(model.cfg.perspectives), batch_size, seed=0)
    n = table.num_rows
    logits = np.zeros((n, len(model.cfg.labels)), np.float32)
    scores = projected = None
    with torch.no_grad():
        for b in collate(table):
            rows = b.pop("rows").numpy()
            out = model(b["input_ids"].to(device), b["attention_mask"].to(device),
                        b["token_type_ids"].to(device) if "token_type_ids" in b else None)
            logits[rows] = out["logits"].float().cpu().numpy()
            if out["z"] is not None:
                s, p = model.perspective_scores(out).float().cpu().numpy(), out["projected"].float().cpu().numpy()
                if scores is None:
                    scores, projected = np.zeros((n, s.shape[1]), np.float32), np.zeros((n, *p.shape[1:]), np.float32)
                scores[rows], projected[rows] = s, p
    t = torch.from_numpy(logits)
    return {"logits": t, "probs": t.softmax(-1), "perspective_scores": None if scores is None else torch.from_numpy(scores),
            "projected": None if projected is None else torch.from_numpy(projected)}
