"""Ctrl-C and SIGTERM on a stage: exit code 128 + signal, one line that says what is kept, Ray shut down, partial
work left in place, and the whole output in RUN_DIR/logs/."""
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT

pytestmark = pytest.mark.ray

# `thinkbroad prepare` whose stage starts Ray (as every stage does), writes part of its output and then works on;
# the optional Ray Train run holds the SIGINT handler Ray Train installs in `fit`.
SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import workflows.stages.prepare as stages
    from hardware.runtime import ensure_ray

    def slow_prepare(cfg, run_dir):
        ensure_ray()
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / "part-0.txt").write_text("kept")
        if {train!r}:
            from ray.train import ScalingConfig
            from ray.train.torch import TorchTrainer

            def loop(config):
                print("[thinkbroad] prepare: training", flush=True)
                time.sleep(300)

            TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, use_gpu=False)).fit()
        import ray

        print("[thinkbroad] prepare: working", flush=True)
        @ray.remote(num_cpus=0)
        def work():
            time.sleep(300)

        ray.get(work.remote())  # where a stage waits: in Ray's get

    stages.prepare = slow_prepare
    sys.argv = ["thinkbroad", "prepare", "--config", "configs/smoke.yaml", "--run-dir", {run_dir!r}]
    from workflows.cli import main
    sys.exit(main())
""")


def _stop_midway(tmp_path, sig: int, group: bool, wait_for: str, train: bool = False):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(run_dir=str(run_dir), train=train)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.time() + 240
    for line in proc.stdout:
        seen.append(line)
        if wait_for in line or time.time() > deadline:
            break
    assert wait_for in "".join(seen), "".join(seen)[-3000:]
    (os.killpg if group else os.kill)(proc.pid, sig)  # the group: what Ctrl-C in a terminal does
    out, err = proc.communicate(timeout=120)
    return proc.returncode, "".join(seen) + out, err, run_dir


def _dashboard_port(out: str) -> int:
    return int(re.search(r"Ray dashboard .*http://127\.0\.0\.1:(\d+)", out).group(1))


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("sig,group,train", [(signal.SIGTERM, False, False), (signal.SIGINT, True, True)],
                         ids=["SIGTERM", "Ctrl-C-in-Ray-Train"])
def test_a_signal_stops_the_stage_with_one_line_keeps_its_work_and_shuts_ray_down(tmp_path, sig, group, train):
    """SIGTERM as `kill` or `ray job stop` sends it; Ctrl-C to the whole process group as a terminal sends it, while
    Ray Train's `fit` runs (Ray Train's own SIGINT handler aborts the run and can exit 0)."""
    rc, out, err, run_dir = _stop_midway(tmp_path, sig, group, "prepare: training" if train else "prepare: working", train)
    name = signal.Signals(sig).name
    assert rc == 128 + sig, err[-3000:]
    assert "Traceback" not in out + err, err[-3000:]
    last = err.strip().splitlines()[-1]
    # the last line even when a worker's line reaches the driver late: it is printed once the log pumps are drained
    assert last.startswith(f"thinkbroad: stopped by {name} during prepare (Ray shut down)") and "resume" in last, \
        err[-3000:]
    assert (run_dir / "part-0.txt").read_text() == "kept"
    port = _dashboard_port(out)
    deadline = time.time() + 30
    while _listening(port) and time.time() < deadline:  # the local instance's processes exit after the driver
        time.sleep(0.5)
    assert not _listening(port), "the local Ray instance still serves its dashboard"
    logs = list((run_dir / "logs").glob("prepare-*.log"))
    text = logs[0].read_text() if len(logs) == 1 else ""
    assert last in text and ("prepare: training" if train else "prepare: working") in text
