"""`thinkbroad plan`: before anyone rents the GPUs, whether each stage of a run fits the cluster it is meant for, how
long it takes and what it costs, from the run config, the cluster's shape and the data.

Memory per GPU comes from the formulas the libraries use (vLLM's KV cache sizing, DeepSpeed's model-state
estimators mirrored in teacher/placement.py, vLLM's batch defaults in mpcot/placement.py); placement comes from the
same functions the stages call (mpcot/placement.py, teacher/placement.py); model sizes from workflows/shapes.py.
Nothing is loaded and Ray is not started: `thinkbroad run` runs this check after `prepare` and refuses a stage that
cannot fit on GPUs (on CPUs it only reports: the CPU path is the one this project runs).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hardware.cpu import cpu_info
from mpcot.perspectives import NEUTRAL_PERSPECTIVE
from mpcot.placement import engine_placement, vllm_batch_defaults
from mpcot.prompts import build_messages
from teacher import placement as teacher_placement
from workflows.cluster import Cluster, NodeGroup, PlanError, default_cluster
from workflows.config import RunConfig
from workflows.models import BUILTIN, local_folder, resolve_model
from workflows.shapes import DTYPE_BYTES, ModelShape, model_shape

GiB = 2**30
SPLITS = ("train", "val", "test")
SAMPLE_PAIRS = 64


class PlanRefused(RuntimeError):
    """`thinkbroad run`: a stage cannot fit the cluster; the message gives the numbers and the fix."""


# ---------------------------------------------------------------- data and tokens


@dataclass
class Pairs:
    counts: dict[str, int]
    sample: list[dict]  # {"query", "title", "attributes": dict, "label"}: a spread of training pairs
    source: str


def _sample(path: Path, n: int = SAMPLE_PAIRS) -> list[dict]:
    """A spread of n pairs of a split file's first row group (what prompts need; the rest is not read)."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(path)
    if not f.metadata.num_rows:
        return []
    table = f.read_row_group(0, columns=[c for c in ("query", "title", "attributes", "label") if c in f.schema_arrow.names])
    step = max(1, table.num_rows // n)
    rows = table.take(list(range(0, table.num_rows, step))[:n]).to_pylist()
    return [{"query": r["query"], "title": r["title"], "attributes": json.loads(r.get("attributes") or "{}"),
             "label": r["label"]} for r in rows]


def _split_sizes(paths: dict[str, Path]) -> tuple[dict[str, int], list[dict]]:
    import pyarrow.parquet as pq

    return {s: pq.ParquetFile(p).metadata.num_rows for s, p in paths.items()}, _sample(paths["train"])


def plan_pairs(cfg: RunConfig, run_dir: Path, total: int | None = None) -> Pairs:
    """Split sizes and a sample of pairs: the run's prepared splits when there, else the data file through the run's
    own `prepare` (into a temporary folder), else the perspectives' few-shot pairs with `total` split by the config's
    fractions. `total` (--pairs) scales the counts to a data set not on this machine."""
    prepared = {s: run_dir / "data" / f"{s}.parquet" for s in SPLITS}
    counts = None
    if all(p.exists() for p in prepared.values()) and (run_dir / "data" / "manifest.json").exists():
        (counts, sample), source = _split_sizes(prepared), f"the prepared splits in {run_dir / 'data'}"
    elif Path(cfg.data.path).exists():
        from workflows.stages import prepare

        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            counts, sample = _split_sizes(prepare(cfg, Path(tmp)))
        source = f"{cfg.data.path} split by the config"
    if counts is not None:
        if total:
            n = sum(counts.values())
            counts = {s: round(total * c / n) for s, c in counts.items()}
            source = f"--pairs {total:,} in the split shares and token lengths of {source}"
        return Pairs(counts, sample, source)
    if not total:
        raise PlanError(f"data.path {cfg.data.path!r} is not on this machine: give --pairs N (the number of labelled pairs)")
    frac = cfg.data.split
    counts = {s: round(total * getattr(frac, s)) for s in SPLITS}
    sample = [{"query": ex.query, "title": ex.title, "attributes": dict(ex.attributes or {}), "label": ex.label}
              for p in cfg.perspectives for ex in p.examples]
    return Pairs(counts, sample, f"--pairs {total:,} split by data.split; token lengths from the few-shot pairs "
                                 f"(data.path {cfg.data.path} is not on this machine)")


class TokenCounter:
    """Tokens of text with a model folder's tokenizer.json (the `tokenizers` library: no transformers import), else
    characters / 4."""

    def __init__(self, folder: Path | None):
        self.tok = None
        if folder is not None and (folder / "tokenizer.json").exists():
            from tokenizers import Tokenizer

            self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))

    @property
    def how(self) -> str:
        return "tokenizer" if self.tok else "characters / 4 (no tokenizer on this machine)"

    def text(self, text: str, pair: str | None = None) -> int:
        if self.tok is None:
            return math.ceil((len(text) + len(pair or "")) / 4) + (3 if pair is not None else 0)
        return len(self.tok.encode(text, pair).ids) if pair is not None else len(self.tok.encode(text, add_special_tokens=False).ids)

    def messages(self, messages: list[dict]) -> int:
        """A chat prompt: each message's content plus 5 tokens of template (role, start/end markers), plus 3 for the
        assistant turn it ends with (ChatML's count; other templates are within a few tokens)."""
        return sum(self.text(m["content"]) + 5 for m in messages) + 3


@dataclass
class Lengths:
    prompt_mean: float  # tokens of an MPCoT prompt (mean over sampled pairs and perspectives)
    prompt_max: int
    neutral_mean: float  # the perspective-neutral prompt (DPO, teacher eval)
    completion: float  # tokens of an answer
    completion_how: str
    prompt_how: str
    student_mean: float  # tokens of a student input ([CLS] query [SEP] product [SEP]), capped at max_length
    student_how: str
    rationale_chars: float


