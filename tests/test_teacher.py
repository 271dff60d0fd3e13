"""Teacher training on a tiny random Qwen2: masking, SFT/DPO under Ray Train + DeepSpeed, export, resume."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from teacher.config import DPOConfig, SFTConfig
from teacher.train import TrainJob, build_trainer, train_teacher
from teacher_fixtures import write_dpo, write_sft

SMOKE_DIST = {"num_workers": 2, "zero_stage": 2}


def sft_settings(**kw):
    base = dict(distributed=SMOKE_DIST, learning_rate=1e-3, max_steps=8, per_device_batch_size=2, max_length=1024, save_steps=4)
    return SFTConfig(**{**base, **kw}).model_dump()


def test_sft_masks_prompt_tokens_and_trains_on_completion(tmp_path, tiny_qwen2):
    data = write_sft(tmp_path / "sft.parquet", n=4)
    job = TrainJob("sft", str(data), tiny_qwen2, str(tmp_path), sft_settings(distributed={"num_workers": 1, "zero_stage": 0}))
    trainer, tok = build_trainer(job.__dict__, "cpu", str(tmp_path / "hf"))
    ex = trainer.train_dataset[0]
    prompt_ids = tok.apply_chat_template(ex["prompt"], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    n = len(prompt_ids)
    assert ex["input_ids"][:n] == prompt_ids
    assert set(ex["labels"][:n]) == {-100}, "prompt tokens must not be trained on"
    assert ex["labels"][n:] == ex["input_ids"][n:], "every completion token is trained on"
    trained = tok.decode([t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100])
    assert trained.startswith('{"rationale": "The query asks for') and '"label": "' in trained


def test_a_cpu_worker_starts_deepspeed_without_compiling_its_shm_op(tmp_path):
    """DeepSpeed's CPU backend would compile its shared-memory all-reduce (only its inference path uses it) into
    TORCH_EXTENSIONS_DIR as the process group starts: 25-45 s of C++ on 2 cores. The worker's init skips it."""
    from hardware.runtime import free_port

    script = ("from teacher.placement import init_worker\ninit_worker('cpu')\n"
              "from deepspeed.comm import comm\nprint('SHM_OP', comm.cdb.shm_comm_op, comm.cdb.get_world_size())\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "SHM_OP None 1" in proc.stdout, proc.stderr[-3000:]
    assert not (tmp_path / "ext").exists() and "built successfully" not in proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def straight_sft(tmp_path_factory, tiny_qwen2, ray_local) -> dict:
    """One uninterrupted SFT run on two workers (ZeRO-2, a checkpoint every 2 steps): the ZeRO-2 test checks it, the
    resume test compares a killed and resumed run with it (one SFT run fewer in the suite)."""
    tmp = tmp_path_factory.mktemp("sft")
    data, settings = write_sft(tmp / "sft.parquet"), sft_settings(save_steps=2)
    result = train_teacher(TrainJob("sft", str(data), tiny_qwen2, str(tmp / "sft"), settings))
    return {"data": data, "settings": settings, "result": result, "out": tmp / "sft"}


@pytest.mark.ray
def test_sft_on_two_workers_zero2_loss_falls_and_export_loads_in_vllm(straight_sft):
    result = straight_sft["result"]
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    assert result.steps == 8 and len(losses) == 8
    assert losses[-1] < losses[0] - 0.2, losses
    model = straight_sft["out"] / "model"
    assert (model / "model.safetensors").exists() and (model / "tokenizer.json").exists()
    assert not list(model.glob("*.bin")) and not (model / "adapter_config.json").exists()
    script = (
        "import os\nos.environ['VLLM_CPU_KVCACHE_SPACE']='1'\n"
        "os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']='0'\n"  # the engine in this process, as the stages run it
        "from vllm import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM(model={str(model)!r}, enforce_eager=True, max_model_len=1024, seed=0)\n"
        "    out = llm.generate(['Query: usb cable'], SamplingParams(max_tokens=8, temperature=0))\n"
        "    print('GENERATED', len(out[0].outputs[0].token_ids))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "GENERATED 8" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.ray
def test_sft_with_lora_exports_merged_weights(tmp_path, tiny_qwen2, ray_local):
    from safetensors.torch import load_file

    data = write_sft(tmp_path / "sft.parquet", n=8)
    settings = sft_settings(max_steps=4, lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}, save_steps=10)
    train_teacher(TrainJob("sft", str(data), tiny_qwen2, str(tmp_path / "sft"), settings))
    base = load_file(os.path.join(tiny_qwen2, "model.safetensors"))
    merged = load_file(str(tmp_path / "sft" / "model" / "model.safetensors"))
    assert set(merged) == set(base), "a merged export has exactly the base model's tensors (no lora_ weights)"
    changed = [k for k in base if not (base[k] == merged[k]).all()]
    assert any("q_proj" in k for k in changed), "LoRA updates were merged into the base weights"


@pytest.mark.ray
def test_dpo_reward_margin_rises(tmp_path, tiny_qwen2, ray_local):
    data = write_dpo(tmp_path / "dpo.parquet")
    settings = DPOConfig(distributed=SMOKE_DIST, learning_rate=1e-3, max_steps=6, per_device_batch_size=2,
                         max_length=1024, save_steps=3).model_dump()
    result = train_teacher(TrainJob("dpo", str(data), tiny_qwen2, str(tmp_path / "dpo"), settings))
    margins = [h["rewards/margins"] for h in result.log_history if "rewards/margins" in h]
    assert len(margins) == 6
    assert sum(margins[-2:]) / 2 > sum(margins[:2]) / 2 + 0.1, margins
    assert (tmp_path / "dpo" / "model" / "model.safetensors").exists()


@pytest.mark.ray
def test_resume_after_kill_matches_uninterrupted_loss_trajectory(tmp_path, tiny_qwen2, ray_local, straight_sft):
    from hardware.runtime import HEALTH_CHECK, ensure_ray

    data, settings, straight = straight_sft["data"], straight_sft["settings"], straight_sft["result"]
    expected = {h["step"]: h["loss"] for h in straight.log_history if "loss" in h}
    ray_local.shutdown()  # the run to be killed starts its own Ray, as a user's process would

    out = tmp_path / "killed"
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(TrainJob("sft", str(data), tiny_qwen2, str(out), settings).__dict__))
    cmd = [sys.executable, str(ROOT / "tests" / "teacher_fixtures.py"), str(job_file)]
    # a worker's report waits for the controller's next poll of the group (Ray Train's result queue holds one): at
    # Ray's 2 s the checkpoints are a poll apart and the kill lands between two of them; at a local instance's 0.25 s
    # (hardware/runtime.py) all 8 tiny steps could be done before the kill arrives
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, HEALTH_CHECK: "2.0"}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(list((out / "ray" / "sft").glob("checkpoint_*"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists(), "killed too late: training had finished"
    assert list((out / "ray" / "sft").glob("checkpoint_*")), "no checkpoint before the kill"

    ensure_ray()
    resumed = train_teacher(TrainJob("sft", str(data), tiny_qwen2, str(out), settings))
    assert straight.resumed_from_step is None
    assert resumed.resumed_from_step is not None and 2 <= resumed.resumed_from_step < 8, "it must continue, not restart"
    got = {h["step"]: h["loss"] for h in resumed.log_history if "loss" in h}
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-3, abs=1e-3), (step, got, expected)
