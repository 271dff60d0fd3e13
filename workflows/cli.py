"""The `thinkbroad` command line."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path

from hardware.cpu import PrecisionError
from workflows.config import ConfigError, load_config
from pairs.errors import DataError
from workflows.models import BUILTIN, ModelNotFound, resolve_model
from workflows.cluster import PlanError, cluster_from_flags, cluster_from_yaml
from workflows.plan import PlanRefused
from hardware import runtime
from hardware.runtime import RayStartError, stop_on_signals, stop_ray
from workflows.shapes import ShapeError
from workflows.tracking import TrackingError
from workflows.logs import say_last

USER_ERRORS = (ConfigError, DataError, ModelNotFound, RayStartError, PlanError, PlanRefused, ShapeError, TrackingError)


def _with_config(sub, name: str, help_text: str):
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", required=True, help="run config YAML (see configs/)")
    p.add_argument("--run-dir", default=None, help="output folder (default: run_dir from the config, else runs/<name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (YAML), e.g. --set distill.seeds=[0,1,2]; repeatable")
    return p


def _cluster_args(p) -> None:
    c = p.add_argument_group("cluster (default: this machine; in a `ray job submit` job, the Ray cluster)")
    c.add_argument("--cluster", default=None, metavar="YAML", help="a Ray cluster-launcher config, e.g. cluster.yaml")
    c.add_argument("--nodes", type=int, default=None, help="GPU nodes (with --gpus-per-node and --gpu-memory-gb)")
    c.add_argument("--gpus-per-node", type=int, default=None)
    c.add_argument("--gpu-memory-gb", type=float, default=None, help="memory of one GPU (nominal GB, e.g. 80)")
    c.add_argument("--gpu-type", default=None, help="A100-40G, A100-80G, H100, H200 or L40S (times the run)")
    c.add_argument("--cpus-per-node", type=float, default=None)


def _cluster(args):
    """The cluster the flags describe, or None for the default (workflows/cluster.py default_cluster)."""
    if args.cluster:
        if args.nodes or args.gpus_per_node:
            raise PlanError("give --cluster or --nodes/--gpus-per-node, not both")
        return cluster_from_yaml(args.cluster)
    if args.nodes or args.gpus_per_node or args.gpu_memory_gb or args.gpu_type:
        if not args.gpus_per_node:
            raise PlanError("--nodes/--gpu-memory-gb/--gpu-type need --gpus-per-node")
        return cluster_from_flags(args.nodes or 1, args.gpus_per_node, args.gpu_memory_gb, args.gpu_type, args.cpus_per_node)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinkbroad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    r = _with_config(sub, "run", "the whole pipeline: prepare -> generate -> sft -> dpo -> teacher_eval -> distill -> report")
    r.add_argument("--from", dest="from_stage", default=None, metavar="STAGE", help="rerun from this stage on")
    r.add_argument("--only", default=None, metavar="STAGE", help="run this stage only (and any stale dependency)")
    r.add_argument("--no-plan", action="store_true", help="skip the pre-flight check (thinkbroad plan) before the stages")
    r.add_argument("--profile", default=None, choices=["auto", "full", "lean", "small", "minimal"],
                   help="the demo's size for this host (workflows/demo.py): auto measures the CPU and picks the largest "
                   "that fits 20 min; the choice, its estimate and what it left out go to RUN_DIR/demo_profile.json and the report")
    _cluster_args(r)
    pl = _with_config(sub, "plan", "pre-flight: per stage what runs where, memory per GPU, fits or not; time and cost")
    pl.add_argument("--pairs", type=int, default=None, metavar="N", help="plan for N labelled pairs (default: the data file's)")
    _cluster_args(pl)
    _with_config(sub, "prepare", "validate the labelled pairs and split them by query")
    g = _with_config(sub, "generate", "MPCoT: judge each training pair from every perspective with the teacher LLM")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, text in (("sft", "teacher SFT on the consistency-filtered rationales (runs generate first if needed)"),
                       ("dpo", "teacher DPO on conflict samples, from the SFT model"),
                       ("teacher-eval", "base vs SFT vs SFT+DPO teacher on the test split"),
                       ("distill", "LRKD: teacher rationale targets, then every student variant side by side"),
                       ("ablate", "student ablation: extractor x mode x lambda -> ablation.csv/.md/.png")):
        _with_config(sub, name, text)
    sc = sub.add_parser("score", help="score a pair file with a trained student on Ray Data workers -> Parquet parts (+ metrics when labelled)")
    sc.add_argument("pairs", help="pairs to score: any file `prepare` reads (labelled or not)")
    sc.add_argument("--student", required=True, help="a student folder, or a run dir (its best LRKD student on validation)")
    sc.add_argument("--output", required=True, help="the output Parquet folder (resumable: a rerun scores only what is missing)")
    sc.add_argument("--config", default=None, help="run config whose data mapping, joins, filter, labels and distill.score to use")
    sc.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = _with_config(sub, "eval", "evaluate a trained student folder on the test split")
    e.add_argument("--student", required=True, help="a student folder (student_config.json + model.safetensors)")
    sv = sub.add_parser("serve", help="serve a trained student over HTTP on Ray Serve")
    sv.add_argument("target", help="a student folder, or a run dir (the best LRKD variant is served)")
    sv.add_argument("--config", default=None, help="run config whose `serve:` section to use (default: built-in defaults)")
    sv.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=None)
    sv.add_argument("--print-config", action="store_true", help="print a `serve deploy` config YAML and exit")
    sv.add_argument("--backend", default=None, choices=["auto", "torch", "onnxruntime"], help="overrides serve.backend")
    sv.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16", "fp16", "int8"], help="overrides serve.precision")
    sv.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config value (YAML), e.g. --set serve.replicas=2; repeatable")
    x = sub.add_parser("export", help="export a trained student to ONNX for other serving stacks (into its folder)")
    x.add_argument("target", help="a student folder, or a run dir (its best LRKD variant)")
    x.add_argument("--format", default="onnx", choices=["onnx"])
    x.add_argument("--quantize", default=None, choices=["int8"], help="also write model.int8.onnx (dynamic quantization)")
    x.add_argument("--data", default=None, help="labelled pairs to check parity on (default: the run's validation split)")
    cp = sub.add_parser("compare", help="the students of several runs side by side: macro-F1 with intervals, latency, "
                        "teacher, target source, lambda (Markdown + PNG)")
    cp.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders whose student stage has finished")
    cp.add_argument("--out", default=None, help="also write the Markdown table here (and the plot beside it as .png)")
    cp.add_argument("--plot", default=None, help="the PNG plot (default: --out with .png)")
    m = sub.add_parser("setup-models", help="build/convert the built-in local models into the cache (once)")
    m.add_argument("names", nargs="*", default=list(BUILTIN), help=f"any of {', '.join(BUILTIN)}")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`argv` None: the command line (`thinkbroad ...`, `python -m workflows.cli ...`): Ctrl-C and SIGTERM stop a
    stage cleanly and a stage's output is filtered onto the console and kept whole in RUN_DIR/logs/ (workflows/logs.py).
    A list (tests, other Python code): neither, and an unexpected exception propagates."""
    args = build_parser().parse_args(argv)
    command_line = argv is None
    if command_line and args.command != "serve":  # serve has its own SIGTERM/SIGHUP handling (serve/launch.py)
        stop_on_signals()
    try:
        if args.command == "setup-models":
            for name in args.names:
                print(f"{name}: {resolve_model(name)}")
            return 0
        if args.command == "serve":
            return _serve(args)
        if args.command == "export":
            return _export(args)
        if args.command == "compare":
            return _compare(args)
        if args.command == "score":
            return _stopping("score", command_line, _score, args)
        from workflows.stages.common import run_dir_for

        cfg = load_config(args.config, args.overrides)
        run_dir = run_dir_for(cfg, args.run_dir)
        if args.command == "plan":
            from workflows.cluster import default_cluster
            from workflows.plan import make_plan, render

            plan = make_plan(cfg, run_dir, _cluster(args) or default_cluster(), args.pairs)
            print(render(plan, args.config))
            return 0
        if not command_line or os.environ.get("THINKBROAD_LOG", "").lower() == "off":
            return _stopping(args.command, command_line, _stage, args, cfg, run_dir)
        from workflows.logs import capture

        with capture(run_dir, args.command) as log_file:
            print(f"[thinkbroad] full log: {log_file}", flush=True)
            try:
                return _stopping(args.command, command_line, _stage, args, cfg, run_dir)
            except Exception:  # a bug or a library failure: the traceback, into the log file too
                traceback.print_exc()
                say_last(f"thinkbroad: {args.command} failed; the full log is {log_file}")
                return 1
            finally:
                stop_ray()  # what the workers still print is filtered and logged, not printed after the log closes
    except (*USER_ERRORS, PrecisionError) as exc:
        print(f"thinkbroad: error: {exc}", file=sys.stderr)
        return 2


