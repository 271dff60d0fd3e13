"""`thinkbroad plan`: the pre-flight check of a GPU run, with config-only models and made-up cluster shapes (no Ray,
no weights). The paper config must fit 8 x 80 GB with ZeRO-3 and be refused with ZeRO-2 full fine-tuning; the ZeRO
numbers must be DeepSpeed's own; TRL's fused LM head is counted as the installed TRL builds it; a GPU kind without a
published generation rate gets one derived from its KV cache; the hours are shown across teacher accuracies; the price
carries its month; the local config must plan on this machine."""
import datetime
import json
from pathlib import Path

import pytest

from conftest import ROOT
from hardware.gpu import GPUS, kind_from_name, parse_nvidia_smi
from teacher.placement import model_states_bytes
from workflows.cli import main
from workflows.config import load_config
from workflows.cluster import PlanError, cluster_from_flags, cluster_from_yaml, this_machine
from workflows.plan import ACCURACIES, make_plan, price_line, render
from workflows.plan.timing import decode_roofline
from workflows.plan.training import FUSED_TOKENS, FUSED_VOCAB, fused_head_bytes
from workflows.shapes import ShapeError, model_shape, safetensors_counts, shape_from_config

PAPER = ROOT / "configs" / "paper.yaml"
QWEN3_14B = "/mnt/shared/models/Qwen3-14B"


def _paper(*overrides: str):
    return load_config(PAPER, list(overrides))


def _eight_by_80():
    return cluster_from_flags(1, 8, 80)


def _plan(cfg, tmp_path, cluster=None, pairs=None):
    return make_plan(cfg, tmp_path / "run", cluster or _eight_by_80(), pairs)


def test_paper_config_fits_8x80_with_zero3(tmp_path):
    plan = _plan(_paper(), tmp_path)
    assert [s.name for s in plan.stages if not s.fits] == []
    teacher = plan.shapes["teacher"]
    assert teacher.source.startswith("plan.models") and round(teacher.params / 1e9, 2) == 14.77
    gen = plan.stage("generate").checks[0]
    # Qwen3-14B: 2 x 40 layers x 8 KV heads x 128 x 2 bytes = 160 KiB of KV cache per token
    assert teacher.kv_bytes_per_token(2) == 160 * 1024 and "160 KiB per token" in gen.lines[1]
    sft = plan.stage("sft").checks[0]
    assert sft.device == "gpu" and 35 < sft.need_gib < 45 and sft.have_gib == 80
    embedder = next(c for c in plan.stage("distill").checks if c.what == "rationale embedder")
    assert embedder.device == "gpu" and embedder.placement.startswith("8 Ray Data actor(s) x 1 GPU")
    text = render(plan, "configs/paper.yaml")
    assert "DOES NOT FIT" not in text and "| **total** |" in text and "$" in text


def test_paper_config_refused_with_zero2_full_fine_tuning(tmp_path):
    plan = _plan(_paper("sft.distributed.zero_stage=2", "dpo.distributed.zero_stage=2"), tmp_path)
    dpo = plan.stage("dpo")
    assert not dpo.fits
    bad = next(c for c in dpo.checks if not c.fits)
    # DeepSpeed's ZeRO-2 estimate (2P + 18P/G) plus the reference model TRL keeps whole under ZeRO-2
    assert bad.need_gib > 80 and "ZeRO-2 full fine-tuning of 14.8B parameters" in bad.problem
    assert "set dpo.distributed.zero_stage: 3" in bad.problem and "enable dpo.lora" in bad.problem
    assert "DOES NOT FIT" in dpo.verdict()
    # LoRA brings it back under the GPUs' memory
    lora = _plan(_paper("dpo.distributed.zero_stage=2", "dpo.lora.enabled=true"), tmp_path)
    assert lora.stage("dpo").fits


def test_engines_times_tensor_parallel_larger_than_the_gpus_is_refused(tmp_path):
    plan = _plan(_paper("generation.gpus_per_engine=2"), tmp_path)
    gen = plan.stage("generate")
    assert not gen.fits
    assert "concurrency 8 x gpus_per_engine 2 = 16 GPUs, the cluster has 8: set generation.concurrency: 4" in gen.checks[0].problem
    fixed = _plan(_paper("generation.gpus_per_engine=2", "generation.concurrency=4"), tmp_path)
    assert fixed.stage("generate").fits
    spans = _plan(_paper("generation.gpus_per_engine=16", "generation.concurrency=1"), tmp_path, cluster_from_flags(2, 8, 80))
    assert "spans nodes of 8 GPUs" in spans.stage("generate").checks[0].problem
    workers = _plan(_paper("sft.distributed.num_workers=16"), tmp_path)
    assert "num_workers 16 > the cluster's 8 GPUs" in workers.stage("sft").checks[0].problem


