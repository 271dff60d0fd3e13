"""The demo's size per host: `thinkbroad run --profile auto` (what `make demo` runs) times each stage on this CPU,
picks the largest profile whose estimate fits the budget (20 min with set-up by default), prints the estimate before
the first stage, and leaves RUN_DIR/demo_profile.json, which the report quotes (what the profile left out).

Profiles keep every stage and shrink what costs time: judgements generated, teacher-evaluation pairs, DPO steps,
target rationales, student epochs, and at the smallest the students beside LRKD (vanilla kept: the LRKD-vs-vanilla
verdict). The estimate is a per-stage model (a fixed start-up plus a cost per judgement, step or epoch) measured on
the reference host below, scaled by how fast this CPU's matmuls run (hardware/speed.py): torch stages by the torch
dtype's speed, vLLM stages by float32's (with AVX-512 or without). A host that measures within 15% of the profile it
was chosen on keeps that profile on the next run (`auto` reads the file), so a rerun does not retrain everything
because a neighbour was busy while it measured.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from workflows.artifacts import write_json_atomic

FILE = "demo_profile.json"
# smallest last; each a list of --set overrides on top of the config (configs/local.yaml's sizes are "full")
PROFILES: dict[str, list[str]] = {
    "full": [],
    "lean": ["generation.max_pairs=64", "teacher_eval.max_pairs=12", "dpo.max_steps=5", "distill.max_target_pairs=96",
             "distill.fidelity_pairs=24", "distill.train.epochs=3", "distill.controls=[vanilla,lambda0]"],
    "small": ["generation.max_pairs=48", "sft.cap_per_label=8", "teacher_eval.max_pairs=8", "dpo.max_steps=3",
              "distill.max_target_pairs=64", "distill.fidelity_pairs=16", "distill.train.epochs=2",
              "distill.controls=[vanilla]"],
    "minimal": ["generation.max_pairs=32", "sft.cap_per_label=8", "teacher_eval.max_pairs=6", "dpo.max_steps=2",
                "distill.max_target_pairs=48", "distill.fidelity_pairs=12", "distill.train.epochs=1",
                "distill.controls=[vanilla]"],
}
BUDGET_S = 20 * 60
SETUP_S = 3 * 60  # `make setup` on a fresh machine before the first stage (the packages from the registry)


@dataclass(frozen=True)
class Reference:
    """The host the stage costs were measured on (`make demo`, configs/local.yaml, 2026-12-05: 20 min 14 s), its
    speeds as hardware/speed.py measures them, and the costs: seconds fixed per stage or per unit of work."""

    cpu: str = "AMD EPYC Zen 4 (family 25, model 17; AVX-512 BF16), 2 cores"
    torch_gflops: float = 220.0    # hardware.speed.measure() there, quiet: 222 (bfloat16), 103.5 (float32)
    vllm_gflops: float = 103.0
    fixed_s: float = 20.0          # Ray start, prepare, the plan, the report
    judgement_s: float = 0.40      # vLLM: one rationale in generation (288 in 116 s)
    target_s: float = 0.31         # vLLM: one target rationale (720 in 223 s: the DPO teacher answers shorter)
    engine_s: float = 12.0         # vLLM: one engine's start
    switch_s: float = 4.0          # vLLM: an engine actor's switch to another model (teacher eval: base -> SFT -> DPO)
    eval_row_s: float = 0.36       # vLLM: one teacher-eval prompt (shorter answers than a rationale)
    resample_s: float = 0.85       # vLLM: one DPO resample of a conflict pair (3 perspectives)
    conflict_share: float = 0.57   # conflict pairs resampled per generated pair (55 of 96)
    sft_start_s: float = 25.0      # torch: the SFT stage's worker group, DeepSpeed, the merge and export
    sft_row_s: float = 1.9         # torch: one SFT row (32 rows, 4 steps: 66 s of training)
    train_start_s: float = 25.0    # torch: a Ray Train worker group with DeepSpeed
    dpo_step_s: float = 9.5        # torch: one DPO step
    embed_s: float = 25.0          # torch: the embedder and the probe
    epoch_s: float = 27.0          # torch: one student epoch over the 821 training pairs
    student_s: float = 3.0         # torch: one student's set-up
    examples_s: float = 75.0       # the examples datasets and scoring on Ray Data
    train_pairs: int = 821         # the bundled sample's splits (a null size means all of them)
    test_pairs: int = 108
    dpo_steps: int = 6             # DPO's steps when max_steps is -1 (its epochs)


REFERENCE = Reference()


def estimate(cfg, speed, ref: Reference = REFERENCE) -> dict[str, float]:
    """Seconds per stage for `cfg` on a host of `speed` (hardware.speed.HostSpeed)."""
    t, v = ref.torch_gflops / speed.torch_gflops, ref.vllm_gflops / speed.vllm_gflops
    k = len(cfg.perspectives)
    g, d = cfg.generation, cfg.distill
    pairs = g.max_pairs or ref.train_pairs  # null: every training pair
    generated = pairs * k * g.samples_per_prompt
    targets = ((d.max_target_pairs or 0) + (d.fidelity_pairs or 0)) * k
    students = len(d.main_variants())
    return {
        "prepare+report": ref.fixed_s,
        "generate": v * (ref.engine_s + ref.judgement_s * generated),
        "sft": t * (ref.sft_start_s + ref.sft_row_s * _sft_rows(cfg)),
        "dpo": v * (ref.engine_s + ref.resample_s * ref.conflict_share * pairs)
        + t * (ref.train_start_s + ref.dpo_step_s * (cfg.dpo.max_steps if cfg.dpo.max_steps > 0 else ref.dpo_steps)),
        "teacher_eval": v * (ref.engine_s + 2 * ref.switch_s + 3 * ref.eval_row_s * (cfg.teacher_eval.max_pairs or ref.test_pairs) * (k + 1))
        if cfg.teacher_eval.enabled else 0.0,
        "distill": v * (ref.engine_s + ref.target_s * targets) + t * (ref.embed_s + students * (
            ref.student_s + ref.epoch_s * d.train.epochs)) + ref.examples_s,
    }


def _sft_rows(cfg) -> int:
    """SFT rows: the balanced cap per label over the two labels SmolLM2 gets right (E, S), else the reference's 32."""
    sft = cfg.sft
    return 2 * sft.cap_per_label if getattr(sft, "balance", None) == "cap" and sft.cap_per_label else 32


