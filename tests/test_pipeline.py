"""The whole pipeline as users run it: the cluster-launcher config, `ray job submit` to a `ray start --head` on
127.0.0.1, and the smoke pipeline on a simulated two-node cluster, killed mid-stage and resumed."""
import csv
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import ROOT
from hardware.runtime import free_port

BIN = Path(sys.executable).parent
SMOKE_VARIANTS = {"vanilla", "logit_kd", "lrkd-poly-unified", "lrkd-poly-unified-lam0"}


def _manifests(run_dir: Path) -> dict[str, str]:
    """stage folder -> finished_at of its manifest: a stage that reran gets a new timestamp."""
    return {str(p.parent.relative_to(run_dir)): json.loads(p.read_text())["finished_at"]
            for p in run_dir.rglob("manifest.json") if "ray" not in p.parts}


def _check_report(run_dir: Path, variants: set[str], teacher_eval: bool) -> dict:
    report = (run_dir / "report.md").read_text()
    assert "## MPCoT generation" in report and "## Student variants" in report and "**Paired verdicts**" in report
    assert "informativeness probe" in report and "grad ratio" in report
    assert ("## Teacher: base vs SFT vs SFT+DPO" in report) == teacher_eval
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["student"]) == variants
    assert (run_dir / "plots" / "student.png").read_bytes()[:4] == b"\x89PNG"
    # exactly one rationale per (pair, perspective): nothing lost or duplicated
    cfg_pairs = 8
    rationales = pq.read_table(run_dir / "mpcot" / "rationales.parquet")
    ids = rationales.column("task_id").to_pylist()
    assert len(ids) == len(set(ids)) == cfg_pairs * 3
    return metrics


def test_cluster_yaml_is_valid_for_the_ray_cluster_launcher():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(cluster, schema)
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    assert any(t["resources"].get("GPU", 0) > 0 for t in types.values()), "a GPU worker type"
    assert any('.[gpu]' in c for c in cluster["setup_commands"]), "setup installs thinkbroad[gpu]"
    # the paper config's outputs and model paths live on the storage every node mounts
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    shared = "/mnt/shared"
    assert paper["run_dir"].startswith(shared) and paper["teacher"]["model"].startswith(shared)
    assert any(shared in c for c in cluster["setup_commands"]), "setup mounts the shared storage"