def test_gpu_stages_on_a_machine_without_gpus_are_refused(tmp_path):
    plan = _plan(_paper(), tmp_path, cluster_from_flags(1, 0, None, cpus_per_node=8))
    assert not plan.stage("generate").fits and "has no GPU" in plan.stage("generate").checks[0].problem


def test_a_teacher_too_large_for_one_gpu_asks_for_tensor_parallel(tmp_path):
    big = {"model_type": "qwen3", "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
           "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 29568, "vocab_size": 151936}
    cfg = _paper()
    cfg.plan.models[QWEN3_14B] = big  # ~70B parameters under the same name
    gen = _plan(cfg, tmp_path).stage("generate").checks[0]
    # 73B in bf16 is 135 GiB: no KV cache on one 80 GB GPU; split over 2, a little over 1 GiB of KV per GPU is left
    assert not gen.fits and "set generation.gpus_per_engine: 2 (tensor parallel) and generation.concurrency: 4" in gen.problem
    cfg.generation.gpus_per_engine, cfg.generation.concurrency = 2, 4
    assert _plan(cfg, tmp_path).stage("generate").fits
    cfg.generation.engine["max_model_len"] = 16384  # more KV than TP 2 leaves: TP 4 then
    assert "set generation.gpus_per_engine: 4 (tensor parallel) and generation.concurrency: 2" in \
        _plan(cfg, tmp_path).stage("generate").checks[0].problem


@pytest.mark.parametrize("stage,offload", [(2, False), (2, True), (3, False), (3, True)])
@pytest.mark.parametrize("gpus,nodes", [(8, 1), (4, 2), (1, 1)])
def test_zero_numbers_equal_deepspeeds_estimator(stage, offload, gpus, nodes):
    """The mirrored formulas against DeepSpeed's own functions, on Qwen3-14B's counts and on odd ones."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    shape = shape_from_config(QWEN3_14B, _paper().plan.models[QWEN3_14B], "test", "test")
    for p, largest in [(shape.params, shape.largest_layer), (1_234_567_891, 98_765_431)]:
        ours = model_states_bytes(stage, offload, p, largest, gpus, nodes)
        if stage == 2:
            cpu, gpu = estimate_zero2_model_states_mem_needs(p, gpus, nodes, cpu_offload=offload)
        else:
            cpu, gpu, _ = estimate_zero3_model_states_mem_needs(p, largest, gpus, nodes, cpu_offload=offload,
                                                                cpu_offload_params=offload)
        assert ours == (gpu, cpu)


def test_the_plan_uses_deepspeeds_number_for_the_paper_teacher(tmp_path):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    plan = _plan(_paper(), tmp_path)
    t = plan.shapes["teacher"]
    _, gpu, _ = estimate_zero3_model_states_mem_needs(t.params, t.largest_layer, 8, 1, cpu_offload=False, cpu_offload_params=False)
    assert f"model states {gpu / 2**30:.1f}" in plan.stage("sft").checks[0].lines[0]


TINY = {
    "qwen3": {"model_type": "qwen3", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 96, "vocab_size": 500, "tie_word_embeddings": False},
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 1, "intermediate_size": 96, "vocab_size": 500, "tie_word_embeddings": True},
    "llama": {"model_type": "llama", "hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 3,
              "num_key_value_heads": 1, "head_dim": 16, "intermediate_size": 80, "vocab_size": 300, "attention_bias": True},
    "bert": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "vocab_size": 400, "max_position_embeddings": 128, "type_vocab_size": 2},
    "xlm-roberta": {"model_type": "xlm-roberta", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64, "vocab_size": 400, "max_position_embeddings": 130, "type_vocab_size": 1},
}


def test_parameter_formulas_match_the_transformers_models_and_deepspeeds_count():
    """Counted by formula from config.json fields = the real transformers class built on the meta device, counted as
    DeepSpeed's estimators count it (deepspeed.runtime.zero.stage3.model_to_params: total, largest layer)."""
    import torch
    from deepspeed.runtime.zero.stage3 import model_to_params
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    for name, cfg in TINY.items():
        shape = shape_from_config(name, cfg, "test", "test")
        hf = AutoConfig.for_model(**cfg)
        with torch.device("meta"):
            model = (AutoModelForCausalLM if shape.decoder else AutoModel).from_config(hf)
        total = sum({id(p): p.numel() for p in model.parameters()}.values())  # tied weights once (meta has no data_ptr)
        _, largest = model_to_params(model)
        assert (shape.params, shape.largest_layer) == (total, largest), name


def test_shape_from_a_model_folder_reads_safetensors_headers(tiny_qwen2):
    folder = Path(tiny_qwen2)
    shape = model_shape("tiny-random-qwen2", folder, {})
    assert "safetensors headers" in shape.source
    by_formula = shape_from_config("x", json.loads((folder / "config.json").read_text()), "test", "test")
    assert shape.params == by_formula.params == safetensors_counts(folder)[0]


def test_a_model_neither_local_nor_in_plan_models_is_named_with_the_fix(tmp_path):
    with pytest.raises(ShapeError, match=r"'/nowhere/model' is not a folder with config.json.*plan.models"):
        model_shape("/nowhere/model", None, {})
    with pytest.raises(ShapeError, match=r"plan.models.m: missing hidden_size"):
        model_shape("m", None, {"m": {"model_type": "llama"}})


def test_cluster_yaml_is_read_from_its_instance_types():
    cluster = cluster_from_yaml(ROOT / "cluster.yaml")
    g = cluster.gpu_group
    assert (g.gpus, g.gpu.name, g.gpu_memory_gib, g.count, g.held, g.memory_gib) == (8, "A100-80G", 80, 4, 1, 1152)
    assert cluster.gpus == 32
    assert cluster.held_gpus(8) == 8 and cluster.held_gpus(0) == 8 and cluster.held_gpus(9) == 16
    with pytest.raises(PlanError, match="no available_node_types"):
        cluster_from_yaml(ROOT / "configs" / "smoke.yaml")


def test_local_config_plans_on_this_machine(tmp_path):
    cfg = load_config(ROOT / "configs" / "local.yaml")
    machine = this_machine()
    plan = make_plan(cfg, tmp_path / "run", machine)
    assert all(s.fits for s in plan.stages)
    checks = [c for s in plan.stages for c in s.checks]
    if not machine.gpus:
        assert {c.device for c in checks} == {"cpu"}
        assert all(w.gpus == 0 for s in plan.stages for w in s.work)
    assert plan.lengths.prompt_how == "tokenizer"  # SmolLM2's tokenizer is local
    assert "RAM" in render(plan, "configs/local.yaml")


def test_a_finished_run_replaces_the_assumptions(tmp_path):
    cfg = load_config(ROOT / "configs" / "local.yaml")
    run = tmp_path / "run"
    (run / "mpcot").mkdir(parents=True)
    stats = {"overall": {"accuracy": 0.25}, "per_perspective": {p.name: {"mean_completion_tokens": 40.0} for p in cfg.perspectives},
             "throughput": {"completion_tokens_per_s": 123.0}}
    (run / "mpcot" / "stats.json").write_text(json.dumps(stats))
    (run / "mpcot" / "manifest.json").write_text(json.dumps({"seconds": 360}))
    plan = make_plan(cfg, run, this_machine())
    assert plan.accuracy[0] == 0.25 and plan.lengths.completion == 40.0
    assert plan.stage("generate").measured_s == 360
    assert any("123 completion tokens/s" in n for n in plan.notes)
    assert "0.10 h" in render(plan, "configs/local.yaml")


def test_planning_a_data_set_that_is_not_here(tmp_path):
    cfg = _paper("data.path=/nowhere/esci.parquet")
    with pytest.raises(PlanError, match="--pairs"):
        _plan(cfg, tmp_path)
    plan = _plan(cfg, tmp_path, pairs=1000)
    assert plan.pairs.counts == {"train": 800, "val": 100, "test": 100} and "few-shot" in plan.pairs.source


def test_gpu_facts():
    assert parse_nvidia_smi("NVIDIA A100-SXM4-80GB, 81920\nNVIDIA H100 80GB HBM3, 81559\n")[1].memory_gib == pytest.approx(79.6, 0.01)
    assert kind_from_name("NVIDIA A100-SXM4-80GB") is GPUS["A100-80G"]
    assert kind_from_name("A100") is None and kind_from_name("A100", 40) is GPUS["A100-40G"]
    assert kind_from_name("NVIDIA H100 80GB HBM3") is GPUS["H100"]


def test_plan_command_prints_the_table(capsys):
    assert main(["plan", "--config", str(PAPER), "--nodes", "1", "--gpus-per-node", "8", "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    for stage in ("generate", "sft", "dpo", "teacher_eval", "distill"):
        assert f"\n{stage}" in out
    assert "| **total** |" in out and "assumptions:" in out
    assert main(["plan", "--config", str(PAPER), "--gpus-per-node", "8"]) == 2
    assert "--gpu-memory-gb" in capsys.readouterr().err


def test_run_refuses_a_stage_that_cannot_fit_before_starting_ray(tmp_path, capsys):
    import ray

    rc = main(["run", "--config", str(PAPER), "--run-dir", str(tmp_path / "run"), "--nodes", "1", "--gpus-per-node", "8",
               "--gpu-memory-gb", "80", "--set", "dpo.distributed.zero_stage=2"])
    err = capsys.readouterr().err
    assert rc == 2 and not ray.is_initialized()
    assert "dpo: DOES NOT FIT" in err and "set dpo.distributed.zero_stage: 3" in err and "generate: fits" in err
    assert "the plan refuses dpo" in err and "--no-plan" in err
    assert not (tmp_path / "run" / "mpcot").exists()  # no stage after prepare started


# ---------------------------------------------------------------- issue 23, item 8: the plan counts what it says


def test_trls_trainers_use_the_fused_lm_head_the_plan_counts():
    """The plan counts TRL's fused LM head (tile + fp32 gradients), not full logits and not Liger: this holds only while
    the installed TRL's SFT and DPO trainers install that head, with the tile the plan assumes."""
    import inspect

    from trl import DPOTrainer, SFTTrainer
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    assert (FUSED_TOKENS, FUSED_VOCAB) == (TOKEN_CHUNK_SIZE, _CHUNKED_LOGPROB_CHUNK_SIZE)
    for trainer in (SFTTrainer, DPOTrainer):
        source = inspect.getsource(trainer)
        assert "add_fused_lm_head(" in source and "fused_lm_head=True" in source, trainer.__name__


def test_the_fused_lm_head_never_builds_the_logits():
    """TRL's fused head on a tiny Qwen3 with a vocabulary wider than one tile, forward and backward on CPU: no tensor as
    large as the (tokens, vocab) logits is ever made; the largest is a tile or the weight's gradient."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl.trainer.utils import add_fused_lm_head

    vocab, batch, seq = 40_000, 2, 48
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**TINY["qwen3"], "vocab_size": vocab}))
    add_fused_lm_head(model)
    ids = torch.randint(0, vocab, (batch, seq))

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    with Largest():
        out = model(input_ids=ids, labels=ids, fused_lm_head=True)
        out.loss.backward()
    tokens = batch * (seq - 1)
    assert out.log_probs.shape == (batch, seq - 1) and torch.isfinite(out.loss)
    assert Largest.numel < tokens * vocab  # the logits were never built
    assert Largest.numel <= max(tokens * FUSED_VOCAB, vocab * TINY["qwen3"]["hidden_size"])
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def test_the_plan_counts_the_fused_lm_head(tmp_path):
    plan = _plan(_paper(), tmp_path)
    teacher = plan.shapes["teacher"]
    for kind in ("sft", "dpo"):
        check = plan.stage(kind).checks[-1]
        # 2 x 2048 positions (SFT batch 2; DPO batch 1 x chosen and rejected): a 4096 x 32768 bf16 tile, the hidden
        # states and their fp32 gradient, the fp32 gradient of the 151,936 x 5,120 head: 3.3 GiB, not the 1.2 GiB of
        # bf16 logits (2.3 in fp32) it never builds
        head = fused_head_bytes(teacher, 4096, 2, True)
        assert head["tile"] == 4096 * 32768 * 2 and head["head weight grad"] == 151_936 * 5120 * 4
        assert f"fused LM head {sum(head.values()) / 2**30:.1f}" in check.lines[0]
        assert "never builds" in check.lines[1] and "1.2 GiB in bf16, 2.3 upcast to fp32" in check.lines[1]
    assert 43 < plan.stage("sft").checks[0].need_gib < 44 and 48 < plan.stage("dpo").checks[-1].need_gib < 49
    # LoRA freezes the head: no fp32 weight gradient
    lora = _plan(_paper("sft.lora.enabled=true"), tmp_path).stage("sft").checks[0]
    assert "the head is frozen" in lora.lines[1]
    assert lora.need_gib < plan.stage("sft").checks[0].need_gib - 2.8
    text = render(plan, "configs/paper.yaml")
    assert "never builds the (batch, seq, vocab) logits" in text and "Liger is off" in text


def test_an_a100_40g_generation_rate_is_derived_from_its_kv_cache(tmp_path):
    cfg = _paper()
    assert "A100-40G" not in cfg.plan.throughput.generation_tokens_per_s  # nothing to copy
    forty = _plan(cfg, tmp_path, cluster_from_flags(1, 8, None, "A100-40G"), pairs=1_800_000)
    eighty = _plan(cfg, tmp_path, cluster_from_flags(1, 8, None, "A100-80G"), pairs=1_800_000)
    teacher, lengths = forty.shapes["teacher"], forty.lengths
    d40, d80 = (decode_roofline(cfg, teacher, GPUS[k], lengths) for k in ("A100-40G", "A100-80G"))
    # 0.9 x 40 GiB - 27.5 of weights - activations - runtime leaves ~5.3 GiB of KV: ~34.6k tokens, ~54 sequences of
    # prompt + answer at once (the 80 GB card runs max_num_seqs 256), on 1,555 GB/s instead of 2,039
    assert 5 < d40.kv_gib < 6 and d40.seqs == int(d40.kv_tokens // (lengths.prompt_mean + lengths.completion)) < d40.max_seqs
    assert d80.seqs == d80.max_seqs == 256
    rate40 = 3922 * d40.tokens_per_s / d80.tokens_per_s
    assert rate40 < 0.5 * 3922
    gen40, gen80 = forty.stage("generate").work[0], eighty.stage("generate").work[0]
    assert gen40.how.startswith(f"{rate40:,.0f} tokens/s per GPU (A100-40G, derived from A100-80G")
    assert gen80.how.startswith("3,922 tokens/s per GPU (A100-80G)")
    assert gen40.hours > 3 * gen80.hours
    assert any(n.startswith("A100-40G generation rate derived") and "sequences at once" in n for n in forty.notes)
    # a measured figure for the kind wins over the derivation
    cfg.plan.throughput.generation_tokens_per_s["A100-40G"] = 1500
    given = _plan(cfg, tmp_path, cluster_from_flags(1, 8, None, "A100-40G"), pairs=1_800_000)
    assert given.stage("generate").work[0].how == "1,500 tokens/s per GPU (A100-40G)"
    # a kind with no figure and no chip-mate with one is not estimated
    l40s = _plan(_paper(), tmp_path, cluster_from_flags(1, 4, None, "L40S"), pairs=1_800_000)
    assert l40s.stage("generate").work[0].hours is None


def test_hours_move_with_the_teacher_accuracy(tmp_path):
    plan = _plan(_paper(), tmp_path, cluster_from_yaml(ROOT / "cluster.yaml"), pairs=1_800_000)
    rows = {round(s.accuracy, 2): s for s in plan.sensitivity}
    assert set(ACCURACIES) <= set(rows) and plan.accuracy[0] == 0.6
    acc = sorted(rows)
    sft = [rows[a].stage_hours["sft"] for a in acc]
    dpo = [rows[a].stage_hours["dpo"] for a in acc]
    total = [rows[a].hours for a in acc]
    # more correct rationales: more SFT rows, fewer DPO conflicts and resampled pairs; DPO's rows cost more per row
    # (chosen + rejected, the reference forward), so the paper config's total falls as accuracy rises
    assert sft == sorted(sft) and dpo == sorted(dpo, reverse=True) and total == sorted(total, reverse=True)
    assert total[0] > total[-1]
    # the assumed row is the plan's own total, and any row equals a plan made at that accuracy
    assert rows[0.6].hours == pytest.approx(sum(st.hours or 0 for st in plan.stages))
    at_80 = _plan(_paper("plan.assume.teacher_accuracy=0.8"), tmp_path, cluster_from_yaml(ROOT / "cluster.yaml"), 1_800_000)
    assert rows[0.8].hours == pytest.approx(sum(st.hours or 0 for st in at_80.stages))
    text = render(plan, "configs/paper.yaml")
    assert "hours by the teacher's accuracy" in text and "| 60% * |" in text and "| 90% |" in text


def test_the_price_is_dated(tmp_path):
    cfg = _paper()
    assert cfg.plan.gpu_hour_usd_as_of == "2026-11"
    text = render(_plan(cfg, tmp_path), "configs/paper.yaml")
    assert "cost (2026-11 price)" in text and "as of 2026-11" in text and "p4de.24xlarge" in text
    assert "check today's" in price_line(cfg, datetime.date(2027, 8, 1)) and "check" not in price_line(cfg, datetime.date(2026, 12, 5))
    undated = _paper("plan.gpu_hour_usd_as_of=null")
    assert "undated" in price_line(undated)
    with pytest.raises(Exception, match="gpu_hour_usd_as_of"):
        _paper("plan.gpu_hour_usd_as_of=Nov 2026")
