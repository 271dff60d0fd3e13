"""Benchmark: how each stage's time and memory grow with the number of pairs (issue 17's cost curve).

Synthetic ESCI-layout files (bench/synthetic.py: distinct queries and products, ESCI's text lengths) at each size go
through the stages a 2.6M-pair run needs, in this process (the driver) on a local Ray instance, with the smoke
config's tiny models:

  prepare    examples x products joined, filtered, validated, split (configs/esci.yaml's data section)
  generate   MPCoT with the tiny random teacher on vLLM, for --prompts prompts (3 perspectives)
  targets    label_text targets for every train and val pair (no LLM): (pair, perspective) rows with embeddings
  examples   the student's examples: the train split left-joined with its targets by pair id (Ray Data)
  train      one epoch of the tiny LRKD student on Ray Train, fed by Ray Data
  score      `thinkbroad score` of the test split (Ray Data actors), metrics read back

Per stage: wall seconds, items/s, and peak RSS of the driver, of each Ray Train worker, scoring actor and other
Ray worker (sampled every second from the process tree; the largest single process of each kind), the same for
private memory (RSS counts the object store's shared pages a worker has mapped while reading blocks), the object
store's peak use and the bytes it spilled. Goals (issue 17): every stage completes at the largest size; from 100k
to 1M each stage takes <= 11x its 100k time; Ray Train workers' and scoring actors' peak RSS at 1M <= 1.2x their
100k peak; the driver's peak at 1M <= 3 GB.

    .venv/bin/python bench/scale.py [--sizes 10000 100000 1000000] [--prompts 10000 100000] [--work DIR]

Writes bench/results/scale.json and scale.png (log-log) and prints one summary line; with --docs also
docs/scale.json and docs/scale.png (--docs NAME: docs/NAME.json and .png), the files the README's figures come from
(`python -m bench.docs_tables` then regenerates the README's table and summary line from them). Run it on a quiet
machine.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

KINDS = {"train_worker": ("ray::RayTrainWorker",), "score_actor": ("StudentPredictor",),
         "vllm": ("VLLMJudge", "VLLM::", "EngineCore"), "embedder": ("RationaleEmbedder",)}


def kind_of(cmdline: str) -> str | None:
    for kind, marks in KINDS.items():
        if any(m in cmdline for m in marks):
            return kind
    if cmdline.startswith("ray::"):
        return "ray_worker"
    return None


class Sampler:
    """Peak RSS of this process and of every kind of Ray process under it, and the object store's peak use,
    sampled once a second between start() and stop()."""

    def __init__(self, period: float = 1.0):
        import psutil

        self.me = psutil.Process()
        self.period = period
        self.peaks: dict[str, float] = {}
        self.private: dict[str, float] = {}  # the process's own pages: RSS less the object store's it maps
        self.store_peak = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        import psutil

        peaks, private = {"driver": self.me.memory_info().rss}, {"driver": private_bytes(self.me.pid)}
        for p in self.me.children(recursive=True):
            try:
                kind = kind_of(" ".join(p.cmdline()) or p.name())
                if kind:
                    peaks[kind] = max(peaks.get(kind, 0), p.memory_info().rss)
                    private[kind] = max(private.get(kind, 0), private_bytes(p.pid))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        for k, v in peaks.items():
            self.peaks[k] = max(self.peaks.get(k, 0), v / 2**30)
        for k, v in private.items():
            self.private[k] = max(self.private.get(k, 0), v / 2**30)
        self.store_peak = max(self.store_peak, store_used_gib())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.period)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()
        self._sample()


def private_bytes(pid: int) -> int:
    """A process's private memory (Private_Clean + Private_Dirty of /proc/PID/smaps_rollup): its RSS without the
    shared pages, chiefly the object store's blocks a Ray worker maps while it reads them."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return sum(int(line.split()[1]) * 1024 for line in text.splitlines() if line.startswith(("Private_Clean", "Private_Dirty")))


