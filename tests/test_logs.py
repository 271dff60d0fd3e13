"""workflows/logs.py: the console shows the pipeline, the log file under the run directory holds every byte."""
import subprocess
import sys
import textwrap

from conftest import ROOT
from workflows.logs import HARMLESS, is_harmless

# lines as a smoke run printed them (Ray's worker prefix and colour codes included), one per entry of HARMLESS
SEEN = [
    "\x1b[36m(MapWorker(MapBatches(VLLMJudge)) pid=5438)\x1b[0m W1205 15:02:27.553000 5438 .venv/lib/python3.11/site-packages/torch/_library/triton.py:53] Triton not available, find_triton_kernels = []",
    "\x1b[36m(MapWorker(MapBatches(VLLMJudge)) pid=5438)\x1b[0m /work/main/.venv/lib/python3.11/site-packages/vllm/triton_utils/dispatcher.py:138: FutureWarning: `torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead",
    "\x1b[36m(MapWorker(MapBatches(VLLMJudge)) pid=845)\x1b[0m   wrapper = lookup(vars(value).get(\"kernel\"))",
    "\x1b[36m(MapWorker(MapBatches(VLLMJudge)) pid=5438)\x1b[0m [W1205 15:03:59.917423762 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy for memory allocation on the NUMA nodes (0). Memory allocations will be strictly bound to these NUMA nodes. (function init_cpu_memory_env)",
    "\x1b[36m(MapWorker(MapBatches(VLLMJudge)) pid=5438)\x1b[0m Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 13.01it/s]",
    "[2026-12-05 15:01:20,124 E 4716 4716] core_worker.cc:2465: Actor with class name: 'MapWorker(MapBatches(VLLMJudge))' and ID: '7058cf10a581cc286ffe527801000000' has constructor arguments in the object store and max_restarts > 0. If the arguments in the object store go out of scope or are lost, the actor restart will fail.",
    "2026-12-05 15:01:20,083\tINFO streaming_executor.py:215 -- Starting execution of Dataset dataset_0359TJXGymbK8gnOriEDMT_0. Full logs are in /tmp/ray/session_2026-12-05_15-01-12_533680_4716/logs/ray-data",
    "2026-12-05 15:01:20,083\tINFO dataset.py:3401 -- Registered dataset logger for dataset dataset_0359TJXGymbK8gnOriEDMT_0",
    "2026-12-05 15:01:20,137\tWARNING __init__.py:28 -- Progress bars disabled. To enable, set `ray.data.DataContext.get_current().enable_progress_bars = True`.",
    "2026-12-05 15:01:12,529\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    "2026-12-05 15:13:44,412\tINFO streaming_executor.py:330 -- ✔️  Dataset dataset_12_0 execution finished in 12.34 seconds",
    "2026-12-05 15:38:12,695\tINFO dataset.py:6884 -- Data sink Parquet finished. 72 rows and 115.4KiB data written.",
    "2026-12-05 23:35:05,548\tWARNING dataset.py:8601 -- Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang unless more CPUs are freed up. A common reason is that cluster resources are used by Actors or Tune trials",
    "/work/main/.venv/lib/python3.11/site-packages/ray/data/_internal/execution/operators/task_pool_map_operator.py:319: UserWarning: The maximum number of concurrent tasks for 'ReadParquet->SplitBlocks(4)' is set to 2, but the operator only received 1 input(s).",
    "\x1b[36m(RayTrainWorker pid=9551)\x1b[0m [2026-12-05 15:05:20,000] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.",
    "\x1b[36m(RayTrainWorker pid=31956)\x1b[0m [RANK 0] Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, DeepSpeed config has 2. Using DeepSpeed's value.",
    "\x1b[36m(RayTrainWorker pid=9551)\x1b[0m /work/main/.venv/lib/python3.11/site-packages/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed.all_gather_into_tensor` is deprecated. Please use `torch.distributed.all_gather_single` instead.",
    "\x1b[36m(RayTrainWorker pid=9551)\x1b[0m Tokenizing train dataset: 100%|██████████| 4/4 [00:00<00:00, 243.93 examples/s]",
    "\x1b[36m(RayTrainWorker pid=15402)\x1b[0m MA 0.73 GB         Max_MA 0.73 GB         CA 0.73 GB         Max_CA 1 GB ",
    "\x1b[36m(TrainController pid=9343)\x1b[0m Attempting to start training worker group of size 2 with the following resources: [{'CPU': 1}] * 2",
    "\x1b[36m(RayTrainWorker pid=21743)\x1b[0m Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/tmp/tb/run2/teacher/sft/ray/sft/checkpoint_2026-12-05_15-31-40.272865), metrics={'loss': 6.5851})",
    "\x1b[36m(RayTrainWorker pid=8970)\x1b[0m Wrapping provided model in DistributedDataParallel.",
    "\x1b[36m(RayTrainWorker pid=8970)\x1b[0m [rank0]:[W1205 15:46:48.160326783 reducer.cpp:1529] Warning: find_unused_parameters=True was specified in DDP constructor, but did not find any unused parameters in the forward pass.",
    "torchvision is not installed. Skipping torchvision::nms",
    "WARNING:root:Please consider to run pre-processing before quantization. Refer to example: https://github.com/microsoft/onnxruntime-inference-examples/blob/main/quantization/image_classification/cpu/ReadMe.md ",
]
PIPELINE = [
    "[thinkbroad] === stage 2/7: generate ===",
    "\x1b[36m(RayTrainWorker pid=9551)\x1b[0m {'loss': '6.976', 'grad_norm': '1.881', 'learning_rate': '0.001', 'epoch': '1'}",
    "\x1b[36m(TrainController pid=9343)\x1b[0m Started training worker group of size 2: ",
    "\x1b[36m(MapWorker(MapBatches(VLLMJudge)) pid=5438)\x1b[0m Traceback (most recent call last):",
    "thinkbroad: error: 3 problem(s) in the input data:",
    "\x1b[36m(RayTrainWorker pid=9)\x1b[0m   if is_main: raise ValueError(value)",  # another source line shows
]


