"""The guidance diagnostics recorded every epoch: how much of the teacher's reasoning reaches the encoder."""
from __future__ import annotations

import torch


def loss_diagnostics(model, batch: dict, variant, guidance: str, class_weights=None) -> dict:
    """On one batch: CE, the guidance loss, lambda * guidance / CE, and the ratio of the gradient norms that the
    lambda-weighted guidance term and CE send into the encoder (torch.autograd.grad; nothing is accumulated).
    The encoder is where the teacher's reasoning has to arrive: P alone can lower the guidance loss without
    changing what the student computes. Eval mode, so both gradients see the same forward pass."""
    import torch.nn.functional as F

    from student.model import guidance_loss

    was_training = model.training
    model.eval()
    out = model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
    ce = F.cross_entropy(out["logits"], batch["label"], weight=class_weights)
    result = {"ce": ce.item()}
    if variant.kind == "lrkd" and out["z"] is not None and variant.lam > 0:
        g = guidance_loss(model, out, batch["targets"], batch["target_mask"], guidance)
        params = [p for p in model.encoder.parameters() if p.requires_grad]
        g_ce = torch.autograd.grad(ce, params, retain_graph=True, allow_unused=True)
        g_gd = torch.autograd.grad(variant.lam * g, params, allow_unused=True)
        norm = lambda grads: torch.sqrt(sum((x.float() ** 2).sum() for x in grads if x is not None)).item()  # noqa: E731
        result |= {"guidance": g.item(), "guidance_share": variant.lam * g.item() / max(ce.item(), 1e-12),
                   "grad_ratio": norm(g_gd) / max(norm(g_ce), 1e-12)}
    model.train(was_training)
    return result
