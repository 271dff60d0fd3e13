"""LRKD student training on Ray Train (`TorchTrainer`, DDP across N workers), with early stopping on validation
macro-F1, a checkpoint per epoch (resume continues after the last finished epoch) and the best model exported
as a student folder.

Several students train one after another in one worker group (`train_students`, since starting a group costs
~20 s); its Ray Train state and latest checkpoint (weights + the job and epoch it belongs to) live in the `storage`
folder given. Each student's folder (`out_dir`):
  trained.json  written when its training finished (early stop or last epoch)
  best/     the best epoch's student folder (student_config.json, model.safetensors, tokenizer) and
            selection.json (that epoch, its val macro-F1 and the val logits it was chosen on)
  history.json  per-epoch train loss parts, validation macro-F1, and the guidance diagnostics: CE, guidance,
                lambda * guidance / CE and the ratio of the guidance term's gradient norm to CE's on the encoder
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

TRAINED = "trained.json"


class StudentTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: int = Field(1, ge=1, description="CPU training: cores (threads) per worker")
    accelerator: str = Field("auto", pattern="^(auto|cpu|gpu)$")
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1, description="per worker")
    learning_rate: float = Field(5e-5, gt=0, description="peak learning rate of the pretrained encoder")
    head_learning_rate: float = Field(1e-3, gt=0, description="peak learning rate of the new parts: extractor, "
                                      "classifier, projections (they start from random)")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="linear warm-up over this share of the steps, then linear decay to 0")
    weight_decay: float = Field(0.01, ge=0)
    max_length: int = Field(128, ge=8)
    class_weighting: str = Field("inverse_frequency", pattern="^(none|inverse_frequency)$")
    patience: int = Field(2, ge=1, description="stop after this many epochs without a better val macro-F1")
    latent_dim: int = Field(256, ge=1)
    poly_codes: int = Field(16, ge=1)
    kd_temperature: float = Field(1.0, gt=0)
    guidance: str = Field("l2", pattern="^(l2|cosine)$", description="latent term: squared L2 summed over dimensions, or 1 - cos")


@dataclass
class Variant:
    """One student to train: `kind` vanilla | logit_kd | lrkd. `target_source` (teacher | gold_conditioned |
    label_text) and `target_perspectives` (a subset, None = all) say which targets its guidance term reads; the
    stage hands the training loop those targets (the others masked)."""

    name: str
    kind: str
    extractor: str = "none"
    mode: str = "average"
    lam: float = 0.0
    kd_alpha: float = 0.0
    seed: int = 0
    target_source: str | None = None
    target_perspectives: list[str] | None = None


def _device(accelerator: str) -> str:
    import ray

    if accelerator == "auto":
        return "gpu" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    return accelerator


def _batches(data: dict, idx: list[int], tok, max_length: int, device) -> dict:
    from student.data import encode_pairs

    enc = encode_pairs(tok, [data["query"][i] for i in idx], [data["product"][i] for i in idx], max_length)
    out = {k: v.to(device) for k, v in enc.items()}
    for key in ("label", "targets", "target_mask", "teacher_probs", "has_votes"):
        out[key] = data[key][idx].to(device)
    return out


def predict(model, data: dict, tok, max_length: int, batch_size: int = 64, device="cpu") -> dict:
    """Logits, probabilities, perspective scores and projected latents (B, P, D) for every row of `data`
    (eval mode, no grad). The one evaluation path: training's validation, reloads and test all call it."""
    model.eval()
    # batches of similar length pad less; the outputs go back to the input order
    order = sorted(range(len(data["query"])), key=pair_lengths(tok, data, max_length).__getitem__)
    logits, scores, projected = [], [], []
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            b = _batches(data, order[start : start + batch_size], tok, max_length, device)
            out = model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            logits.append(out["logits"].float().cpu())
            if out["z"] is not None:
                scores.append(model.perspective_scores(out).float().cpu())
                projected.append(out["projected"].float().cpu())
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    logits = torch.cat(logits)[inverse]
    return {"logits": logits, "probs": logits.softmax(-1),
            "perspective_scores": torch.cat(scores)[inverse] if scores else None,
            "projected": torch.cat(projected)[inverse] if projected else None}


def loss_diagnostics(model, batch: dict, variant: "Variant", guidance: str, class_weights=None) -> dict:
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


def pair_lengths(tok, data: dict, max_length: int) -> list[int]:
    """Token length of each (query, product) pair as the model sees it."""
    enc = tok(data["query"], data["product"], truncation="longest_first", max_length=max_length)
    return [len(ids) for ids in enc["input_ids"]]


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to the peak, then linear decay to 0 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(total - warmup, 1))