def test_every_silenced_notice_is_named_with_why_and_matches_what_a_run_printed():
    assert len(SEEN) == len(HARMLESS)
    for (pattern, why), line in zip(HARMLESS, SEEN):
        assert len(why) > 20, pattern
        assert is_harmless(line.encode()), line
    assert not any(is_harmless(line.encode()) for line in PIPELINE)


SCRIPT = textwrap.dedent("""
    import os, subprocess, sys
    from pathlib import Path
    from workflows.logs import capture

    with capture(Path(sys.argv[1]), "generate") as path:
        print("[thinkbroad] generate: 24 judgements", flush=True)
        os.write(1, "(MapWorker(MapBatches(VLLMJudge)) pid=12) Loading safetensors checkpoint shards: 0% Completed\\r".encode())
        os.write(2, b"mpcot generate:  50%|#####     | 12/24\\r")
        os.write(2, b"mpcot generate: 100%|##########| 24/24\\n")
        sys.stderr.write("/v/dispatcher.py:138: FutureWarning: `torch.distributed.reduce_op` is deprecated\\n"
                         "  if hasattr(value, '__dict__'):\\n")  # a Python warning: its line, then its source line
        sys.stderr.flush()
        subprocess.run([sys.executable, "-c", "print('[W utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy')"])
        print("Traceback (most recent call last):", file=sys.stderr, flush=True)
        print("[thinkbroad] report: done", flush=True)
    print("after: " + str(path))
""")


def test_capture_filters_the_console_and_keeps_every_byte_in_the_run_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    out, err = proc.stdout, proc.stderr
    assert out.splitlines()[0] == "[thinkbroad] generate: 24 judgements"
    assert "[thinkbroad] report: done" in out and "after: " in out  # stdout stays stdout, the terminal is back
    assert "mpcot generate:  50%" in err and "24/24" in err and "Traceback" in err  # our bar, and never a Traceback
    for hidden in ("Loading safetensors", "reduce_op", "NUMA binding"):
        assert hidden not in out + err
    assert "hasattr(value" not in err  # a silenced warning's source line goes with it
    log = (tmp_path / "logs").glob("generate-*.log")
    text = next(log).read_text()
    for line in ("24 judgements", "Loading safetensors", "reduce_op", "NUMA binding", "Traceback", "report: done"):
        assert line in text


def test_thinkbroad_log_all_shows_everything(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "THINKBROAD_LOG": "all"})
    assert "NUMA binding" in proc.stdout and "reduce_op" in proc.stderr


LATE = textwrap.dedent("""
    import subprocess, sys
    from pathlib import Path
    from workflows.logs import capture, say_last

    with capture(Path(sys.argv[1]), "prepare"):
        # a worker's line that reaches the pipe after the stage said its last word (as Ray's late log lines do)
        subprocess.Popen([sys.executable, "-c", "import time, sys; time.sleep(0.5); print('(W pid=3) late', "
                          "file=sys.stderr, flush=True)"])
        say_last("thinkbroad: stopped by SIGINT during prepare")
        print("(W pid=3) early", file=sys.stderr, flush=True)
        import time; time.sleep(0.8)
""")


def test_the_last_word_follows_every_line_a_worker_printed_late(tmp_path):
    proc = subprocess.run([sys.executable, "-c", LATE, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == "thinkbroad: stopped by SIGINT during prepare" and "(W pid=3) late" in lines, proc.stderr
    log = next((tmp_path / "logs").glob("prepare-*.log")).read_text().strip().splitlines()
    assert log[-1] == lines[-1] and "(W pid=3) early" in log