def store_used_gib() -> float:
    """Object store memory in use (GiB), or 0 before Ray starts."""
    import ray

    if not ray.is_initialized():
        return 0.0
    total = ray.cluster_resources().get("object_store_memory", 0)
    free = ray.available_resources().get("object_store_memory", total)
    return max(total - free, 0) / 2**30


def spilled_mib() -> float:
    """MiB the object store has spilled to disk so far (Ray's memory summary)."""
    import ray

    if not ray.is_initialized():
        return 0.0
    from ray._private.internal_api import memory_summary

    m = re.search(r"Spilled (\d+) MiB", memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True))
    return float(m.group(1)) if m else 0.0


def config_for(data_dir: Path, run_dir: Path, prompts: int):
    """configs/smoke.yaml's tiny models on configs/esci.yaml's data section pointed at the synthetic files."""
    from workflows.config import load_config

    data = load_config(ROOT / "configs" / "esci.yaml").data.model_dump(mode="json")
    data["path"] = str(data_dir / "shopping_queries_dataset_examples.parquet")
    data["products"]["path"] = str(data_dir / "shopping_queries_dataset_products.parquet")
    sets = [f"data={json.dumps(data)}", f"run_dir={run_dir}", f"generation.max_pairs={max(1, prompts // 3)}",
            "generation.batch_size=256", "distill.target_source=label_text", "distill.max_target_pairs=null",
            "distill.fidelity_pairs=null", "distill.seeds=[0]", "distill.train.epochs=1", "distill.train.num_workers=2",
            "distill.train.batch_size=64", "distill.train.max_length=64"]
    return load_config(ROOT / "configs" / "smoke.yaml", sets)


def run_size(n: int, prompts: int | None, work: Path, stages: list[str]) -> dict:
    import pyarrow.parquet as pq

    from synthetic import write_esci_like
    from student.train import StudentJob, train_students
    from workflows.models import resolve_model
    from workflows.stages.examples import StudentData
    from workflows.stages.generate import generate
    from workflows.stages.prepare import prepare
    from workflows.stages.score import score_file

    data_dir = work / f"data-{n}"
    if not (data_dir / "shopping_queries_dataset_products.parquet").exists():
        write_esci_like(data_dir, n, seed=0)
    run_dir = work / f"run-{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = config_for(data_dir, run_dir, prompts or 3)
    out: dict = {}

    def timed(name: str, items_of, fn):
        if name not in stages:
            return None
        spill0 = spilled_mib()
        t0 = time.time()
        with Sampler() as s:
            result = fn()
        seconds = time.time() - t0
        items = items_of(result)
        out[name] = {"seconds": round(seconds, 2), "items": items, "items_per_s": round(items / max(seconds, 1e-9), 1),
                     "peak_rss_gib": {k: round(v, 3) for k, v in s.peaks.items()},
                     "peak_private_gib": {k: round(v, 3) for k, v in s.private.items()},
                     "object_store_peak_gib": round(s.store_peak, 3), "spilled_mib": spilled_mib() - spill0}
        print(f"  {n:>9,} pairs  {name:<9} {seconds:8.1f} s  {out[name]['items_per_s']:>10,.0f} items/s  driver "
              f"{s.peaks.get('driver', 0):.2f} GiB  " + "  ".join(f"{k} {v:.2f}" for k, v in s.peaks.items() if k != "driver"),
              flush=True)
        return result

    paths = timed("prepare", lambda p: sum(pq.ParquetFile(x).metadata.num_rows for x in p.values()),
                  lambda: prepare(cfg, run_dir)) or prepare(cfg, run_dir)
    rows = {s: pq.ParquetFile(paths[s]).metadata.num_rows for s in ("train", "val", "test")}
    out["splits"] = rows
    if prompts:
        timed("generate", lambda _: json.loads((run_dir / "mpcot" / "manifest.json").read_text())["rows"],
              lambda: generate(cfg, run_dir, progress=False))
    data = StudentData(cfg, run_dir)
    timed("targets", lambda p: sum(pq.ParquetFile(f).metadata.num_rows for f in Path(p).glob("*.parquet")),
          lambda: data.target_path("label_text"))
    v = cfg.distill.lrkd(cfg.distill.default_extractor, cfg.distill.default_mode, cfg.distill.lam, 0)
    timed("examples", lambda ex: ex["summary"]["rows"], lambda: data.examples(data.key(v)))
    student_dir = run_dir / "student" / "variants" / "bench"

    def train():
        train_students([StudentJob(v, str(student_dir), "d")], {"d": data.for_variant(v)}, cfg.distill.train,
                       resolve_model(cfg.distill.backbone), data.codes, data.persp, run_dir / "student" / "trainer")
        return json.loads((student_dir / "history.json").read_text())

    history = timed("train", lambda h: h[0]["train_pairs"], train)
    if history:
        out["train"]["train_pairs_per_s"] = round(history[0]["train_pairs"] / history[0]["train_seconds"], 1)
    timed("score", lambda m: m["scored"], lambda: score_file(str(paths["test"]), str(student_dir / "best"),
                                                               str(run_dir / "scored.parquet"), None, progress=False))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--prompts", type=int, nargs="+", default=[10_000, 100_000],
                    help="generation prompts at the sizes in order (one per size; missing = no generation there)")
    ap.add_argument("--stages", nargs="+", default=["prepare", "generate", "targets", "examples", "train", "score"])
    ap.add_argument("--work", default="/tmp/thinkbroad-scale", help="scratch folder (synthetic data is kept for reruns)")
    ap.add_argument("--keep", action="store_true", help="keep the run folders")
    ap.add_argument("--docs", nargs="?", const="scale", default=None, metavar="NAME",
                    help="also write docs/NAME.json and docs/NAME.png (default NAME: scale), the README's figures")
    args = ap.parse_args()

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    from hardware.cpu import cpu_info
    from hardware.runtime import ensure_ray

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cpu = cpu_info()
    print(f"scale benchmark on {cpu.model}, {cpu.cores} cores", flush=True)
    ensure_ray()
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {"cpu": cpu.model, "cores": cpu.cores, "sizes": {}}
    for i, n in enumerate(args.sizes):
        prompts = args.prompts[i] if i < len(args.prompts) else None
        results["sizes"][n] = run_size(n, prompts, work, args.stages)
        results["sizes"][n]["prompts"] = prompts
        if not args.keep:
            shutil.rmtree(work / f"run-{n}", ignore_errors=True)
        write(results)
    summarize(results, args.docs)


