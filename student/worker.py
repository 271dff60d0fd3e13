"""The training worker of `student.train`: each Ray Train worker runs the jobs it is given one after another
(`train_loop`), each job streaming its examples (student/stream.py), validating across the workers and
checkpointing every `checkpoint_steps` steps and at each epoch's end; the best epoch is saved as a student folder."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from student.train import TRAINED, VAL_LOGITS, StudentTrainConfig, Variant, perspective_mask


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up to the peak, then linear decay to 0 at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(total - warmup, 1))


def share(pair_ids: list[str], world: int, rank: int) -> np.ndarray:
    """The rows of a validation batch this rank scores: a stable hash of the pair id, so every rank sees the same
    assignment whatever order the rows arrive in."""
    return np.array([zlib.crc32(p.encode()) % world == rank for p in pair_ids], dtype=bool)


def _lockstep(batches, device):
    """Yields batches while every rank has one (one tiny all-reduce per step): DDP's gradient all-reduce would
    hang if one rank ran a step the others do not."""
    import torch.distributed as dist

    it = iter(batches)
    while True:
        b = next(it, None)
        if dist.is_available() and dist.is_initialized():
            flag = torch.tensor([0 if b is None else 1], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            if flag.item() == 0:
                return
        elif b is None:
            return
        yield b


def train_loop(cfg: dict) -> None:
    """Ray Train worker: the jobs one after another in one worker group (starting a group costs ~20 s), each
    scored on its validation and test rows once trained, when it asks to be. A job with trained.json in its folder is
    trained; the checkpoint names the job (folder and key) it belongs to, which
    resumes there: weights, optimizer, the epoch and step reached, the epoch's running sums."""
    import ray.train
    import ray.train.torch

    from student import checkpoint as ckpt
    from student.score import SCORED, score_on_worker

    found, state = ray.train.get_checkpoint(), None
    if found:
        with found.as_directory() as d:
            state = ckpt.load(d)
    context, device = ray.train.get_context(), ray.train.torch.get_device()
    if device.type == "cpu":  # float sums depend on the thread count: fixed per worker, scoring-only resumes too
        torch.set_num_threads(StudentTrainConfig(**cfg["settings"]).cpus_per_worker)
    for job in cfg["jobs"]:
        if not (Path(job["out_dir"]) / TRAINED).exists():
            mine = state and state["job"] == job["out_dir"] and state.get("key") == job["key"]
            _train_job(cfg, job, state if mine else None)
        if job.get("score") and not (Path(job["out_dir"]) / SCORED).exists():
            score_on_worker(job, context.get_world_rank(), context.get_world_size(), device)


def _validate(model, folder: str, tok, settings: "StudentTrainConfig", rank: int, world: int, device) -> tuple[list, np.ndarray, np.ndarray]:
    """This rank's share of the validation rows, predicted, then gathered from every rank: (pair ids, logits,
    gold labels), sorted by pair id, identical on every rank."""
    import torch.distributed as dist

    from student.predict import predict
    from student.stream import validation_rows

    ids, logits, gold = [], [], []
    for table in validation_rows(folder, max(settings.batch_size * 16, 256)):
        mine = table.filter(pa.array(share(table.column("pair_id").to_pylist(), world, rank)))
        if mine.num_rows:
            out = predict(model, mine, tok, settings.max_length, batch_size=max(settings.batch_size, 64), device=device)
            ids += mine.column("pair_id").to_pylist()
            logits.append(out["logits"].numpy())
            gold.append(mine.column("label").to_numpy())
    parts = [(ids, np.concatenate(logits) if logits else np.zeros((0, len(model.cfg.labels)), np.float32),
              np.concatenate(gold) if gold else np.zeros(0, np.int64))]
    if world > 1 and dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, parts[0])
        parts = gathered
    all_ids = [p for part in parts for p in part[0]]
    order = np.argsort(np.array(all_ids, dtype=object), kind="stable") if all_ids else np.zeros(0, np.int64)
    return ([all_ids[i] for i in order], np.concatenate([p[1] for p in parts])[order], np.concatenate([p[2] for p in parts])[order])


