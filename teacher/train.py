"""Teacher SFT and DPO: TRL trainers inside a Ray Train `TorchTrainer`, DeepSpeed ZeRO from config.

Layout of a training folder (`out_dir`, e.g. RUN_DIR/teacher/sft):
  ray/<kind>/...        Ray Train run state and checkpoints (rerunning the same folder resumes from the latest)
  hf/<attempt>/         the HF Trainer's output dir for one attempt (its checkpoints are reported to Ray Train)
  final/                the trained model as the trainer saved it (LoRA adapter or full weights)
  model/                the export: a plain HF folder, LoRA merged, safetensors, tokenizer — what vLLM loads
  log_history.json      the trainer's log (loss, and for DPO rewards/margins) per step, across resumes
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from teacher import placement
from teacher.config import DistributedSettings, DPOConfig, SFTConfig


@dataclass(frozen=True)
class TrainJob:
    kind: str  # "sft" or "dpo"
    dataset_path: str  # Parquet: prompt/completion (sft) or prompt/chosen/rejected (dpo), conversational
    base_model: str  # HF folder to start from
    out_dir: str
    settings: dict  # SFTConfig / DPOConfig as a dict


@dataclass
class TrainResult:
    model_dir: str
    log_history: list[dict]
    steps: int
    resumed_from_step: int | None  # set when this call continued an interrupted run
    peak_memory: dict  # rank -> {"host_peak_rss_mb": ..., ("gpu_peak_allocated_mb": ...)}


def _settings(job: dict):
    return (SFTConfig if job["kind"] == "sft" else DPOConfig)(**job["settings"])


def _trl_args(job: dict, settings, device: str, hf_dir: str):
    """TRL's config for this job: our settings, plus the device-dependent part from placement."""
    import trl

    common = dict(
        output_dir=hf_dir,
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        warmup_steps=settings.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        weight_decay=settings.weight_decay,
        logging_steps=settings.logging_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        max_length=settings.max_length,
        seed=settings.seed,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
        gradient_checkpointing=settings.gradient_checkpointing,
        **placement.trainer_kwargs(settings.distributed, device),
    )
    if job["kind"] == "sft":
        return trl.SFTConfig(**common, completion_only_loss=True)
    return trl.DPOConfig(**common, beta=settings.beta, loss_type=settings.loss_type)


def _peft_config(settings):
    if not settings.lora.enabled:
        return None
    from peft import LoraConfig

    lora = settings.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type="CAUSAL_LM")


def build_trainer(job: dict, device: str, hf_dir: str, callbacks=()):
    """The TRL trainer for a job, on this process. Used by the Ray worker loop (and by tests, to inspect data)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = _settings(job)
    args = _trl_args(job, settings, device, hf_dir)
    tok = AutoTokenizer.from_pretrained(job["base_model"])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(job["base_model"], dtype=placement.model_dtype(settings.distributed, device))
    data = Dataset.from_parquet(job["dataset_path"])
    if job["kind"] == "sft":
        from trl import SFTTrainer

        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             peft_config=_peft_config(settings), callbacks=list(callbacks))
    else:
        from trl import DPOTrainer

        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=data, processing_class=tok,
                             peft_config=_peft_config(settings), callbacks=list(callbacks))
    return trainer, tok


def _train_loop(job: dict) -> None:
    import ray.train
    import torch
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer

    device = job["device"]
    placement.init_worker(device)
    rank = ray.train.get_context().get_world_rank()
    trainer, tok = build_trainer(job, device, job["hf_dir"], callbacks=[RayTrainReportCallback()])
    trainer = prepare_trainer(trainer)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            hf_checkpoint = os.path.join(d, RayTrainReportCallback.CHECKPOINT_NAME)
            step = json.loads(Path(hf_checkpoint, "trainer_state.json").read_text())["global_step"]
            if rank == 0:
                print(f"[thinkbroad] {job['kind']}: resuming from the checkpoint at step {step}", flush=True)
                Path(job["out_dir"], "resumed_from_step").write_text(str(step))
            trainer.train(resume_from_checkpoint=hf_checkpoint)
    else:
        trainer.train()
    Path(job["out_dir"], f"memory_rank{rank}.json").write_text(json.dumps(placement.peak_memory_mb(device)))
    final = os.path.join(job["out_dir"], "final")
    trainer.save_model(final)  # collective under ZeRO-3: every rank takes part
    torch.distributed.barrier()
    if rank == 0:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        # Under ZeRO-3 the trainer registers a global DeepSpeed config that makes from_pretrained build models
        # inside the collective zero.Init: a rank-0-only export would wait forever. Training is over; drop it.
        unset_hf_deepspeed_config()
        tok.save_pretrained(final)
        history = trainer.state.log_history
        Path(job["out_dir"], "log_history.json").write_text(json.dumps(history, indent=1))
        export_model(final, job["base_model"], os.path.join(job["out_dir"], "model"))
    torch.distributed.barrier()


def export_model(trained_dir: str, base_model: str, export_dir: str) -> None:
    """A plain HF folder vLLM can load: LoRA merged into the base, weights in the base model's dtype, safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(AutoConfig.from_pretrained(base_model), "dtype", None) or torch.float32
    if Path(trained_dir, "adapter_config.json").exists():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, trained_dir).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=torch.float32)
    tmp = Path(export_dir).with_name(Path(export_dir).name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(dtype).save_pretrained(str(tmp), safe_serialization=True)
    AutoTokenizer.from_pretrained(trained_dir).save_pretrained(str(tmp))
    shutil.rmtree(export_dir, ignore_errors=True)
    os.replace(tmp, export_dir)


def train_teacher(job: TrainJob) -> TrainResult:
    """Run one SFT or DPO job on the current Ray cluster; rerunning on the same out_dir resumes it."""
    import ray
    from ray.train import CheckpointConfig, RunConfig
    from ray.train.torch import TorchTrainer

    settings = _settings(asdict(job))
    dist: DistributedSettings = settings.distributed
    device = placement.resolve_device(dist.accelerator, ray.cluster_resources().get("GPU", 0))
    out = Path(job.out_dir).resolve()
    for stale in [out / "resumed_from_step", *out.glob("memory_rank*.json")]:
        stale.unlink(missing_ok=True)
    # absolute paths: Ray Train workers run in their own working directory
    loop_config = {**asdict(job), "dataset_path": str(Path(job.dataset_path).resolve()),
                   "base_model": str(Path(job.base_model).resolve()), "out_dir": str(out), "device": device,
                   "hf_dir": str(out / "hf" / uuid.uuid4().hex[:8])}
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        scaling_config=placement.scaling_config(dist, device),
        torch_config=placement.torch_config(device),
        run_config=RunConfig(
            name=job.kind,
            storage_path=str(out / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=settings.save_total_limit),
        ),
    )
    trainer.fit()
    shutil.rmtree(out / "hf", ignore_errors=True)
    history = json.loads((out / "log_history.json").read_text())
    steps = max((h.get("step", 0) for h in history), default=0)
    resumed = out / "resumed_from_step"
    return TrainResult(model_dir=str(out / "model"), log_history=history, steps=steps,
                       resumed_from_step=int(resumed.read_text()) if resumed.exists() else None,
                       peak_memory={p.stem.removeprefix("memory_rank"): json.loads(p.read_text())
                                    for p in sorted(out.glob("memory_rank*.json"))})
