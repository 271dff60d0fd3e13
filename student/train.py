"""LRKD student training on Ray Train (`TorchTrainer`, DDP across N workers), with early stopping on validation
macro-F1, a checkpoint per epoch (resume continues after the last finished epoch) and the best model exported
as a student folder.

Training folder (`out_dir`):
  ray/      Ray Train run state + per-epoch checkpoints (weights + training state as JSON, safetensors)
  best/     the best epoch's student folder (student_config.json, model.safetensors, tokenizer)
  history.json  per-epoch train loss parts and validation metrics
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field


class StudentTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(2, ge=1)
    accelerator: str = Field("auto", pattern="^(auto|cpu|gpu)$")
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1, description="per worker")
    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    max_length: int = Field(128, ge=8)
    class_weighting: str = Field("inverse_frequency", pattern="^(none|inverse_frequency)$")
    patience: int = Field(2, ge=1, description="stop after this many epochs without a better val macro-F1")
    latent_dim: int = Field(256, ge=1)
    poly_codes: int = Field(16, ge=1)
    kd_temperature: float = Field(1.0, gt=0)


@dataclass
class Variant:
    """One student to train: `kind` vanilla | logit_kd | lrkd."""

    name: str
    kind: str
    extractor: str = "none"
    mode: str = "average"
    lam: float = 0.0
    kd_alpha: float = 0.0
    seed: int = 0


def _device(accelerator: str) -> str:
    import ray

    if accelerator == "auto":
        return "gpu" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    return accelerator


def _batches(data: dict, idx: list[int], tok, max_length: int, device) -> dict:
    from student.data import encode_pairs

    enc = encode_pairs(tok, [data["query"][i] for i in idx], [data["product"][i] for i in idx], max_length)
    out = {k: v.to(device) for k, v in enc.items()}
    for key in ("label", "targets", "has_target", "teacher_probs"):
        out[key] = data[key][idx].to(device)
    return out


def predict(model, data: dict, tok, max_length: int, batch_size: int = 64, device="cpu") -> dict:
    """Logits, probabilities and perspective scores for every row of `data` (eval mode, no grad)."""
    model.eval()
    # batches of similar length pad less; the outputs go back to the input order
    order = sorted(range(len(data["query"])), key=pair_lengths(tok, data, max_length).__getitem__)
    logits, scores = [], []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            b = _batches(data, order[start : start + batch_size], tok, max_length, device)
            out = model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            logits.append(out["logits"].float().cpu())
            if out["z"] is not None:
                scores.append(model.perspective_scores(out).float().cpu())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    logits = torch.cat(logits)[inverse]
    return {"logits": logits, "probs": logits.softmax(-1), "perspective_scores": torch.cat(scores)[inverse] if scores else None}


def pair_lengths(tok, data: dict, max_length: int) -> list[int]:
    """Token length of each (query, product) pair as the model sees it."""
    enc = tok(data["query"], data["product"], truncation="longest_first", max_length=max_length)
    return [len(ids) for ids in enc["input_ids"]]


def _train_loop(cfg: dict) -> None:
    import ray.train
    import ray.train.torch
    from sklearn.metrics import f1_score
    from transformers import AutoTokenizer

    from student.data import class_weights, length_grouped_batches
    from student.model import LRKDStudent, StudentConfig, logit_kd_loss, lrkd_loss

    settings = StudentTrainConfig(**cfg["settings"])
    variant = Variant(**cfg["variant"])
    torch.manual_seed(variant.seed)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    tok = AutoTokenizer.from_pretrained(cfg["encoder_path"])
    student_cfg = StudentConfig(labels=cfg["labels"], perspectives=cfg["perspectives"],
                                extractor=variant.extractor if variant.kind == "lrkd" else "none", mode=variant.mode,
                                latent_dim=settings.latent_dim, poly_codes=settings.poly_codes,
                                target_dim=cfg["target_dim"], max_length=settings.max_length)
    model = LRKDStudent.from_encoder(cfg["encoder_path"], student_cfg)
    model.centroids.copy_(torch.tensor(cfg["centroids"]))
    start_epoch, best, history = 0, -1.0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        from safetensors.torch import load_file

        with checkpoint.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
            state = json.loads(Path(d, "state.json").read_text())
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    device = ray.train.torch.get_device()
    core = model.module if hasattr(model, "module") else model
    train, val = cfg["train"], cfg["val"]
    weights = class_weights(train["label"], len(cfg["labels"]), settings.class_weighting)
    weights = weights.to(device) if weights is not None else None
    opt = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    # epochs since the best one (history comes back with a resumed checkpoint)
    stale = len(history) - 1 - max(range(len(history)), key=lambda i: (history[i]["val_macro_f1"], -i)) if history else 0
    lengths = pair_lengths(tok, train, settings.max_length)
    for epoch in range(start_epoch, settings.epochs):
        t0 = time.time()
        model.train()
        mine = length_grouped_batches(lengths, settings.batch_size, world, variant.seed * 1000 + epoch)[rank]
        sums: dict[str, float] = {}
        steps = 0
        for idx in mine:
            b = _batches(train, idx, tok, settings.max_length, device)
            out = model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            if variant.kind == "logit_kd":
                loss, parts = logit_kd_loss(out, b["label"], b["teacher_probs"], variant.kd_alpha,
                                            settings.kd_temperature, weights)
            else:
                loss, parts = lrkd_loss(core, out, b["label"], b["targets"], variant.lam, weights, b["has_target"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        pred = predict(core, val, tok, settings.max_length, device=device)["probs"].argmax(-1)
        f1 = float(f1_score(val["label"].numpy(), pred.numpy(), average="macro", labels=list(range(len(cfg["labels"]))), zero_division=0))
        history.append({"epoch": epoch, "val_macro_f1": f1, **{f"train_{k}": v / max(steps, 1) for k, v in sums.items()},
                        "seconds": round(time.time() - t0, 1)})
        improved = f1 > best
        if improved:
            best, stale = f1, 0
        else:
            stale += 1
        metrics = {"epoch": epoch, "val_macro_f1": f1, "best_val_macro_f1": best}
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in core.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
                Path(tmp, "state.json").write_text(json.dumps({"epoch": epoch, "best": best, "history": history}))
                if improved:
                    _save_atomic(core, tok, Path(cfg["out_dir"]) / "best")
                Path(cfg["out_dir"], "history.json").write_text(json.dumps(history, indent=1))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        if stale >= settings.patience:
            break


def _save_atomic(model, tok, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer=tok)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def train_student(variant: Variant, settings: StudentTrainConfig, train: dict, val: dict, encoder_path: str,
                  labels: list[str], perspectives: list[str], centroids: list, out_dir: str | Path) -> dict:
    """Train one variant; rerunning with the same out_dir resumes it. Returns the per-epoch history."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    device = _device(settings.accelerator)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "variant": asdict(variant), "settings": settings.model_dump(), "train": train, "val": val,
            "encoder_path": str(Path(encoder_path).resolve()), "labels": labels, "perspectives": perspectives,
            "target_dim": int(train["targets"].shape[-1]), "centroids": centroids, "out_dir": str(out),
        },
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=device == "gpu"),
        torch_config=TorchConfig(backend="nccl" if device == "gpu" else "gloo"),
        run_config=RunConfig(name="student", storage_path=str(out / "ray"), checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()
    return json.loads((out / "history.json").read_text())