def _step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """torch's seed for one training step (dropout): from (seed, epoch, step, rank), whatever ran before."""
    from student.stream import rng

    return int(rng(seed, 3, epoch, step, rank).integers(2**62))


def _train_job(cfg: dict, job: dict, resume: dict | None) -> None:
    import ray.train
    import ray.train.torch
    from sklearn.metrics import f1_score
    from transformers import AutoTokenizer

    from student import checkpoint as ckpt
    from student.data import Collator, class_weights
    from student.diagnostics import loss_diagnostics
    from student.model import LRKDStudent, StudentConfig, logit_kd_loss, lrkd_loss
    from pairs.parquet import parquet_files
    from student.stream import EpochPlan, epoch_batches

    settings = StudentTrainConfig(**cfg["settings"])
    variant = Variant(**job["variant"])
    data = cfg["data"][job["data"]]
    out_dir = Path(job["out_dir"])
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    device = ray.train.torch.get_device()  # train_loop fixed torch's thread count on CPU
    torch.manual_seed(variant.seed)
    tok = AutoTokenizer.from_pretrained(cfg["encoder_path"])
    n_labels, k = len(cfg["labels"]), len(cfg["perspectives"])
    student_cfg = StudentConfig(labels=cfg["labels"], perspectives=cfg["perspectives"],
                                extractor=variant.extractor if variant.kind == "lrkd" else "none", mode=variant.mode,
                                latent_dim=settings.latent_dim, poly_codes=settings.poly_codes,
                                target_dim=int(data["target_dim"]), max_length=settings.max_length,
                                sep_token_id=tok.sep_token_id, segment_ids=settings.segment_ids)
    model = LRKDStudent.from_encoder(cfg["encoder_path"], student_cfg)
    model.centroids.copy_(torch.tensor(data["centroids"]))
    start_epoch, start_step, best, history, running = 0, 0, -1.0, [], None
    if resume:
        model.load_state_dict(resume["weights"])
        start_epoch, start_step, best, history = resume["epoch"], resume["step"], resume["best"], resume["history"]
        running = resume.get("running")
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": variant.kind == "lrkd"})
    core = model.module if hasattr(model, "module") else model
    weights = class_weights(data["label_counts"], n_labels, settings.class_weighting)
    weights = weights.to(device) if weights is not None else None
    encoder_ids = {id(p) for p in core.encoder.parameters()}
    groups = [{"params": [p for p in core.parameters() if id(p) in encoder_ids], "lr": settings.learning_rate},
              {"params": [p for p in core.parameters() if id(p) not in encoder_ids], "lr": settings.head_learning_rate}]
    opt = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    peaks = [g["lr"] for g in opt.param_groups]
    if resume and resume.get("optimizer") is not None:
        ckpt.load_optimizer(opt, resume["optimizer"], resume["param_groups"])
    # epochs since the best one (history comes back with a resumed checkpoint)
    stale = len(history) - 1 - max(range(len(history)), key=lambda i: (history[i]["val_macro_f1"], -i)) if history else 0
    files = parquet_files(data["train"])
    plan = EpochPlan(settings.batch_size, settings.length_window, max(settings.shuffle_buffer, settings.batch_size * settings.length_window))
    per_epoch = plan.steps(data["rows"], world)
    total_steps = per_epoch * settings.epochs
    warmup = max(1, round(settings.warmup_ratio * total_steps)) if settings.warmup_ratio > 0 else 0
    # the diagnostics batch: the first pairs with teacher targets (the same every epoch), written by the stage
    keep = torch.from_numpy(perspective_mask(variant.target_perspectives, cfg["perspectives"]))
    collate = Collator(tok, settings.max_length, n_labels, k, settings.batch_size, sort=False)
    probe = collate(pq.read_table(data["probe"]))[0]
    probe.pop("rows")
    probe["target_mask"] = probe["target_mask"] * keep
    probe = _to(probe, device)

    def report(metrics: dict, state: dict, extra=None) -> None:
        """A checkpoint of the whole training state (rank 0 writes it; every rank reports)."""
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                ckpt.save(tmp, core, opt, {"job": job["out_dir"], "key": job["key"], "best": best, "history": history} | state)
                if extra:
                    extra()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        if cfg.get("crash_at") == [job["index"], state["epoch"] * per_epoch + state["step"]]:
            raise RuntimeError(f"injected fault after step {cfg['crash_at'][1]} (tests: resume equals uninterrupted)")

    for epoch in range(start_epoch, settings.epochs):
        t0 = time.time()
        if running and epoch == start_epoch and start_step:
            sums, steps, pairs, diag, seconds = running["sums"], start_step, running["pairs"], running["diag"], running["seconds"]
        else:
            diag = loss_diagnostics(core, probe, variant, settings.guidance, weights) if rank == 0 else {}
            sums, steps, pairs, seconds = {}, 0, 0, 0.0
        model.train()
        stream = epoch_batches(files, plan, variant.seed, epoch, rank, world, skip=steps)
        for rows in _lockstep(stream, device):
            global_step = epoch * per_epoch + steps
            for group, peak in zip(opt.param_groups, peaks):
                group["lr"] = peak * _lr_factor(global_step, total_steps, warmup)
            torch.manual_seed(_step_seed(variant.seed, epoch, steps, rank))  # dropout
            b = collate(rows)[0]
            b.pop("rows")
            b["target_mask"] = b["target_mask"] * keep
            b = _to(b, device)
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
            pairs += int(b["label"].shape[0])
            for key, v in parts.items():
                sums[key] = sums.get(key, 0.0) + v
            if settings.checkpoint_steps and steps % settings.checkpoint_steps == 0 and steps < per_epoch:
                running = {"sums": sums, "pairs": pairs, "diag": diag, "seconds": seconds + time.time() - t0}
                report({"job": variant.name, "seed": variant.seed, "epoch": epoch, "step": steps},
                       {"epoch": epoch, "step": steps, "running": running})
        seconds += time.time() - t0
        val_ids, val_logits, val_gold = _validate(core, data["val"], tok, settings, rank, world, device)
        f1 = float(f1_score(val_gold, val_logits.argmax(-1), average="macro", labels=list(range(n_labels)), zero_division=0))
        history.append({"epoch": epoch, "val_macro_f1": f1, **{f"train_{key}": v / max(steps, 1) for key, v in sums.items()},
                        **{f"diag_{key}": v for key, v in diag.items()}, "steps": steps, "train_pairs": pairs * world,
                        "train_seconds": round(seconds, 2), "seconds": round(time.time() - t0, 1)})
        improved = f1 > best
        if improved:
            best, stale = f1, 0
        else:
            stale += 1
        done = stale >= settings.patience or epoch == settings.epochs - 1
        if rank == 0:
            print(f"[thinkbroad] student [{job['index']}/{len(cfg['jobs'])}] {variant.name} seed {variant.seed}: epoch "
                  f"{epoch + 1}/{settings.epochs}, val macro-F1 {f1:.3f}, {history[-1]['seconds']} s "
                  f"({pairs * world / max(seconds, 1e-9):.0f} pairs/s)" + (", done" if done else ""), flush=True)

        def outputs() -> None:
            if improved:
                logits = pa.table({"pair_id": pa.array(val_ids, pa.string()),
                                   "logits": pa.FixedSizeListArray.from_arrays(pa.array(val_logits.reshape(-1)), n_labels)})
                _save_atomic(core, tok, out_dir / "best", {"epoch": epoch, "val_macro_f1": f1, "val_pairs": len(val_ids)}, logits)
            (out_dir / "history.json").write_text(json.dumps(history, indent=1))
            if done:  # before the report: a kill after it must not retrain this job
                (out_dir / TRAINED).write_text(json.dumps({"epochs": len(history), "best_val_macro_f1": best}))

        report({"job": variant.name, "seed": variant.seed, "epoch": epoch, "val_macro_f1": f1, "best_val_macro_f1": best},
               {"epoch": epoch + 1, "step": 0, "running": None}, outputs)
        running = None
        if done:
            break


def _save_atomic(model, tok, path: Path, selection: dict, val_logits: pa.Table) -> None:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer=tok)
    (tmp / "selection.json").write_text(json.dumps(selection))
    pq.write_table(val_logits, tmp / VAL_LOGITS)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