@pytest.fixture(scope="module")
def submitted(tmp_path_factory):
    """The smoke pipeline through `ray start --head` on 127.0.0.1 and `ray job submit --working-dir . -- thinkbroad
    run`, as the README says, submitted twice (the second finds every stage up to date). The head stays up for the
    test's own CLI calls (`env` connects them to it: no Ray start each) until it calls `stop()`, or the module ends.
    The one full smoke run of the suite: the two-node test starts from its finished teacher stages."""
    tmp_path = tmp_path_factory.mktemp("submit")
    dash = free_port()
    # Ray >= 2.59 turns on token authentication for local clusters: the head and `ray job submit` share the token
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env.pop("RAY_ADDRESS", None)
    # every port free, so another Ray instance on this machine cannot collide with this head
    gcs = free_port()
    ports = [f"--port={gcs}"] + [f"--{flag}={free_port()}" for flag in (
        "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "runtime-env-agent-port", "metrics-export-port", "node-manager-port", "object-manager-port")]
    # a short temp dir: Ray's Unix socket paths under it must stay within 107 characters
    ray_tmp = tempfile.mkdtemp(prefix="tb-ray-", dir="/tmp")
    head_log = tmp_path / "ray-head.log"
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", *ports,
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
         "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        env=env, cwd=tmp_path, start_new_session=True, stdout=open(head_log, "w"), stderr=subprocess.STDOUT)
    run_dir = tmp_path / "run"
    address = f"http://127.0.0.1:{dash}"
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT), "--",
              "thinkbroad", "run", "--config", "configs/smoke.yaml", "--run-dir", str(run_dir)]

    def stop():
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGKILL)  # the head's processes share its session; SIGTERM drains for 30 s
            head.wait()
        shutil.rmtree(ray_tmp, ignore_errors=True)

    try:
        _wait_for_dashboard(address, head, head_log)
        job = _submit(submit, env)
        done = _manifests(run_dir)
        again = _submit(submit, env)
        yield {"run_dir": run_dir, "job": job, "done": done, "again": again, "after_again": _manifests(run_dir),
               "env": {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, "stop": stop}
    finally:
        stop()


@pytest.mark.ray
@pytest.mark.vllm
def test_ray_job_submit_runs_the_smoke_pipeline(submitted):
    run_dir, job, again = submitted["run_dir"], submitted["job"], submitted["again"]
    out = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "=== stage 7/7: report ===" in out
    # the log reads like the pipeline: no Traceback, the libraries' notices only in the full log under the run dir
    assert "Traceback" not in out, out[max(0, out.find("Traceback") - 1500):][:5000]
    full = [p.read_text() for p in sorted((run_dir / "logs").glob("run-*.log"))]
    assert len(full) == 2 and "=== stage 7/7: report ===" in full[0]  # the job, then the same job again
    assert "Starting execution of Dataset" in full[0] and "Starting execution of Dataset" not in out
    metrics = _check_report(run_dir, SMOKE_VARIANTS, teacher_eval=True)
    assert set(metrics["teacher_eval"]["models"]) == {"base", "sft", "dpo"}
    # MLflow: each stage's results as it finishes (11 nested runs: 7 stages, 4 students), and no library chatter
    assert sum(int(n) for n in re.findall(r"tracking: (\d+) new MLflow runs? ", out)) == 11, out[-4000:]
    assert "alembic" not in out and "mlflow.store" not in out

    # the same job again: every stage is up to date, nothing reruns
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert submitted["after_again"] == submitted["done"]
    assert "student [" not in out and "teacher eval: base, sft, dpo" not in out
    # ... and nothing is logged twice: the store holds each stage and student once, with the numbers of its files
    stages = _check_tracking(run_dir, {"prepare", "generate", "sft", "dpo", "teacher_eval", "distill", "report",
                                       *(f"student {v}-seed0" for v in SMOKE_VARIANTS)})
    assert "tracking:" not in out

    # every student folder carries its model card, written from the run's numbers; vanilla is also a CrossEncoder
    for best in (run_dir / "student" / "variants").glob("*-seed0/best"):
        card = (best / "README.md").read_text()
        assert "pipeline_tag: text-classification" in card and "## Evaluation" in card and "## ONNX interface" in card[card.index("## Use"):]
        # no extractor (vanilla, logit-KD): also a CrossEncoder
        assert (best / "modules.json").exists() == best.parent.name.startswith(("vanilla", "logit_kd"))
    smoke_card = (run_dir / "student" / "variants" / "lrkd-poly-unified-seed0" / "best" / "README.md").read_text()
    assert "DPO-trained tiny-random-qwen2" in smoke_card and "a demonstration of the pipeline, not a production model" in smoke_card
    cmp = subprocess.run([sys.executable, "-m", "workflows.cli", "compare", str(run_dir)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    table = cmp.stdout.splitlines()[2:]  # below the header and its rule (the header's first cell is "run" too)
    assert cmp.returncode == 0 and {line.split(" | ")[1] for line in table
                                    if line.startswith(f"| {run_dir.name} |")} == SMOKE_VARIANTS, cmp.stdout + cmp.stderr
    # a finished run's students evaluate again through the CLI, and the ablation adds only what distill did not train
    # (on the submitted run's head: connected through RAY_ADDRESS, as a user on the cluster's head node would be)
    cfg, head = str(ROOT / "configs" / "smoke.yaml"), submitted["env"]
    student = run_dir / "student" / "variants" / "lrkd-poly-unified-seed0" / "best"
    ev = subprocess.run([sys.executable, "-m", "workflows.cli", "eval", "--config", cfg, "--run-dir", str(run_dir),
                         "--student", str(student)], cwd=ROOT, env=head, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-2000:]
    runs = json.loads((run_dir / "student" / "metrics.json").read_text())["runs"]
    assert json.loads(ev.stdout[ev.stdout.index("{"):])["macro_f1"] == pytest.approx(
        next(r for r in runs if r["variant"] == "lrkd-poly-unified")["metrics"]["macro_f1"])
    abl = subprocess.run([sys.executable, "-m", "workflows.cli", "ablate", "--config", cfg, "--run-dir", str(run_dir)],
                         cwd=ROOT, env=head, capture_output=True, text=True, timeout=900)
    assert abl.returncode == 0, abl.stderr[-3000:]
    assert "Traceback" not in abl.stdout + abl.stderr, abl.stderr[-3000:]
    # new: the gold-conditioned and label-text students, and the default variant learning from the SFT teacher
    trained = re.findall(r"student \[\d+/\d+\] (\S+) seed 0: .*, done", abl.stdout)
    assert sorted(trained) == ["lrkd-poly-unified", "lrkd-poly-unified-gold_conditioned", "lrkd-poly-unified-label_text"], abl.stdout[-3000:]
    # both teachers' students in one worker group, which scores them too
    assert re.findall(r"students: (\d+) to train", abl.stdout) == ["3"] and "scored on the validation and test splits by the same workers" in abl.stdout
    assert "targets [gold_conditioned]: dpo teacher writes 72 rationales (16 train + 8 val pairs x 3 perspectives; told the gold label)" in abl.stdout
    assert "targets [teacher]: sft teacher writes 72 rationales" in abl.stdout
    gold = pq.read_table(run_dir / "student" / "targets" / "gold_conditioned" / "targets.parquet").to_pylist()
    assert all(r["predicted_label"] == r["gold_label"] for r in gold if r["parse_ok"])  # the answer is held to the gold label
    rows = list(csv.DictReader(open(run_dir / "student" / "ablation.csv")))
    assert {(r["variant"], float(r["lambda"]), r["source"], r["teacher"]) for r in rows} == {
        ("lrkd-poly-unified-lam0", 0.0, "", ""), ("lrkd-poly-unified-gold_conditioned", 0.1, "gold_conditioned", "dpo"),
        ("lrkd-poly-unified-label_text", 0.1, "label_text", ""), ("lrkd-poly-unified-sftteacher", 0.1, "teacher", "sft")}
    assert all(r["verdict"] == "no verdict (1 seed)" for r in rows if float(r["lambda"]) > 0)  # smoke trains one seed
    png = (run_dir / "student" / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    report = subprocess.run([sys.executable, "-m", "workflows.cli", "run", "--config", cfg, "--run-dir", str(run_dir),
                             "--only", "report"], cwd=ROOT, env=head, capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    text = (run_dir / "report.md").read_text()
    assert "## Student ablation" in text and "| label_text |" in text and "lrkd-poly-unified-label_text vs lrkd-poly-unified-lam0" in text
    # MLflow: the ablation (its table and plot), its three new students and the new report, beside the earlier runs
    after = _check_tracking(run_dir, {"ablate", "student lrkd-poly-unified-gold_conditioned-seed0",
                                      "student lrkd-poly-unified-label_text-seed0", "student lrkd-poly-unified-sftteacher-seed0",
                                      *{r.info.run_name for r in stages}})
    assert len(after) == len(stages) + 5  # + ablate, 3 students, the report written again
    client, ablation = _mlflow(run_dir)[0], next(r for r in after if r.info.run_name == "ablate")
    assert {a.path for a in client.list_artifacts(ablation.info.run_id)} >= {"ablation.csv", "ablation.png", "ablation.md"}
    submitted["stop"]()  # the two-node test needs the cores


def _mlflow(run_dir: Path) -> tuple:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id], max_results=1000)
    return client, [r for r in runs if r.data.tags.get("thinkbroad.kind") == "stage"]


def _numbers(obj, prefix: str = "") -> dict:
    """The numeric leaves of a JSON document by dotted path (MLflow's names: '@' and '~' as '_')."""
    if isinstance(obj, (dict, list)):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        return {k: v for key, value in items for k, v in _numbers(value, f"{prefix}{key}.").items()}
    if isinstance(obj, (int, float)) and not isinstance(obj, bool) and obj == obj:
        return {re.sub(r"[@~]", "_", prefix[:-1]): float(obj)}
    return {}


def _check_tracking(run_dir: Path, names: set[str]) -> list:
    """RUN_DIR/mlflow holds one nested run per stage and student result (`names`: the newest of each), each with
    the numbers of the files its stage wrote; returns the nested runs."""
    client, runs = _mlflow(run_dir)
    keys = [r.data.tags["thinkbroad.key"] for r in runs]
    assert len(keys) == len(set(keys)), "a result logged twice"
    newest = {}
    for r in sorted(runs, key=lambda r: r.info.start_time):
        newest[r.info.run_name] = r
    assert set(newest) == names
    assert all(r.info.status == "FINISHED" and r.data.tags.get("thinkbroad.complete") == "1" for r in runs)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("benchmarks")
    report = newest["report"]
    assert report.data.metrics == _numbers(metrics)  # every number of metrics.json, and nothing else
    assert {a.path for a in client.list_artifacts(report.info.run_id)} == {"metrics.json", "report.md", "plots"}
    assert {a.path for a in client.list_artifacts(report.info.run_id, "plots")} == {"plots/student.png", "plots/teacher.png"}
    assert newest["teacher_eval"].data.metrics["models.dpo.all.accuracy"] == metrics["teacher_eval"]["models"]["dpo"]["all"]["accuracy"]
    student = json.loads((run_dir / "student" / "metrics.json").read_text())
    for r in student["runs"]:  # each student: its test metrics and its per-epoch curves
        run = newest[f"student {r['variant']}-seed{r['seed']}"]
        assert run.data.metrics["test.macro_f1"] == r["metrics"]["macro_f1"] and run.data.params["variant.seed"] == str(r["seed"])
        history = json.loads((run_dir / "student" / "variants" / f"{r['variant']}-seed{r['seed']}" / "history.json").read_text())
        for key in ("val_macro_f1", "train_ce", *(["train_guidance", "diag_grad_ratio"] if r["variant"] == "lrkd-poly-unified" else [])):
            curve = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            assert curve == [(h["epoch"], h[key]) for h in history], key
    sft = json.loads((run_dir / "teacher" / "sft" / "log_history.json").read_text())
    assert sorted((m.step, m.value) for m in client.get_metric_history(newest["sft"].info.run_id, "loss")) == \
        [(h["step"], h["loss"]) for h in sft if "loss" in h]
    return runs


def _submit(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's dashboard agent is still starting."""
    for _ in range(12):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
        if "No available agent" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(5)
    return proc


def _wait_for_dashboard(address: str, head: subprocess.Popen, head_log: Path, timeout: float = 180) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{address}/api/version", timeout=5):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 without the token): it is up
        except OSError:
            pass
        if head.poll() is not None:
            raise AssertionError(f"`ray start --head` exited with {head.returncode}:\n{head_log.read_text()[-3000:]}")
        if time.time() > deadline:
            raise AssertionError(f"the Ray dashboard at {address} did not come up in {timeout:.0f} s:\n{head_log.read_text()[-3000:]}")
        time.sleep(1)


@pytest.mark.ray
@pytest.mark.vllm
def test_smoke_pipeline_on_two_nodes_killed_mid_stage_resumes(submitted, tmp_path):
    """Two simulated nodes of one CPU each (so the two training workers must span both), the pipeline SIGKILLed in
    the middle of the student stage, then started again: no finished stage or student reruns, nothing is lost.
    It starts from the submitted run's teacher stages and targets (the same config: each is up to date, so no
    engine starts again), with no student trained yet."""
    import ray
    from ray.cluster_utils import Cluster

    from hardware.runtime import HEALTH_CHECK

    assert submitted["job"].returncode == 0, "the submitted smoke run failed (test_ray_job_submit_runs_the_smoke_pipeline)"
    run_dir = tmp_path / "run"
    for part in ("data", "mpcot", "teacher", "student/targets/teacher"):
        shutil.copytree(submitted["run_dir"] / part, run_dir / part)
    cmd = [sys.executable, "-m", "workflows.cli", "run", "--config", "configs/smoke.yaml", "--run-dir", str(run_dir)]

    ray.shutdown()  # the session's local instance (tests/conftest.py ray_local), if a module before started it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    try:
        # the killed run at Ray's 2 s health check: a worker's epoch report then waits up to a poll for the controller
        # (Ray Train's result queue holds one), so the third student is still in its second epoch when the kill lands
        first = subprocess.Popen(cmd, cwd=ROOT, env={**env, HEALTH_CHECK: "2.0"}, start_new_session=True, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seen = []
        for line in first.stdout:
            seen.append(line)
            if "student [3/" in line:  # two students finished, the third is one epoch in
                break
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log = "".join(seen)
        assert "student [3/" in log, log[-4000:]
        before = _manifests(run_dir)
        assert {"data", "mpcot", "teacher/sft", "teacher/dpo", "student/targets/teacher"} <= set(before)
        variants = run_dir / "student" / "variants"
        finished = {p: p.stat().st_mtime_ns for name in ("vanilla-seed0", "logit_kd-seed0")
                    for p in (variants / name / "trained.json", variants / name / "best" / "model.safetensors")}
        assert not (run_dir / "report.md").exists()

        second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        out = second.stdout + second.stderr
        assert second.returncode == 0, out[-4000:]
        after = _manifests(run_dir)
        assert {k: after[k] for k in before} == before, "a finished stage ran again"
        assert {p: p.stat().st_mtime_ns for p in finished} == finished, "a finished student trained again"
        for stage in ("prepare", "generate", "sft", "dpo", "targets [teacher]"):
            assert f"{stage}: up to date" in out
        # the interrupted student continues at its second epoch
        assert "student [1/" not in out and "student [2/" not in out and "student [3/4] lrkd-poly-unified seed 0: epoch 2/2" in out
        _check_report(run_dir, SMOKE_VARIANTS, teacher_eval=True)

        # the two training workers of each stage ran on different nodes
        ray.init(address=cluster.address)
        from ray.util.state import list_actors

        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10_000, raise_on_missing_output=False)
        assert len({w.node_id for w in workers}) == 2
    finally:
        ray.shutdown()
        cluster.shutdown()