def changed(base, profiled, name: str) -> dict[str, list]:
    """What profile `name` changed: {key: [its value, the config's]} for each override that differs."""
    out = {}
    for override in PROFILES[name]:
        key = override.split("=", 1)[0]
        was, now = _get(base, key), _get(profiled, key)
        if was != now:
            out[key] = [now, was]
    return out


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def choose(load, speed, budget_s: float = BUDGET_S - SETUP_S) -> tuple[str, dict[str, float]]:
    """The largest profile whose estimate fits `budget_s` (the smallest when none does). `load(overrides)` -> config."""
    name, est = "minimal", {}
    for name in PROFILES:
        est = estimate(load(PROFILES[name]), speed)
        if sum(est.values()) <= budget_s:
            break
    return name, est


def resolve(given: str, run_dir: Path, load, measure=None) -> tuple[str, dict]:
    """The profile to run and the record written to RUN_DIR/demo_profile.json. `given`: auto or a profile name;
    auto reuses the profile recorded for this run folder on the same CPU, else measures this host and chooses."""
    from hardware.cpu import cpu_info
    from hardware.speed import HostSpeed, measure as measure_host

    if given != "auto" and given not in PROFILES:
        raise ValueError(f"unknown demo profile {given!r}; profiles: auto, {', '.join(PROFILES)}")
    cpu = cpu_info().describe()
    path = Path(run_dir) / FILE
    old = json.loads(path.read_text()) if path.exists() else None
    if given == "auto" and old and old.get("cpu") == cpu:
        speed, name, how = HostSpeed(**old["speed"]), old["profile"], f"as chosen for this run folder before ({path})"
        est = estimate(load(PROFILES[name]), speed)
    else:
        speed = (measure or measure_host)()
        if given == "auto":
            name, est = choose(load, speed)
            how = "measured on this CPU"
        else:
            name, est, how = given, estimate(load(PROFILES[given]), speed), "given"
    return name, {"profile": name, "how": how, "cpu": cpu, "speed": speed.as_dict(), "reference": REFERENCE.cpu,
                  "estimate_s": {k: round(v, 1) for k, v in est.items()}, "overrides": PROFILES[name],
                  "budget_s": BUDGET_S - SETUP_S}


def record(run_dir: Path, info: dict, base, profiled) -> str:
    """Write RUN_DIR/demo_profile.json and return the line printed before the first stage."""
    info = info | {"changed": changed(base, profiled, info["profile"])}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomic(info, Path(run_dir) / FILE)
    total = sum(info["estimate_s"].values())
    cut = "; ".join(f"{k} {now} (the config: {was})" for k, (now, was) in info["changed"].items()) or "nothing"
    return (f"demo profile {info['profile']} ({info['how']}): estimate {total / 60:.0f} min for the stages "
            f"(budget {info['budget_s'] / 60:.0f} min + set-up); smaller than the config: {cut}")


def report_lines(run_dir: Path, cfg) -> list[str]:
    """The report's section on the profile, when the run was made with one: RUN_DIR/demo_profile.json, and `cfg`
    (the report's config) has the sizes it records (a later run without the profile drops the section)."""
    path = Path(run_dir) / FILE
    if not path.exists():
        return []
    p = json.loads(path.read_text())
    if any(_get(cfg, key) != now for key, (now, _) in p["changed"].items()):
        return []
    est = ", ".join(f"{k} {v / 60:.1f}" for k, v in p["estimate_s"].items())
    lines = [f"## Demo profile: {p['profile']}", "",
             f"Chosen ({p['how']}) on {p['cpu'].removeprefix('CPU: ')} (matmul GFLOP/s per core: torch {p['speed']['torch_gflops']:.0f}, vLLM "
             f"{p['speed']['vllm_gflops']:.0f}; the stage costs were measured on {p['reference']}). Estimated minutes "
             f"per stage: {est}.", ""]
    if p["changed"]:
        lines += ["What this profile left out, to fit the time budget (every number below comes from this smaller "
                  "run, not from the config's sizes):", "",
                  *[f"- `{k}`: {now} (the config: {was})" for k, (now, was) in p["changed"].items()], ""]
    else:
        lines += ["Nothing was left out: every size is the config's.", ""]
    return lines