def _stopping(command: str, command_line: bool, fn, *args) -> int:
    """fn(*args); on the command line, Ctrl-C or SIGTERM shuts Ray down and prints one line: exit code 128 + the
    signal (130, 143). Nothing is removed: every stage writes atomically and resumes from what it finished."""
    try:
        return fn(*args)
    except (*USER_ERRORS, PrecisionError) as exc:
        print(f"thinkbroad: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as exc:
        if not command_line:
            raise
        signum = getattr(exc, "signum", None) or runtime.stopped_by or signal.SIGINT
        where = f"stage {pipeline_stage()}" if command == "run" and pipeline_stage() else command
        stop_ray()
        say_last(f"thinkbroad: stopped by {signal.Signals(signum).name} during {where} (Ray shut down); finished "
                 "stages, generation parts and training checkpoints are kept: run the same command again to resume")
        return 128 + signum


def pipeline_stage() -> str | None:
    from workflows import pipeline

    return pipeline.current_stage


def _score(args) -> int:
    from workflows.stages.score import score_file

    cfg = load_config(args.config, args.overrides) if args.config else None
    if args.overrides and not args.config:
        print("thinkbroad: error: --set needs --config (the config it overrides)", file=sys.stderr)
        return 2
    try:
        metrics = score_file(args.pairs, args.student, args.output, cfg, progress=not args.no_progress)
    except FileNotFoundError as exc:  # not a student folder or run dir
        print(f"thinkbroad: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    return 0


def _stage(args, cfg, run_dir: Path) -> int:
    """One pipeline command on `run_dir`: each command's stage is one module of workflows/stages/; then MLflow gets
    what it finished (workflows/tracking.py)."""
    from workflows import tracking
    from workflows.stages.common import log

    tracking.check(cfg)

    if args.command == "run":
        from workflows.pipeline import STAGES, run

        for given in (args.from_stage, args.only):
            if given and given not in STAGES:
                print(f"thinkbroad: error: unknown stage {given!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
                return 2
        if args.profile:  # the profile's sizes, then the user's --set (which win)
            from workflows import demo

            load = lambda extra: load_config(args.config, [*extra, *args.overrides])  # noqa: E731
            name, info = demo.resolve(args.profile, run_dir, load)
            base, cfg = cfg, load(demo.PROFILES[name])
            log(demo.record(run_dir, info, base, cfg))
        print(run(cfg, run_dir, args.from_stage, args.only, check=not args.no_plan, cluster=_cluster(args)))
    elif args.command == "prepare":
        from workflows.stages import prepare

        prepare.prepare(cfg, run_dir)
    elif args.command == "generate":
        from workflows.stages import generate

        out = generate.generate(cfg, run_dir, progress=not args.no_progress)
        print(generate.summary(Path(out) / "stats.json"))
    elif args.command in ("sft", "dpo", "teacher-eval"):
        from workflows.stages import teacher

        step = {"sft": teacher.sft, "dpo": teacher.dpo, "teacher-eval": teacher.teacher_eval}
        print(step[args.command](cfg, run_dir))
    elif args.command == "distill":
        from workflows.stages import students

        print(students.distill(cfg, run_dir))
    elif args.command == "ablate":
        from workflows.stages import ablate

        print(ablate.ablate(cfg, run_dir))
    elif args.command == "eval":
        from workflows.stages import score

        print(json.dumps(score.evaluate_folder(cfg, run_dir, args.student), indent=2))
    if args.command != "eval":
        tracking.sync(cfg, run_dir, log)
    return 0


def _serve(args) -> int:
    from serve.launch import check_api_key, ensure_export, find_student, run_local, serve_deploy_config
    from workflows.config import load_serve_config

    settings = load_serve_config(args.config, args.overrides)
    given = {"host": args.host, "port": args.port, "backend": args.backend, "precision": args.precision}
    settings = settings.model_copy(update={k: v for k, v in given.items() if v is not None})
    try:
        student = find_student(args.target)
    except FileNotFoundError as exc:
        print(f"thinkbroad: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        ensure_export(student, settings)  # the replicas on the cluster read the exported files from the same path
        print(serve_deploy_config(student, settings))
        return 0
    try:
        check_api_key(settings)
    except ValueError as exc:
        print(f"thinkbroad: error: {exc}", file=sys.stderr)
        return 2
    run_local(student, settings, reload=lambda: find_student(args.target))  # SIGHUP: a run dir's best student anew
    return 0


def _compare(args) -> int:
    from workflows.compare import CompareError, compare

    try:
        print(compare(args.run_dirs, args.out, args.plot))
    except CompareError as exc:
        print(f"thinkbroad: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _export(args) -> int:
    """`thinkbroad export`: model.onnx (+ model.int8.onnx) and onnx_export.json into the student folder."""
    import pyarrow.parquet as pq

    from serve.launch import find_student, run_split
    from student.export import check_set, export_onnx, summarize
    from pairs.config import ColumnMap
    from pairs.scan import load_pairs

    try:
        student = find_student(args.target)
    except FileNotFoundError as exc:
        print(f"thinkbroad: error: {exc}", file=sys.stderr)
        return 2
    labels = json.loads((student / "student_config.json").read_text())["labels"]
    source = args.data or run_split(student, "val")
    table = None if source is None else load_pairs(source, "auto", ColumnMap(), labels) if args.data else pq.read_table(source)
    pairs, gold = check_set(table) if table is not None else (None, None)
    report = export_onnx(student, quantize=args.quantize == "int8", check_pairs=pairs, check_labels=gold)
    from student.card import refresh_card

    refresh_card(student)  # the model card (README.md, beside model.onnx) states the export and its parity
    print(f"exported {student}: {', '.join(report['files'])}; inputs {', '.join(report['inputs'])}; outputs "
          f"{', '.join(report['outputs'])}; parity checked on {source or 'built-in probe pairs (int8 not judged; give --data)'}")
    print(summarize(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
