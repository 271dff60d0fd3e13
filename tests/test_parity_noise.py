"""bench/parity_noise.py: the noise floor of the parity verdict, each recipe's seed halves compared with each other."""
import numpy as np
import pytest

from bench import parity_noise


def _stored(seeds: int, n: int = 400) -> dict:
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 4, n).tolist()
    runs = {}
    for s in range(seeds):
        flip = np.random.default_rng(100 + s).random(n) < 0.5  # each vanilla seed wrong on a different half
        vanilla = np.where(flip, (np.asarray(gold) + 1) % 4, gold).tolist()
        # the library: the same (right) predictions every seed
        runs[str(s)] = {"library": {"predictions": gold}, "vanilla": {"predictions": vanilla}}
    return {"key": {"gold": gold, "folds": 3}, "runs": runs}


def test_a_recipe_against_itself_spans_only_its_seed_noise():
    result = parity_noise.noise_floor(_stored(4), 4)
    lib, van = result["library_vs_library"], result["vanilla_vs_vanilla"]
    # identical predictions every seed: no noise, the interval is a point at 0 (equivalent at any margin)
    assert lib["mean_diff"] == 0 and lib["width"] == 0 and lib["verdict"].startswith("equivalent")
    assert (lib["seeds_a"], lib["seeds_b"]) == ([0, 1], [2, 3])
    # seeds that each get another half of the pairs wrong: a wide interval around a small difference
    assert van["width"] > 0.04 and van["ci95"][0] < 0 < van["ci95"][1]
    assert result["vanilla_vs_library"]["mean_diff"] < -0.3  # half the pairs wrong against none
    text = parity_noise.summary(result)
    assert "library seeds 0,1 vs 2,3 +0.000 [+0.000, +0.000]" in text and "intervals 0.000 and " in text


def test_fewer_than_four_seeds_are_refused_with_the_fix():
    with pytest.raises(SystemExit, match="3 seeds stored; two halves of at least 2 seeds need 4"):
        parity_noise.noise_floor(_stored(3), 4)