def write(results: dict, docs: str | None = None) -> None:
    out = ROOT / "bench" / "results" / "scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    if docs:
        (ROOT / "docs" / f"{docs}.json").write_text(json.dumps(results, indent=2))


def summarize(results: dict, docs: str | None = None) -> None:
    sizes = sorted(int(n) for n in results["sizes"])
    checks = {}
    if len(sizes) >= 2:
        a, b = results["sizes"][sizes[-2]], results["sizes"][sizes[-1]]
        factor = sizes[-1] / sizes[-2]
        for stage in ("prepare", "targets", "examples", "train", "score"):
            if stage in a and stage in b:
                checks[f"{stage}_time_ratio"] = round(b[stage]["seconds"] / a[stage]["seconds"], 2)
        for stage, kind in (("train", "train_worker"), ("score", "score_actor")):
            if stage in a and stage in b and kind in a[stage]["peak_rss_gib"]:
                checks[f"{kind}_rss_ratio"] = round(b[stage]["peak_rss_gib"][kind] / a[stage]["peak_rss_gib"][kind], 2)
                if kind in a[stage].get("peak_private_gib", {}) and kind in b[stage].get("peak_private_gib", {}):
                    checks[f"{kind}_private_ratio"] = round(b[stage]["peak_private_gib"][kind]
                                                            / a[stage]["peak_private_gib"][kind], 2)
        checks["size_ratio"] = factor
    top = results["sizes"][sizes[-1]]
    checks["driver_peak_gib_at_largest"] = round(max(s["peak_rss_gib"]["driver"] for s in top.values()
                                                     if isinstance(s, dict) and "peak_rss_gib" in s), 2)
    results["checks"] = checks
    write(results, docs)
    plot(results, docs)
    print(summary(results))