def _train_loop(cfg: dict) -> None:
    """Ray Train worker: the jobs one after another in one worker group (starting a group costs ~20 s). A job
    with trained.json in its folder is done; the checkpoint names the job it belongs to, which resumes there."""
    import ray.train

    checkpoint, state = ray.train.get_checkpoint(), None
    if checkpoint:
        from safetensors.torch import load_file

        with checkpoint.as_directory() as d:
            state = json.loads(Path(d, "state.json").read_text()) | {"weights": load_file(os.path.join(d, "model.safetensors"))}
    for job in cfg["jobs"]:
        if (Path(job["out_dir"]) / TRAINED).exists():
            continue
        _train_job(cfg, job, state if state and state["job"] == job["out_dir"] else None)


def _train_job(cfg: dict, job: dict, resume: dict | None) -> None:
    import ray.train
    import ray.train.torch
    from sklearn.metrics import f1_score
    from transformers import AutoTokenizer

    from student.data import class_weights, length_grouped_batches
    from student.model import LRKDStudent, StudentConfig, logit_kd_loss, lrkd_loss

    settings = StudentTrainConfig(**cfg["settings"])
    variant = Variant(**job["variant"])
    data = cfg["datasets"][job["data"]]
    out_dir = Path(job["out_dir"])
    torch.manual_seed(variant.seed)
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    tok = AutoTokenizer.from_pretrained(cfg["encoder_path"])
    train, val = data["train"], data["val"]
    student_cfg = StudentConfig(labels=cfg["labels"], perspectives=cfg["perspectives"],
                                extractor=variant.extractor if variant.kind == "lrkd" else "none", mode=variant.mode,
                                latent_dim=settings.latent_dim, poly_codes=settings.poly_codes,
                                target_dim=int(train["targets"].shape[-1]), max_length=settings.max_length,
                                sep_token_id=tok.sep_token_id)
    model = LRKDStudent.from_encoder(cfg["encoder_path"], student_cfg)
    model.centroids.copy_(torch.tensor(data["centroids"]))
    start_epoch, best, history = 0, -1.0, []
    if resume:
        model.load_state_dict(resume["weights"])
        start_epoch, best, history = resume["epoch"] + 1, resume["best"], resume["history"]
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": variant.kind == "lrkd"})
    device = ray.train.torch.get_device()
    core = model.module if hasattr(model, "module") else model
    weights = class_weights(train["label"], len(cfg["labels"]), settings.class_weighting)
    weights = weights.to(device) if weights is not None else None
    encoder_ids = {id(p) for p in core.encoder.parameters()}
    groups = [{"params": [p for p in core.parameters() if id(p) in encoder_ids], "lr": settings.learning_rate},
              {"params": [p for p in core.parameters() if id(p) not in encoder_ids], "lr": settings.head_learning_rate}]
    opt = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    peaks = [g["lr"] for g in opt.param_groups]
    # epochs since the best one (history comes back with a resumed checkpoint)
    stale = len(history) - 1 - max(range(len(history)), key=lambda i: (history[i]["val_macro_f1"], -i)) if history else 0
    lengths = pair_lengths(tok, train, settings.max_length)
    steps_per_epoch = len(length_grouped_batches(lengths, settings.batch_size, world, 0)[0])
    total_steps = steps_per_epoch * settings.epochs
    warmup = max(1, round(settings.warmup_ratio * total_steps)) if settings.warmup_ratio > 0 else 0
    # the diagnostics batch: the first pairs with teacher targets (the same every epoch)
    with_targets = [i for i in range(len(lengths)) if train["target_mask"][i].sum() > 0] or list(range(len(lengths)))
    probe = _batches(train, with_targets[: settings.batch_size], tok, settings.max_length, device)
    for epoch in range(start_epoch, settings.epochs):
        t0 = time.time()
        diag = loss_diagnostics(core, probe, variant, settings.guidance, weights) if rank == 0 else {}
        model.train()
        mine = length_grouped_batches(lengths, settings.batch_size, world, variant.seed * 1000 + epoch)[rank]
        sums: dict[str, float] = {}
        steps = 0
        for i, idx in enumerate(mine):
            for group, peak in zip(opt.param_groups, peaks):
                group["lr"] = peak * _lr_factor(epoch * steps_per_epoch + i, total_steps, warmup)
            b = _batches(train, idx, tok, settings.max_length, device)
            out = model(b["input_ids"], b["attention_mask"], b.get("token_type_ids"))
            if variant.kind == "logit_kd":
                loss, parts = logit_kd_loss(out, b["label"], b["teacher_probs"], variant.kd_alpha,
                                            settings.kd_temperature, weights, b["has_votes"])
            else:
                loss, parts = lrkd_loss(core, out, b["label"], b["targets"], variant.lam, weights, b["target_mask"],
                                        settings.guidance)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
        val_out = predict(core, val, tok, settings.max_length, device=device)
        pred = val_out["probs"].argmax(-1)
        f1 = float(f1_score(val["label"].numpy(), pred.numpy(), average="macro", labels=list(range(len(cfg["labels"]))), zero_division=0))
        history.append({"epoch": epoch, "val_macro_f1": f1, **{f"train_{k}": v / max(steps, 1) for k, v in sums.items()},
                        **{f"diag_{k}": v for k, v in diag.items()}, "seconds": round(time.time() - t0, 1)})
        improved = f1 > best
        if improved:
            best, stale = f1, 0
        else:
            stale += 1
        done = stale >= settings.patience or epoch == settings.epochs - 1
        if rank == 0:
            print(f"[thinkbroad] student [{job['index']}/{len(cfg['jobs'])}] {variant.name} seed {variant.seed}: epoch "
                  f"{epoch + 1}/{settings.epochs}, val macro-F1 {f1:.3f}, {history[-1]['seconds']} s" + (", done" if done else ""), flush=True)
        metrics = {"job": variant.name, "seed": variant.seed, "epoch": epoch, "val_macro_f1": f1, "best_val_macro_f1": best}
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in core.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
                Path(tmp, "state.json").write_text(json.dumps({"job": job["out_dir"], "epoch": epoch, "best": best, "history": history}))
                if improved:
                    selection = {"epoch": epoch, "val_macro_f1": f1, "val_logits": val_out["logits"].tolist()}
                    _save_atomic(core, tok, out_dir / "best", selection)
                (out_dir / "history.json").write_text(json.dumps(history, indent=1))
                if done:  # before the report: a kill after it must not retrain this job
                    (out_dir / TRAINED).write_text(json.dumps({"epochs": len(history), "best_val_macro_f1": best}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        if done:
            break


def _save_atomic(model, tok, path: Path, selection: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer=tok)
    (tmp / "selection.json").write_text(json.dumps(selection))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


@dataclass
class StudentJob:
    """One student for `train_students`: the variant, its output folder, and the key of its data in `datasets`."""

    variant: Variant
    out_dir: str
    data: str


def train_students(jobs: list[StudentJob], datasets: dict[str, dict], settings: StudentTrainConfig, encoder_path: str,
                   labels: list[str], perspectives: list[str], storage: str | Path) -> None:
    """Train the jobs one after another in one Ray Train worker group (DDP over `settings.num_workers`).

    datasets: key -> {"train", "val" (example dicts), "centroids"}. A job whose folder has trained.json is
    skipped; rerunning the same jobs with the same `storage` resumes the interrupted one at its last epoch."""
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if all((Path(j.out_dir) / TRAINED).exists() for j in jobs):
        return
    for j in jobs:
        Path(j.out_dir).mkdir(parents=True, exist_ok=True)
    device = _device(settings.accelerator)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "jobs": [{"variant": asdict(j.variant), "out_dir": str(Path(j.out_dir).resolve()), "data": j.data, "index": i}
                     for i, j in enumerate(jobs, 1)],
            "datasets": datasets, "settings": settings.model_dump(), "encoder_path": str(Path(encoder_path).resolve()),
            "labels": labels, "perspectives": perspectives,
        },
        scaling_config=ScalingConfig(num_workers=settings.num_workers, use_gpu=device == "gpu",
                                     resources_per_worker=None if device == "gpu" else {"CPU": settings.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if device == "gpu" else "gloo"),
        run_config=RunConfig(name="students", storage_path=str(Path(storage).resolve()), checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()


def train_student(variant: Variant, settings: StudentTrainConfig, train: dict, val: dict, encoder_path: str,
                  labels: list[str], perspectives: list[str], centroids: list, out_dir: str | Path) -> list[dict]:
    """Train one variant into out_dir (rerunning resumes it). Returns the per-epoch history."""
    out = Path(out_dir)
    train_students([StudentJob(variant, str(out), "data")], {"data": {"train": train, "val": val, "centroids": centroids}},
                   settings, encoder_path, labels, perspectives, out / "ray")
    return json.loads((out / "history.json").read_text())