def token_lengths(cfg: RunConfig, pairs: Pairs, teacher_folder: Path | None, backbone_folder: Path | None,
                  stats: dict | None) -> Lengths:
    from student.data import product_text

    g = cfg.generation
    tok = TokenCounter(teacher_folder)
    per = [tok.messages(build_messages(p, persp, cfg.labels, g.output_mode, g.rationale_max_chars, g.max_attribute_chars))
           for p in pairs.sample for persp in cfg.perspectives]
    neutral = [tok.messages(build_messages(p, NEUTRAL_PERSPECTIVE, cfg.labels, g.output_mode, g.rationale_max_chars,
                                           g.max_attribute_chars)) for p in pairs.sample]
    longest_title = max(len(lab.title) for lab in cfg.labels)
    if stats:
        done = [s["mean_completion_tokens"] for s in stats["per_perspective"].values() if "mean_completion_tokens" in s]
        completion, how = sum(done) / len(done), "measured (mean of the finished run's stats.json)"
    elif g.output_mode == "json":
        bound = math.ceil((g.rationale_max_chars + len('{"rationale": "", "label": ""}') + longest_title) / 4)
        completion, how = min(g.max_tokens, bound), (f"at most rationale_max_chars {g.rationale_max_chars} + the JSON, / 4 "
                                                     f"(json mode), capped by max_tokens {g.max_tokens}")
    else:
        completion, how = g.max_tokens, f"max_tokens {g.max_tokens} (an upper bound)"
    s = cfg.distill.train
    stok = TokenCounter(backbone_folder)
    student = [min(s.max_length, stok.text(p["query"], product_text(p["title"], json.dumps(p["attributes"]))))
               for p in pairs.sample]
    return Lengths(sum(per) / max(len(per), 1), max(per, default=0), sum(neutral) / max(len(neutral), 1), completion, how,
                   tok.how, sum(student) / max(len(student), 1), stok.how, min(g.rationale_max_chars, completion * 4))


# ---------------------------------------------------------------- checks


@dataclass
class Check:
    """One thing that must fit: an engine, a training job. `fits` False refuses the stage (GPU checks only)."""

    what: str
    device: str  # "gpu" | "cpu"
    placement: str
    lines: list[str] = field(default_factory=list)  # the arithmetic, one line each
    need_gib: float | None = None
    have_gib: float | None = None
    fits: bool = True
    problem: str = ""  # why not, with the number and the fix
    summary: str = ""  # one short phrase for the verdict line


def _g(b: float) -> str:
    return f"{b / GiB:.1f}"


