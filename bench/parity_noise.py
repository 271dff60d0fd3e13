"""Benchmark: the noise floor of the quality-parity verdict. Two halves of the same recipe's seeds compared with each
other, paired as `bench/quality_parity.py` pairs the vanilla student with the library (the same pooled test pairs,
seeds and pairs resampled): a comparison with no true difference. When its interval is wider than the equivalence
margin, no parity run of that many seeds on these pairs can come out "equivalent", whatever the code does.

    .venv/bin/python bench/parity_noise.py [--config configs/local.yaml] [--store DIR] [--docs]

Reads the seeds `bench/quality_parity.py --pool` stored (the newest comparison in the store); needs at least 4
seeds. No training. Writes bench/results/parity_noise.json (docs/parity_noise.json with --docs) and prints one line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def halves(runs: dict[int, dict], side: str) -> tuple[dict, dict, list[int], list[int]]:
    """One side's predictions of the first and the second half of the seeds, re-indexed 0..k-1 so they pair."""
    seeds = sorted(runs)
    k = len(seeds) // 2
    a, b = seeds[:k], seeds[k:2 * k]
    return ({i: runs[s][side]["predictions"] for i, s in enumerate(a)},
            {i: runs[s][side]["predictions"] for i, s in enumerate(b)}, a, b)


def noise_floor(stored: dict, num_classes: int, margin: float = 0.02) -> dict:
    """The library against itself and the vanilla student against itself (half the seeds each side), and the
    parity verdict itself over every stored seed; macro-F1 over `num_classes` labels (the config's)."""
    from student.evaluate import paired_bootstrap

    runs = {int(s): r for s, r in stored["runs"].items()}
    if len(runs) < 4:
        raise SystemExit(f"parity_noise: {len(runs)} seeds stored; two halves of at least 2 seeds need 4 "
                         "(bench/quality_parity.py --pool --seeds ...)")
    gold, out = stored["key"]["gold"], {}
    for side in ("library", "vanilla"):
        a, b, sa, sb = halves(runs, side)
        v = paired_bootstrap(gold, a, b, num_classes, margin=margin)
        out[f"{side}_vs_{side}"] = v | {"seeds_a": sa, "seeds_b": sb, "width": v["ci95"][1] - v["ci95"][0]}
    both = {s: r["vanilla"]["predictions"] for s, r in runs.items()}
    out["vanilla_vs_library"] = paired_bootstrap(gold, both, {s: r["library"]["predictions"] for s, r in runs.items()}, num_classes,
                                                 margin=margin)
    return {"seeds": sorted(runs), "folds": stored["key"]["folds"], "test_pairs": len(gold), "margin": margin, **out}


def summary(result: dict) -> str:
    lib, van, d = result["library_vs_library"], result["vanilla_vs_vanilla"], result["vanilla_vs_library"]
    seeds = lambda v: f"seeds {','.join(map(str, v['seeds_a']))} vs {','.join(map(str, v['seeds_b']))}"  # noqa: E731
    return (f"parity noise floor ({len(result['seeds'])} seeds x {result['folds']} folds, {result['test_pairs']} test pairs; "
            f"no true difference): library {seeds(lib)} {lib['mean_diff']:+.3f} [{lib['ci95'][0]:+.3f}, {lib['ci95'][1]:+.3f}], "
            f"vanilla {seeds(van)} {van['mean_diff']:+.3f} [{van['ci95'][0]:+.3f}, {van['ci95'][1]:+.3f}]: intervals "
            f"{lib['width']:.3f} and {van['width']:.3f} wide against the margin's {2 * result['margin']:.3f}; "
            f"vanilla - library over all {len(result['seeds'])} seeds {d['mean_diff']:+.3f} [{d['ci95'][0]:+.3f}, "
            f"{d['ci95'][1]:+.3f}]: {d['verdict']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/local.yaml", help="the comparison's config (its labels)")
    ap.add_argument("--store", default=str(ROOT / "bench" / "results" / "quality_parity_runs"))
    ap.add_argument("--margin", type=float, default=None, help="default: the config's distill.equivalence_margin")
    ap.add_argument("--docs", action="store_true", help="also write docs/parity_noise.json")
    args = ap.parse_args()
    files = sorted(Path(args.store).glob("*.json"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise SystemExit(f"parity_noise: nothing stored in {args.store} (bench/quality_parity.py --pool)")
    from workflows.config import load_config

    cfg = load_config(args.config)
    margin = cfg.distill.equivalence_margin if args.margin is None else args.margin
    result = noise_floor(json.loads(files[-1].read_text()), len(cfg.labels), margin) | {"store": files[-1].name}
    text = json.dumps(result, indent=2)
    out = ROOT / "bench" / "results" / "parity_noise.json"
    out.write_text(text)
    if args.docs:
        (ROOT / "docs" / "parity_noise.json").write_text(text)
    print(summary(result))


if __name__ == "__main__":
    main()