def summary(results: dict) -> str:
    """The one-line summary the bench prints (and the README quotes) from its results."""
    sizes = sorted(int(n) for n in results["sizes"])
    return (f"scale ({results['cpu']}, {results['cores']} cores; sizes {', '.join(f'{n:,}' for n in sizes)}): "
            + ", ".join(f"{k} {v}" for k, v in results["checks"].items()))


# the README's stage table: the item each stage counts, the process kind shown as its largest Ray process
ITEMS = {"prepare": "", "generate": " prompts", "targets": " target rows", "examples": " train pairs", "train": "",
         "score": " test pairs"}
OWN = {"generate": ("vllm", "vLLM"), "train": ("train_worker", "Train worker"), "score": ("score_actor", "scoring actor")}


def table(results: dict) -> str:
    """The README's cost-curve table (Markdown) from the results: per stage and size, items, seconds, items/s (and
    the training loop's pairs/s), the driver's peak RSS, the stage's own kind of Ray process (else the largest other
    Ray worker; none for prepare, which runs in the driver) and the object store's peak."""
    lines = ["| stage | pairs | items | seconds | items/s | driver peak | largest Ray processes | object store peak |",
             "|---|---|---|---|---|---|---|---|"]
    sizes = sorted(results["sizes"], key=int)
    for stage, unit in ITEMS.items():
        first = True
        for n in sizes:
            r = results["sizes"][n].get(stage)
            if not r:
                continue
            rate = f"{r['items_per_s']:,.0f}"
            if "train_pairs_per_s" in r:
                rate += f" ({r['train_pairs_per_s']:,.0f}{' in the loop' if first else ''})"
            kind, label = OWN.get(stage, ("ray_worker", "Ray worker"))
            peak = r["peak_rss_gib"].get(kind)
            ray_proc = "–" if stage == "prepare" or peak is None else f"{label} {peak:.2f} GiB"
            store = "–" if stage == "prepare" else f"{r['object_store_peak_gib']:.2f} GiB"
            pairs = f"{int(n) // 1_000_000}M" if int(n) >= 1_000_000 else f"{int(n) // 1000}k"
            name = ("train (1 epoch)" if stage == "train" else stage) if first else ""
            lines.append(f"|{' ' + name if name else ''} | {pairs} | {r['items']:,}{unit if first else ''} | {r['seconds']:,.1f} | {rate} | "
                         f"{r['peak_rss_gib']['driver']:.2f} GiB | {ray_proc} | {store} |")
            first = False
    return "\n".join(lines)


def plot(results: dict, docs: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(n) for n in results["sizes"])
    fig, (t_ax, m_ax) = plt.subplots(1, 2, figsize=(11, 4))
    stages = [s for s in ("prepare", "generate", "targets", "examples", "train", "score")
              if any(s in results["sizes"][n] for n in sizes)]
    for stage in stages:
        pts = [(n, results["sizes"][n][stage]) for n in sizes if stage in results["sizes"][n]]
        t_ax.plot([p[1]["items"] for p in pts], [p[1]["seconds"] for p in pts], marker="o", label=stage)
        m_ax.plot([n for n, _ in pts], [p["peak_rss_gib"]["driver"] for _, p in pts], marker="o", label=f"{stage}: driver")
    for stage, kind in (("train", "train_worker"), ("score", "score_actor")):
        pts = [(n, results["sizes"][n][stage]["peak_rss_gib"].get(kind)) for n in sizes if stage in results["sizes"][n]]
        m_ax.plot([n for n, v in pts if v], [v for _, v in pts if v], marker="s", ls="--", label=kind)
    for ax in (t_ax, m_ax):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    t_ax.set_xlabel("items (pairs; prompts for generate; target rows for targets)")
    t_ax.set_ylabel("seconds")
    m_ax.set_xlabel("pairs")
    m_ax.set_ylabel("peak RSS (GiB)")
    fig.suptitle(f"thinkbroad stage cost by size ({results['cpu']}, {results['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(ROOT / "bench" / "results" / "scale.png", dpi=120)
    if docs:
        fig.savefig(ROOT / "docs" / f"{docs}.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