def _engine_check(cfg: RunConfig, shape: ModelShape, cluster: Cluster, lengths: Lengths, what: str) -> Check:
    """A pool of vLLM engines (generate; and with the trained teachers in dpo, teacher_eval, distill)."""
    g = cfg.generation
    group = cluster.gpu_group
    place = engine_placement(g.accelerator, cluster.cpus, cluster.gpus, g.concurrency, g.cpus_per_engine,
                             g.gpus_per_engine, cluster.node_cpus)
    kw = {**place.engine_defaults, **g.engine}
    seq = math.ceil(lengths.prompt_max + g.max_tokens)
    max_len = int(kw.get("max_model_len", 4096))
    dtype = kw.get("dtype", "auto")
    dtype = shape.dtype if dtype == "auto" else dtype
    if place.device == "gpu" and DTYPE_BYTES.get(dtype, 4) == 4:
        dtype = "bfloat16"  # vLLM runs a float32 checkpoint in 16-bit on GPUs unless dtype says float32
    db = DTYPE_BYTES.get(str(dtype).replace("torch.", ""), 2)
    if place.device == "cpu":
        return _cpu_engine_check(cfg, shape, cluster, place, kw, db, dtype, seq, max_len, what)
    tp = g.gpus_per_engine
    want = g.concurrency * tp
    c = Check(what, "gpu", f"{g.concurrency} vLLM engines x TP {tp} = {want} of {cluster.gpus} GPUs, "
                           f"{place.remote_args.get('num_cpus', 1)} CPU each (Ray Data actors)")
    if want > cluster.gpus:
        fit = max(1, cluster.gpus // tp)
        c.fits, c.problem = False, (f"generation.concurrency {g.concurrency} x gpus_per_engine {tp} = {want} GPUs, the "
                                    f"cluster has {cluster.gpus}: set generation.concurrency: {fit}")
        if not cluster.gpus:
            c.problem = (f"generation.accelerator is gpu and {cluster.source} has no GPU: plan it for a GPU cluster "
                         "(--cluster cluster.yaml or --nodes/--gpus-per-node/--gpu-memory-gb), or set generation.accelerator: auto")
        return c
    if group and tp > group.gpus:
        c.fits, c.problem = False, (f"tensor parallel {tp} spans nodes of {group.gpus} GPUs: set generation.gpus_per_engine "
                                    f"to at most {group.gpus}")
        return c
    mem = group.gpu_memory_gib if group else None
    if mem is None:
        c.lines.append("GPU memory unknown: not checked")
        c.summary = f"{g.concurrency} engines x TP {tp}; memory not checked"
        return c
    m = _engine_memory(cfg, shape, kw, group, tp, db)
    c.need_gib, c.have_gib = (m["weights"] + m["act"] + m["runtime"]) / GiB, m["budget"] / GiB
    c.lines += [f"per GPU: weights {_g(m['weights'])} ({shape.params / 1e9:.2f}B x {db} B{f' / TP {tp}' if tp > 1 else ''}) + "
                f"profile-run activations {_g(m['act'])} ({m['batched']} batched tokens, {m['seqs']} sequences) + runtime "
                f"{_g(m['runtime'])} = {c.need_gib:.1f} of {c.have_gib:.1f} GiB (gpu_memory_utilization {m['util']:g} x {mem:g} GiB)",
                f"KV cache {_g(max(m['kv'], 0))} GiB at {m['per_token'] / 1024:g} KiB per token (2 x {shape.layers} layers x "
                f"{max(1, shape.kv_heads // tp)} KV heads x {shape.head_dim} x {db} B) = {m['tokens']:,} tokens"]
    if m["tokens"] < max_len:
        c.fits = False
        c.problem = (f"{what}: {shape.params / 1e9:.1f}B parameters in {dtype} need {c.need_gib:.1f} GiB per GPU before any "
                     f"KV cache, more than gpu_memory_utilization {m['util']:g} x {mem:g} GiB leaves" if m["kv"] <= 0 else
                     f"{what}: the KV cache holds {m['tokens']:,} tokens, fewer than max_model_len {max_len} (vLLM refuses "
                     f"to start)") + ": " + _tensor_parallel_fix(cfg, shape, kw, cluster, db, max_len) + \
            (f", or set generation.engine.max_model_len: {m['tokens']}" if m["tokens"] >= seq else "")
        return c
    tokens, seqs = m["tokens"], m["seqs"]
    if seq > max_len and lengths.prompt_how == "tokenizer":
        c.fits, c.problem = False, (f"{what}: prompts of up to {lengths.prompt_max} tokens + max_tokens {g.max_tokens} exceed "
                                    f"max_model_len {max_len}: vLLM rejects them; set generation.engine.max_model_len: {seq}")
        return c
    at_once = min(seqs, tokens // seq)
    c.lines.append(f"= {tokens // seq:,} sequences of {seq:,} tokens (longest prompt + max_tokens) at once"
                   + (f"; max_num_seqs caps it at {seqs}" if seqs < tokens // seq else ""))
    if seq > max_len:
        c.lines.append(f"warning: the longest prompt (estimated) + max_tokens = {seq} > max_model_len {max_len}")
    c.summary = f"{g.concurrency} engines x TP {tp} on {want} of {cluster.gpus} GPUs, KV for {at_once} sequences each"
    return c


def _engine_memory(cfg: RunConfig, shape: ModelShape, kw: dict, group: NodeGroup, tp: int, db: int) -> dict:
    """One GPU of a vLLM engine: what gpu_memory_utilization leaves for the KV cache after the weights, the profile
    run's activations and the runtime, and how many tokens of KV that is (vLLM's own order of accounting)."""
    util = float(kw.get("gpu_memory_utilization", 0.9))
    mem = group.gpu_memory_gib
    batched, seqs = vllm_batch_defaults("gpu", group.gpu.name if group.gpu else "", mem, tp)
    batched, seqs = int(kw.get("max_num_batched_tokens", batched)), int(kw.get("max_num_seqs", seqs))
    h, i = shape.hidden, shape.intermediate
    # the profile run: max_num_batched_tokens through one layer (residual + hidden, q/k/v, gate/up, activation) in the
    # model dtype, and the sampler's fp32 logits for max_num_seqs sequences
    act = batched * (2 * h + (shape.heads + 2 * shape.kv_heads) * shape.head_dim / tp + 3 * i / tp) * db + seqs * shape.vocab * 4
    m = {"util": util, "batched": batched, "seqs": seqs, "weights": shape.params * db / tp, "act": act,
         "runtime": cfg.plan.assume.gpu_runtime_gib * GiB, "budget": util * mem * GiB, "per_token": shape.kv_bytes_per_token(db, tp)}
    m["kv"] = m["budget"] - m["weights"] - act - m["runtime"]
    m["tokens"] = max(0, int(m["kv"] // m["per_token"]))
    return m


def _tensor_parallel_fix(cfg: RunConfig, shape: ModelShape, kw: dict, cluster: Cluster, db: int, max_len: int) -> str:
    """The smallest tensor-parallel size within a node whose KV cache holds max_model_len, with the engines that fit."""
    group, g = cluster.gpu_group, cfg.generation
    tp = g.gpus_per_engine * 2
    while tp <= group.gpus:
        if _engine_memory(cfg, shape, kw, group, tp, db)["tokens"] >= max_len:
            return (f"set generation.gpus_per_engine: {tp} (tensor parallel) and generation.concurrency: "
                    f"{max(1, min(g.concurrency, cluster.gpus // tp))}")
        tp *= 2
    return f"no tensor-parallel size within a node of {group.gpus} GPUs holds it: use GPUs with more memory or a smaller teacher"


def _cpu_engine_check(cfg, shape, cluster, place, kw, db, dtype, seq, max_len, what) -> Check:
    g = cfg.generation
    cpus = place.remote_args.get("num_cpus", 1)
    kv_gib = float(place.env.get("VLLM_CPU_KVCACHE_SPACE", 4))
    weights = shape.params * db
    batched, _ = vllm_batch_defaults("cpu")
    act = int(kw.get("max_num_batched_tokens", batched)) * (2 * shape.hidden + 3 * shape.intermediate) * db
    per_engine = weights + kv_gib * GiB + act
    total = per_engine * g.concurrency
    ram = cluster.cpu_memory_gib
    tokens = int(kv_gib * GiB // shape.kv_bytes_per_token(db))
    c = Check(what, "cpu", f"{g.concurrency} vLLM-CPU engine(s) x {cpus} CPUs of {cluster.cpus:g}",
              need_gib=total / GiB, have_gib=ram)
    c.lines += [f"per engine: weights {_g(weights)} ({shape.params / 1e6:.0f}M x {db} B, {dtype}) + KV cache {kv_gib:g} "
                f"(VLLM_CPU_KVCACHE_SPACE) + activations {_g(act)} = {_g(per_engine)} GiB; x {g.concurrency} = {_g(total)} GiB"
                + (f" of {ram:.0f} GiB RAM" if ram else ""),
                f"KV cache {tokens:,} tokens = {tokens // seq} sequences of {seq} tokens at once"]
    if ram and total / GiB > ram:
        c.lines.append(f"warning: more than this machine's RAM ({ram:.0f} GiB)")
    c.summary = f"{g.concurrency} vLLM-CPU engine(s) x {cpus} CPUs, {_g(total)} GiB RAM"
    return c


def _train_memory(settings, shape: ModelShape, kind: str, workers: int, gpus_per_node: int, w: int) -> tuple[dict, int]:
    """Per-GPU bytes of a teacher training job, by part, and host bytes per node."""
    dist = settings.distributed
    nodes = math.ceil(workers / gpus_per_node)
    gpn = min(workers, gpus_per_node)
    lora = settings.lora
    trainable = shape.lora_params(lora.r, lora.target_modules) if lora.enabled else None
    states, host = teacher_placement.model_states_bytes(dist.zero_stage, dist.offload, shape.params, shape.largest_layer,
                                                        gpn, nodes, trainable, w)
    parts = {"model states": states}
    if kind == "dpo" and not lora.enabled:  # TRL copies the policy as the reference: sharded under ZeRO-3, whole otherwise
        parts["reference model"] = (w * shape.params // workers + w * shape.largest_layer) if dist.zero_stage == 3 else w * shape.params
    b = settings.per_device_batch_size * (2 if kind == "dpo" else 1)  # DPO: chosen and rejected in one batch
    s = settings.max_length
    layer = b * s * shape.activation_bytes_per_token_layer(w, s)
    parts["activations"] = (shape.layers * b * s * shape.hidden * w + layer) if settings.gradient_checkpointing \
        else shape.layers * layer
    parts["DeepSpeed buffers"] = teacher_placement.comm_buffer_bytes(dist.zero_stage)
    return parts, host


def _train_check(cfg: RunConfig, kind: str, shape: ModelShape, cluster: Cluster) -> Check:
    settings = getattr(cfg, kind)
    dist = settings.distributed
    device = teacher_placement.resolve_device(dist.accelerator, cluster.gpus)
    lora = "LoRA r=%d" % settings.lora.r if settings.lora.enabled else "full fine-tuning"
    zero = f"ZeRO-{dist.zero_stage}" if dist.zero_stage else "DDP (no ZeRO)"
    offload = " + offload" if dist.offload else ""
    head = (f"{dist.num_workers} Ray Train workers x {'1 GPU + ' if device == 'gpu' else ''}{dist.cpus_per_worker} CPU, "
            f"{zero}{offload}, {lora}, batch {settings.per_device_batch_size} x {settings.max_length} tokens"
            + (", gradient checkpointing" if settings.gradient_checkpointing else ""))
    c = Check(f"{kind} training", device, head)
    runtime = cfg.plan.assume.gpu_runtime_gib * GiB
    if device == "cpu":
        w = 2 if dist.bf16 == "on" or (dist.bf16 == "auto" and cpu_info().native_bf16) else 4
        parts, _ = _train_memory(settings, shape, kind, dist.num_workers, dist.num_workers, w)
        per_worker = sum(parts.values())
        total = per_worker * dist.num_workers
        ram = cluster.cpu_memory_gib
        c.need_gib, c.have_gib = total / GiB, ram
        c.lines.append("per worker: " + " + ".join(f"{k} {_g(v)}" for k, v in parts.items()) + f" = {_g(per_worker)} GiB "
                       f"({'bf16' if w == 2 else 'fp32'}); x {dist.num_workers} workers on one machine = {_g(total)} GiB"
                       + (f" of {ram:.0f} GiB RAM" if ram else ""))
        if dist.num_workers * dist.cpus_per_worker > cluster.cpus:
            c.lines.append(f"warning: {dist.num_workers} workers x {dist.cpus_per_worker} CPU > {cluster.cpus:g} CPUs: Ray "
                           "waits for CPUs that never come")
        if ram and total / GiB > ram:
            c.lines.append(f"warning: more than the RAM ({ram:.0f} GiB)")
        c.summary = f"{dist.num_workers} CPU workers, {zero}, {_g(total)} GiB RAM"
        return c
    if dist.num_workers > cluster.gpus:
        c.fits, c.problem = False, _too_few_gpus(f"{kind}.distributed", dist.num_workers, cluster)
        return c
    group = cluster.gpu_group
    if group.gpu_memory_gib is None:
        c.lines.append("GPU memory unknown: not checked")
        c.summary = f"{dist.num_workers} GPU workers; memory not checked"
        return c
    w = 4 if dist.bf16 == "off" else 2
    parts, host = _train_memory(settings, shape, kind, dist.num_workers, group.gpus, w)
    parts["runtime"] = runtime
    need = sum(parts.values())
    mem = group.gpu_memory_gib * GiB
    c.need_gib, c.have_gib = need / GiB, mem / GiB
    estimator = {2: "estimate_zero2_model_states_mem_needs", 3: "estimate_zero3_model_states_mem_needs"}.get(dist.zero_stage)
    c.lines.append("per GPU: " + " + ".join(f"{k} {_g(v)}" for k, v in parts.items()) + f" = {_g(need)} of {_g(mem)} GiB"
                   + (f" (model states: DeepSpeed's {estimator} on {shape.params / 1e9:.2f}B parameters"
                      + (f", {shape.lora_params(settings.lora.r, settings.lora.target_modules) / 1e6:.1f}M trainable"
                         if settings.lora.enabled else "") + ")" if estimator else ""))
    ram = group.memory_gib
    if ram:
        c.lines.append(f"host memory per node: {_g(host)} of {ram:.0f} GiB (the estimator's CPU column)")
    if need > mem:
        c.fits = False
        c.problem = (f"{zero}{offload} {lora} of {shape.params / 1e9:.1f}B parameters needs {_g(need)} GiB per GPU on "
                     f"{dist.num_workers} GPUs, the GPUs have {_g(mem)}; " + _train_fixes(cfg, kind, shape, cluster))
    elif ram and host > ram * GiB:
        c.fits, c.problem = False, (f"{zero}{offload} needs {_g(host)} GiB of host memory per node, the nodes have "
                                    f"{ram:.0f}: turn {kind}.distributed.offload off or use more nodes")
    c.summary = f"{dist.num_workers} GPU workers, {zero}{offload}, {_g(need)} of {_g(mem)} GiB per GPU"
    return c


def _too_few_gpus(section: str, workers: int, cluster: Cluster) -> str:
    """A Ray Train job of one GPU per worker that asks for more GPUs than the cluster has."""
    if not cluster.gpus:
        return f"{section}.accelerator is gpu and {cluster.source} has no GPU"
    return f"{section}.num_workers {workers} > the cluster's {cluster.gpus} GPUs: set {section}.num_workers: {cluster.gpus}"


def _train_fixes(cfg: RunConfig, kind: str, shape: ModelShape, cluster: Cluster) -> str:
    """The settings that would fit, each with its number."""
    settings = getattr(cfg, kind)
    dist = settings.distributed
    group = cluster.gpu_group
    mem = group.gpu_memory_gib * GiB
    w = 4 if dist.bf16 == "off" else 2
    options = []
    trials = [(f"set {kind}.distributed.zero_stage: 3", {"zero_stage": 3}, None),
              (f"enable {kind}.lora", None, {"enabled": True}),
              (f"set {kind}.distributed.offload: true", {"offload": True}, None),
              (f"set {kind}.per_device_batch_size: 1 and gradient_checkpointing: true", None, None)]
    for text, dist_change, lora_change in trials:
        trial = settings.model_copy(update={
            "distributed": dist.model_copy(update=dist_change or {}),
            "lora": settings.lora.model_copy(update=lora_change or {}),
            **({"per_device_batch_size": 1, "gradient_checkpointing": True} if text.startswith("set " + kind + ".per") else {}),
        })
        if trial == settings:
            continue
        parts, _ = _train_memory(trial, shape, kind, dist.num_workers, group.gpus, w)
        need = sum(parts.values()) + cfg.plan.assume.gpu_runtime_gib * GiB
        if need <= mem:
            options.append(f"{text} ({_g(need)} GiB)")
    return " or ".join(options) if options else "no single setting fits: use GPUs with more memory or a smaller teacher"


def _student_check(cfg: RunConfig, backbone: ModelShape, target_dim: int, cluster: Cluster) -> Check:
    from student.model import StudentConfig, head_parameters

    d, s = cfg.distill, cfg.distill.train
    device = "gpu" if (s.accelerator == "gpu" or (s.accelerator == "auto" and cluster.gpus)) else "cpu"
    persp, labels = [p.name for p in cfg.perspectives], [lab.name for lab in cfg.labels]
    head = max(head_parameters(StudentConfig(labels, persp, v.extractor if v.kind == "lrkd" else "none", v.mode,
                                             s.latent_dim, s.poly_codes, target_dim, s.max_length), backbone.hidden)
               for v in cfg.distill.main_variants())
    params = backbone.params + head
    # fp32 weights, gradients, two Adam moments, and DDP's gradient buckets
    states = 20 * params
    L = s.max_length
    act = backbone.layers * s.batch_size * L * backbone.activation_bytes_per_token_layer(4, L)
    if "gat" in d.extractors:  # GATv2 scores every token pair: (B, L, L, 64) edge features, a few of them live
        act += 3 * s.batch_size * L * L * 64 * 4
    c = Check("student training", device, f"{s.num_workers} Ray Train workers x {'1 GPU' if device == 'gpu' else f'{s.cpus_per_worker} CPU'}, "
              f"DDP fp32, {backbone.params / 1e6:.0f}M encoder + {head / 1e6:.2f}M head (the largest variant), "
              f"batch {s.batch_size} x {L} tokens")
    runtime = cfg.plan.assume.gpu_runtime_gib * GiB if device == "gpu" else 0
    need = states + act + runtime
    c.lines.append(f"per worker: weights, gradients, Adam and DDP buckets {_g(states)} (20 B x {params / 1e6:.1f}M) + "
                   f"activations {_g(act)}" + (f" + runtime {_g(runtime)}" if runtime else "") + f" = {_g(need)} GiB")
    if device == "gpu":
        if s.num_workers > cluster.gpus:
            c.fits, c.problem = False, _too_few_gpus("distill.train", s.num_workers, cluster)
            return c
        mem = cluster.gpu_group.gpu_memory_gib
        c.need_gib, c.have_gib = need / GiB, mem
        if mem is not None and need > mem * GiB:
            c.fits, c.problem = False, (f"the student needs {_g(need)} GiB per GPU, the GPUs have {mem:g}: lower "
                                        f"distill.train.batch_size (now {s.batch_size}) or max_length (now {L})")
        c.summary = f"{s.num_workers} GPU workers, {_g(need)} GiB per GPU"
    else:
        ram = cluster.cpu_memory_gib
        c.need_gib, c.have_gib = s.num_workers * need / GiB, ram
        if ram and s.num_workers * need > ram * GiB:
            c.lines.append(f"warning: {s.num_workers} workers need more than the RAM ({ram:.0f} GiB)")
        c.summary = f"{s.num_workers} CPU workers, {_g(s.num_workers * need)} GiB RAM"
    return c


def _embedder_check(cfg: RunConfig, embedder: ModelShape, cluster: Cluster) -> tuple[Check, int]:
    """The rationale embedder's actor pool (student/embed.py `embedder_placement`, on the GPUs live when the stage
    starts: the nodes the cluster keeps) and its memory; returns the check and the number of actors."""
    from student.embed import embedder_placement

    d = cfg.distill
    actors, resources = embedder_placement(cluster.held_gpus(0))
    device = "gpu" if "num_gpus" in resources else "cpu"
    weights = embedder.params * DTYPE_BYTES.get(embedder.dtype, 4)
    act = d.embed_batch_size * 256 * embedder.hidden * 4 * 8  # a forward pass without grad: a few (B, 256, h) fp32 tensors
    c = Check("rationale embedder", device, f"{actors} Ray Data actor(s) x 1 {device.upper()}, "
              f"{embedder.params / 1e6:.0f}M parameters in {embedder.dtype}, batch {d.embed_batch_size}")
    if device == "gpu":
        runtime = cfg.plan.assume.gpu_runtime_gib * GiB
        mem = cluster.gpu_group.gpu_memory_gib
        c.need_gib, c.have_gib = (weights + act + runtime) / GiB, mem
        c.lines.append(f"per GPU: weights {_g(weights)} + activations {_g(act)} + runtime {_g(runtime)} = {c.need_gib:.1f}"
                       + (f" of {mem:g} GiB" if mem else " GiB"))
        if mem and c.need_gib > mem:
            c.fits, c.problem = False, (f"the rationale embedder needs {c.need_gib:.1f} GiB per GPU, the GPUs have {mem:g}: "
                                        f"lower distill.embed_batch_size (now {d.embed_batch_size})")
        c.summary = f"embedder on {actors} GPUs"
    else:
        c.need_gib, c.have_gib = (weights + act) / GiB, cluster.cpu_memory_gib
        c.lines.append(f"host memory: weights {_g(weights)} + activations {_g(act)} GiB")
        c.summary = f"embedder on 1 CPU, {_g(weights + act)} GiB RAM"
    return c, actors


# ---------------------------------------------------------------- work and time


@dataclass
class Work:
    what: str
    detail: str
    hours: float | None
    gpus: int  # GPUs the work uses (0 = CPU work)
    how: str = ""  # the rate it was timed with


@dataclass
class StagePlan:
    name: str
    checks: list[Check] = field(default_factory=list)
    work: list[Work] = field(default_factory=list)
    measured_s: float | None = None

    @property
    def fits(self) -> bool:
        return all(c.fits for c in self.checks)

    @property
    def hours(self) -> float | None:
        known = [w.hours for w in self.work if w.hours is not None]
        return sum(known) if known or not self.work else None

    def verdict(self) -> str:
        bad = [c for c in self.checks if not c.fits]
        if bad:
            return f"{self.name}: DOES NOT FIT: " + "; ".join(c.problem for c in bad)
        summary = "; ".join(c.summary for c in self.checks if c.summary) or "CPU only"
        return f"{self.name}: fits ({summary})"


@dataclass
class Plan:
    cfg: RunConfig
    cluster: Cluster
    pairs: Pairs
    shapes: dict[str, ModelShape]
    lengths: Lengths
    stages: list[StagePlan]
    accuracy: tuple[float, str]
    notes: list[str]

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)


def _fmt(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


class Timer:
    """Hours for generation (tokens at a throughput per GPU) and for training (FLOPs at a share of the peak)."""

    def __init__(self, cfg: RunConfig, cluster: Cluster, measured_tps: float | None):
        self.cfg, self.cluster = cfg, cluster
        group = cluster.gpu_group
        self.kind = group.gpu if group else None
        self.measured_tps = measured_tps
        minutes = {"gpu": 5.0, "cpu": 0.5} | cfg.plan.assume.startup_minutes
        self.startup_h = {device: m / 60 for device, m in minutes.items()}

    def generation(self, tokens: float, device: str, units: int, shape: ModelShape, loads: int = 1) -> tuple[float | None, str]:
        """`units`: GPUs (gpu) or CPU cores (cpu) the engines hold."""
        t = self.cfg.plan.throughput
        if device == "gpu":
            tps = t.generation_tokens_per_s.get(self.kind.name) if self.kind else None
            if tps is None:
                return None, f"no plan.throughput.generation_tokens_per_s for {self.kind.name if self.kind else 'this GPU'}"
            return tokens / (tps * units) / 3600 + loads * self.startup_h["gpu"], f"{tps:,.0f} tokens/s per GPU ({self.kind.name})"
        seconds = tokens * 2 * shape.matmul_params / (units * t.cpu_gflops_per_core * 1e9)
        return seconds / 3600 + loads * self.startup_h["cpu"], f"2 x params FLOPs per token, {t.cpu_gflops_per_core:g} GFLOPS x {units} cores"

    def flops(self, flops: float, device: str, units: int, mfu: float) -> tuple[float | None, str]:
        """`units`: GPUs (gpu) or CPU cores (cpu)."""
        t = self.cfg.plan.throughput
        if device == "gpu":
            if self.kind is None:
                return None, "GPU kind unknown"
            return flops / (units * self.kind.bf16_tflops * 1e12 * mfu) / 3600 + self.startup_h["gpu"], \
                f"{mfu:.0%} of {self.kind.bf16_tflops:g} TFLOPS bf16 per GPU"
        return flops / (max(1, units) * t.cpu_gflops_per_core * 1e9) / 3600 + self.startup_h["cpu"], \
            f"{t.cpu_gflops_per_core:g} GFLOPS per core x {max(1, units)}"


def _finished_run(run_dir: Path) -> tuple[dict | None, dict[str, float]]:
    """stats.json of a finished generation and each stage's measured seconds (manifest.json) in `run_dir`."""
    stats_path = run_dir / "mpcot" / "stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    dirs = {"generate": ["mpcot"], "sft": ["teacher/sft"], "dpo": ["teacher/dpo"], "teacher_eval": ["teacher/eval"],
            "distill": ["student/targets/*", "student/variants/*"]}
    seconds = {}
    for stage, patterns in dirs.items():
        found = [json.loads(p.read_text()).get("seconds", 0) for pat in patterns for d in run_dir.glob(pat)
                 for p in [d / "manifest.json"] if p.exists()]
        if found:
            seconds[stage] = sum(found)
    return stats, seconds


def _shapes(cfg: RunConfig) -> tuple[dict[str, ModelShape], dict[str, Path | None]]:
    """Role -> shape and local folder of each model the run loads. Built-in models are resolved (built once, in seconds,
    as the run would); other folders are read where they are on this machine, else taken from plan.models."""
    d = cfg.distill
    names = {"teacher": cfg.teacher.model, "embedder": d.embedder, "backbone": d.backbone}
    if d.teacher not in ("dpo", "sft", "base"):  # a model folder writes the distillation targets
        names["targets teacher"] = d.teacher
    folders = {role: Path(resolve_model(name)) if name in BUILTIN else local_folder(name)
               for role, name in names.items()}
    shapes = {role: model_shape(names[role], folders[role], cfg.plan.models, drop_pooler=role == "backbone") for role in names}
    return shapes, folders


def make_plan(cfg: RunConfig, run_dir: Path, cluster: Cluster, total_pairs: int | None = None) -> Plan:
    """The whole plan: checks and work per stage. Raises ShapeError / PlanError with the fix when a model or the data
    cannot be read."""
    shapes, folders = _shapes(cfg)
    pairs = plan_pairs(cfg, run_dir, total_pairs)
    stats, measured = _finished_run(run_dir)
    lengths = token_lengths(cfg, pairs, folders["teacher"], folders["backbone"], stats)
    a = cfg.plan.assume
    accuracy = (stats["overall"]["accuracy"], "measured (the finished run's stats.json)") if stats else \
        (a.teacher_accuracy, "plan.assume.teacher_accuracy")
    measured_tps = stats.get("throughput", {}).get("completion_tokens_per_s") if stats else None
    timer = Timer(cfg, cluster, measured_tps)
    teacher, embedder, backbone = shapes["teacher"], shapes["embedder"], shapes["backbone"]
    g, K = cfg.generation, len(cfg.perspectives)
    notes = list(cluster.notes)
    acc = accuracy[0]

    engine = {what: _engine_check(cfg, teacher, cluster, lengths, what) for what in
              ("vLLM engines (base teacher)", "vLLM engines (SFT teacher, pass@k resampling)",
               "vLLM engines (base, SFT, DPO teachers)")}
    targets_teacher = shapes.get("targets teacher", teacher)
    engine["targets"] = _engine_check(cfg, targets_teacher, cluster, lengths,
                                      f"vLLM engines ({'trained teacher' if targets_teacher is teacher else targets_teacher.name} "
                                      "writes the targets)")
    gen_device = next(iter(engine.values())).device
    gen_gpus = g.concurrency * g.gpus_per_engine if gen_device == "gpu" else 0
    gen_units = gen_gpus or g.concurrency * engine_placement(g.accelerator, cluster.cpus, 0, g.concurrency, g.cpus_per_engine,
                                                             g.gpus_per_engine, cluster.node_cpus).remote_args["num_cpus"]

    def gen_work(what: str, prompts: float, prompt_tokens: float, loads: int = 1, shape: ModelShape = teacher) -> Work:
        tin, tout = prompts * prompt_tokens, prompts * lengths.completion
        hours, how = timer.generation(tin + tout, gen_device, gen_units, shape, loads)
        return Work(what, f"{_fmt(prompts)} prompts, {_fmt(tin)} tokens in + {_fmt(tout)} out", hours, gen_gpus, how)

    stages = [StagePlan("prepare")]
    # generate
    gen_pairs = sum(min(pairs.counts[s], g.max_pairs or pairs.counts[s]) for s in g.splits)
    rows = gen_pairs * K * g.samples_per_prompt
    st = StagePlan("generate", [engine["vLLM engines (base teacher)"]],
                   [gen_work(f"MPCoT: {_fmt(gen_pairs)} pairs x {K} perspectives x {g.samples_per_prompt}", rows, lengths.prompt_mean)])
    stages.append(st)
    # sft, dpo: FLOPs of 6 x params per token (+2 with recomputation; +2 for DPO's reference forward)
    train_device = {}
    for kind in ("sft", "dpo"):
        settings = getattr(cfg, kind)
        check = _train_check(cfg, kind, teacher, cluster)
        train_device[kind] = check.device
        workers = settings.distributed.num_workers
        if kind == "sft":
            n_rows = rows * acc
            if settings.balance == "cap" and settings.cap_per_label:
                n_rows = min(n_rows, settings.cap_per_label * len(cfg.labels))
            per_row = min(settings.max_length, lengths.prompt_mean + lengths.completion)
            what = f"SFT: {_fmt(n_rows)} rows (rationales with the gold label, accuracy {acc:.0%})"
        else:
            n_rows = rows * (1 - acc)  # each wrong rationale of a pair that has (or gets) a correct one
            per_row = 2 * min(settings.max_length, lengths.neutral_mean + lengths.completion)
            what = f"DPO: up to {_fmt(n_rows)} preference rows (wrong rationales, 1 - accuracy)"
        per_step = settings.per_device_batch_size * settings.gradient_accumulation_steps * workers
        steps = settings.max_steps if settings.max_steps > 0 else math.ceil(n_rows * settings.epochs / per_step)
        tokens = steps * per_step * per_row
        factor = 6 + (2 if settings.gradient_checkpointing else 0) + (2 if kind == "dpo" else 0)
        hours, how = timer.flops(factor * teacher.matmul_params * tokens, check.device,
                                 workers if check.device == "gpu" else workers * settings.distributed.cpus_per_worker,
                                 cfg.plan.throughput.train_mfu)
        work = [Work(what, f"{steps:,} steps x {per_step} rows, {_fmt(tokens)} tokens, {factor} x params FLOPs per token",
                     hours, workers if check.device == "gpu" else 0, how)]
        checks = [check]
        if kind == "dpo" and settings.pass_k:
            no_correct = gen_pairs * (1 - acc) ** (K * g.samples_per_prompt)  # every perspective wrong (independence)
            checks.insert(0, engine["vLLM engines (SFT teacher, pass@k resampling)"])
            work.insert(0, gen_work(f"pass@{settings.pass_k} resampling of {_fmt(no_correct)} pairs no perspective got right",
                                    no_correct * settings.pass_k, lengths.neutral_mean))
        stages.append(StagePlan(kind, checks, work))
    # teacher_eval: base, SFT and DPO teachers, every perspective and the neutral prompt
    if cfg.teacher_eval.enabled:
        split = cfg.teacher_eval.split
        n = min(pairs.counts[split], cfg.teacher_eval.max_pairs or pairs.counts[split])
        prompt = (lengths.prompt_mean * K + lengths.neutral_mean) / (K + 1)
        stages.append(StagePlan("teacher_eval", [engine["vLLM engines (base, SFT, DPO teachers)"]],
                                [gen_work(f"3 teachers x {_fmt(n)} {split} pairs x {K + 1} prompts", 3 * n * (K + 1), prompt, loads=3)]))
    # distill: teacher targets (logit-KD reads the teacher's votes whatever the source), embeddings, students
    d = cfg.distill
    target_pairs = min(pairs.counts["train"], d.max_target_pairs or pairs.counts["train"]) + \
        min(pairs.counts["val"], d.fidelity_pairs or pairs.counts["val"])
    texts = target_pairs * K
    emb_check, emb_actors = _embedder_check(cfg, embedder, cluster)
    emb_tokens = texts * min(256, lengths.rationale_chars / 4 + 2)
    emb_gpus = emb_actors if emb_check.device == "gpu" else 0
    emb_hours, emb_how = timer.flops(2 * embedder.matmul_params * emb_tokens, emb_check.device, emb_actors,
                                     cfg.plan.throughput.student_mfu)
    variants = d.main_variants()
    s = d.train
    student_check = _student_check(cfg, backbone, embedder.hidden, cluster)
    student_gpus = s.num_workers if student_check.device == "gpu" else 0
    per_epoch = (pairs.counts["train"] * 6 + pairs.counts["val"] * 2) * lengths.student_mean * backbone.matmul_params
    test = pairs.counts["test"] * 2 * lengths.student_mean * backbone.matmul_params
    st_hours, st_how = timer.flops(len(variants) * (s.epochs * per_epoch + test), student_check.device,
                                   student_gpus or s.num_workers * s.cpus_per_worker, cfg.plan.throughput.student_mfu)
    stages.append(StagePlan("distill", [engine["targets"], emb_check, student_check], [
        gen_work(f"targets: {_fmt(target_pairs)} pairs x {K} perspectives", texts, lengths.prompt_mean, shape=targets_teacher),
        Work(f"embed {_fmt(texts)} rationales ({d.embedder})", f"{_fmt(emb_tokens)} tokens, 2 x params FLOPs per token",
             emb_hours, emb_gpus, emb_how),
        Work(f"{len(variants)} students ({len(d.seeds)} seeds) x up to {s.epochs} epochs",
             f"{_fmt(pairs.counts['train'])} train pairs of {lengths.student_mean:.0f} tokens, 6 x params FLOPs per token",
             st_hours, student_gpus, st_how)]))
    stages.append(StagePlan("report"))
    most = max((w.gpus for st in stages for w in st.work), default=0)
    if most and cluster.gpus > most:
        notes.append(f"no stage uses more than {most} of the cluster's {cluster.gpus} GPUs: more engines "
                     "(generation.concurrency) or workers shorten the run at about the same GPU-hours")
    for stp in stages:
        stp.measured_s = measured.get(stp.name)
    if measured_tps:
        notes.append(f"the finished run in {run_dir} generated {measured_tps:,.0f} completion tokens/s (stats.json)")
    return Plan(cfg, cluster, pairs, shapes, lengths, stages, accuracy, notes)


# ---------------------------------------------------------------- output


def render(plan: Plan, config_path: str) -> str:
    """The plan as text: cluster, data, models, per-stage memory and verdict, the time and cost table, assumptions."""
    cfg = plan.cfg
    lines = [f"thinkbroad plan: {config_path} ({cfg.name})", f"cluster: {plan.cluster.describe()}"]
    lines += [f"  note: {n}" for n in plan.notes]
    c = plan.pairs.counts
    lines.append(f"data: {sum(c.values()):,} pairs (train {c['train']:,}, val {c['val']:,}, test {c['test']:,}) from {plan.pairs.source}")
    lines.append("models:")
    for role, s in plan.shapes.items():
        lines.append(f"  {role:<9}{s.name}: {s.model_type}, {s.params / 1e9:.3f}B parameters (largest layer {s.largest_layer / 1e6:.0f}M), "
                     f"{s.layers} layers x {s.hidden}, {s.kv_heads} KV heads x {s.head_dim}, {s.dtype}; from {s.source}")
    L = plan.lengths
    lines.append(f"tokens: MPCoT prompt {L.prompt_mean:.0f} on average (longest {L.prompt_max}), neutral prompt {L.neutral_mean:.0f} "
                 f"[{L.prompt_how}]; answer {L.completion:.0f} [{L.completion_how}]; student input {L.student_mean:.0f} [{L.student_how}]")
    lines += ["", "memory and placement per stage"]
    shown: dict[tuple, str] = {}  # the same engines in several stages: their arithmetic once
    for st in plan.stages:
        if not st.checks:
            lines.append(f"{st.name:<13} CPU only: nothing to check")
            continue
        lines.append(f"{st.name:<13} {'fits' if st.fits else 'DOES NOT FIT'}")
        for ck in st.checks:
            key = (ck.placement, tuple(ck.lines), ck.problem)
            if key in shown:
                lines.append(f"  {ck.what} [{ck.device.upper()}]: the same engines and memory as in {shown[key]}")
                continue
            shown[key] = st.name
            lines.append(f"  {ck.what} [{ck.device.upper()}]: {ck.placement}")
            lines += [f"    {x}" for x in ck.lines]
            if not ck.fits:
                lines.append(f"    DOES NOT FIT: {ck.problem}")
    lines += ["", render_table(plan), "", "assumptions:"]
    lines += [f"  - {a}" for a in assumptions(plan)]
    return "\n".join(lines)


def render_table(plan: Plan) -> str:
    """Markdown table: per stage the work, GPUs held, hours, GPU-hours and cost, with a total."""
    price = plan.cfg.plan.gpu_hour_usd
    measured = any(st.measured_s for st in plan.stages)
    head = "| stage | work | rate | GPUs held | hours | GPU-hours |" + (" cost |" if price else "") + (" measured |" if measured else "")
    rows = [head, "|---" * (head.count("|") - 1) + "|"]
    tot_h = tot_gh = 0.0
    unknown = False
    for st in plan.stages:
        for w in st.work:
            held = plan.cluster.held_gpus(w.gpus)
            gh = None if w.hours is None else w.hours * held
            if w.hours is None:
                unknown = True
            else:
                tot_h += w.hours
                tot_gh += gh
            cells = [st.name, f"{w.what}: {w.detail}", w.how, str(held), _h(w.hours), _h(gh)]
            if price:
                cells.append("—" if gh is None else f"${gh * price:,.0f}")
            if measured:
                cells.append(f"{st.measured_s / 3600:.2f} h" if st.measured_s else "")
            rows.append("| " + " | ".join(cells) + " |")
    total = ["**total**", "", "", "", f"**{_h(tot_h)}**", f"**{_h(tot_gh)}**"]
    if price:
        total.append(f"**${tot_gh * price:,.0f}**")
    if measured:
        total.append("")
    rows.append("| " + " | ".join(total) + " |")
    if unknown:
        rows.append("\n(— not estimated; the total leaves it out)")
    return "\n".join(rows)


def _h(x: float | None) -> str:
    return "—" if x is None else f"{x:,.1f}" if x >= 10 else f"{x:.2f}"


def assumptions(plan: Plan) -> list[str]:
    cfg, a, t = plan.cfg, plan.cfg.plan.assume, plan.cfg.plan.throughput
    out = [f"teacher accuracy {plan.accuracy[0]:.0%} ({plan.accuracy[1]}): SFT rows = rationales x accuracy; DPO rows = "
           "rationales x (1 - accuracy), an upper bound; pairs resampled = pairs x (1 - accuracy)^(perspectives x samples)",
           "each model load (engine start, trainer start and export) " + ", ".join(f"{m:g} min on {d.upper()}" for d, m in
           ({"gpu": 5.0, "cpu": 0.5} | a.startup_minutes).items()) + f"; per GPU {a.gpu_runtime_gib:g} GiB "
           "beyond the estimates (CUDA context, NCCL, allocator) [plan.assume]",
           f"generation time = (prompt + answer tokens) / (tokens/s per GPU x GPUs); the figure is a serving benchmark's "
           "total throughput, prefix caching of the shared few-shot prompt is not credited [plan.throughput.generation_tokens_per_s]",
           f"training time = FLOPs / (GPUs x bf16 peak x utilisation): teacher {t.train_mfu:.0%}, student {t.student_mfu:.0%}; "
           "attention FLOPs and early stopping are not counted; students run every epoch [plan.throughput]",
           f"CPU work at {t.cpu_gflops_per_core:g} GFLOPS per core [plan.throughput.cpu_gflops_per_core]",
           "training memory at the longest row (max_length) in every micro-batch; activations counted from what a layer keeps "
           "for backward (workflows/shapes.py); TRL's fused LM head never builds the full logits",
           "GPUs held: whole nodes, at least the nodes the cluster keeps (min_workers); the head node and storage are not priced"]
    if cfg.plan.gpu_hour_usd:
        out.append(f"price ${cfg.plan.gpu_hour_usd:g} per GPU-hour [plan.gpu_hour_usd]")
    return out


# ---------------------------------------------------------------- the check in `thinkbroad run`


def check_run(cfg: RunConfig, run_dir: Path, stages: list[str], cluster: Cluster | None = None) -> list[str]:
    """Before a run: the plan's one-line verdict per stage; PlanRefused naming each stage that cannot fit."""
    cluster = cluster or default_cluster()
    plan = make_plan(cfg, run_dir, cluster)
    chosen = [s for s in plan.stages if s.name in stages]
    lines = [f"plan on {cluster.describe()}:"] + [f"  {s.verdict()}" for s in chosen]
    bad = [s for s in chosen if not s.fits]
    if bad:
        raise PlanRefused("\n".join(lines) + "\nthe plan refuses " + ", ".join(s.name for s in bad) + " (above: the number and "
                          "the fix); `thinkbroad plan --config ...` shows the whole plan, `thinkbroad run --no-plan` skips this check")
    return lines
