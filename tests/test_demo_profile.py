"""workflows/demo.py: the demo's profile per host (`thinkbroad run --profile auto`), chosen from what the CPU
measures, recorded in the run folder, reused on a rerun, and quoted in the report. No Ray."""
import json

import pytest

from conftest import ROOT
from hardware.speed import HostSpeed, matmul_gflops
from workflows import demo
from workflows.config import load_config

CONFIG = str(ROOT / "configs" / "local.yaml")


def load(extra):
    return load_config(CONFIG, [*extra, "distill.seeds=[0]"])


def total(name, speed):
    return sum(demo.estimate(load(demo.PROFILES[name]), speed).values())


REF = HostSpeed(demo.REFERENCE.torch_gflops, demo.REFERENCE.vllm_gflops)
# an AVX2-only Zen 3 as the reference measured it against this one: student epochs 2.6x, generation 1.9x slower
AVX2 = HostSpeed(demo.REFERENCE.torch_gflops / 2.6, demo.REFERENCE.vllm_gflops / 1.9)


def test_the_estimate_reproduces_the_reference_demo_and_shrinks_with_each_profile():
    assert 19 * 60 <= total("full", REF) <= 22 * 60  # the measured demo: 20 min 14 s on the reference host
    for speed in (REF, AVX2):
        times = [total(name, speed) for name in demo.PROFILES]
        assert times == sorted(times, reverse=True) and len(set(times)) == len(times)
    assert total("full", AVX2) > 2 * total("full", REF)


@pytest.mark.parametrize("speed,expected", [(HostSpeed(2 * REF.torch_gflops, 2 * REF.vllm_gflops), "full"),
                                            (REF, "lean"), (AVX2, "minimal")])
def test_auto_picks_the_largest_profile_that_fits_the_budget(speed, expected):
    name, est = demo.choose(load, speed)
    assert name == expected and sum(est.values()) <= demo.BUDGET_S - demo.SETUP_S
    bigger = list(demo.PROFILES)[list(demo.PROFILES).index(name) - 1] if name != "full" else None
    assert bigger is None or total(bigger, speed) > demo.BUDGET_S - demo.SETUP_S


def test_the_choice_is_recorded_reused_on_a_rerun_and_quoted_in_the_report(tmp_path):
    calls = []

    def measure():
        calls.append(1)
        return REF

    name, info = demo.resolve("auto", tmp_path, load, measure)
    profiled = load(demo.PROFILES[name])
    line = demo.record(tmp_path, info, load([]), profiled)
    assert name == "lean" and calls == [1]
    assert "demo profile lean (measured on this CPU): estimate 14 min" in line
    assert "distill.train.epochs 3 (the config: 4)" in line and "generation.max_pairs 64 (the config: 96)" in line
    saved = json.loads((tmp_path / demo.FILE).read_text())
    assert saved["changed"]["distill.max_target_pairs"] == [96, 192]
    # a rerun on the same CPU keeps the profile whatever this second measurement would say
    again, info2 = demo.resolve("auto", tmp_path, load, lambda: calls.append(2) or AVX2)
    assert again == "lean" and calls == [1] and "chosen for this run folder before" in info2["how"]
    # the report's section: what the profile left out; none for a config without the profile's sizes
    section = "\n".join(demo.report_lines(tmp_path, profiled))
    assert "## Demo profile: lean" in section and "- `distill.train.epochs`: 3 (the config: 4)" in section
    assert demo.report_lines(tmp_path, load([])) == []
    # a profile named on the command line is used as given
    assert demo.resolve("minimal", tmp_path, load, lambda: REF)[0] == "minimal"
    with pytest.raises(ValueError, match="unknown demo profile 'huge'"):
        demo.resolve("huge", tmp_path, load, lambda: REF)


def test_the_smallest_profiles_train_vanilla_beside_lrkd_only():
    names = [v.name for v in load(demo.PROFILES["minimal"]).distill.main_variants()]
    assert names == ["vanilla", "lrkd-poly-unified"]
    assert [v.name for v in load([]).distill.main_variants()] == ["vanilla", "logit_kd", "lrkd-poly-unified",
                                                                  "lrkd-poly-unified-lam0"]


def test_the_host_speed_takes_torch_s_dtype_and_the_avx2_factor_for_vllm(monkeypatch):
    """hardware/speed.py: torch's speed in the dtype torch runs in here, vLLM's in float32, scaled down without AVX-512."""
    import hardware.cpu as cpu
    import hardware.speed as speed

    assert 0.1 < speed.matmul_gflops("float32", seconds=0.1, size=128) < 100_000  # the real one, briefly
    asked = []
    monkeypatch.setattr(speed, "matmul_gflops", lambda dtype, seconds: asked.append(dtype) or {"float32": 100.0,
                                                                                             "bfloat16": 300.0}[dtype])
    for flags, expected in ((("avx2",), speed.HostSpeed(100.0, 100.0 * speed.AVX2_VLLM_FACTOR)),
                            (("avx2", "avx512f", "avx512_bf16"), speed.HostSpeed(300.0, 100.0))):
        monkeypatch.setattr(cpu, "cpu_info", lambda flags=flags: cpu.CpuInfo("x", frozenset(flags), 2))
        asked.clear()
        assert speed.measure() == expected
        assert asked == (["float32"] if "avx512_bf16" not in flags else ["float32", "bfloat16"])
