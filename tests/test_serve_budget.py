"""The latency budget's promise, end to end on one Serve instance: under a fixed overload, the requests the service
accepts are answered within the budget (times a stated tolerance), and those it cannot answer in time are refused
at once with Retry-After. A MiniLM-L6 student (the bundled real weights) on one replica of 1 CPU, so a forward takes long
enough for 16 clients of 10 items to queue well past the budget."""
import statistics

import pytest

from hardware.runtime import free_port
from serve_helpers import FAST, load

pytestmark = pytest.mark.ray

BUDGET_MS = 400
# accepted requests' p99 <= budget x TOLERANCE, timed by the client (the proxy's hops both ways and the 16 client
# threads' own contention included). Measured on a quiet 2-core AMD EPYC Zen 4 (family 25, model 17), 3 runs: accepted
# median 246-271 ms, p99 543-801 ms = 1.36-2.00x the 400 ms budget (51-55 accepted, 950-1,142 refused in 8 s,
# refusals' median 98-113 ms); beside a benchmark the same load gave p99 2.5-5.3x. So the budget holds the median,
# not the tail: the tail overshoots it by up to 2x here (docs/serving.md). Without a budget every request would wait
# behind all 16 (about 16 / 7 per s = 2.3 s).
TOLERANCE = 2.5


def minilm_student(folder):
    import torch
    from transformers import AutoTokenizer

    from student.model import LRKDStudent, StudentConfig
    from workflows.models import resolve_model

    enc = resolve_model("all-minilm-l6-v2")
    torch.manual_seed(0)
    model = LRKDStudent.from_encoder(enc, StudentConfig(labels=["E", "S", "C", "I"], extractor="none", mode="unified",
                                                        perspectives=["user_intent", "structured_analysis", "business_rules"],
                                                        target_dim=1, max_length=64))
    model.save_pretrained(folder, tokenizer=AutoTokenizer.from_pretrained(enc))
    return folder


@pytest.fixture(scope="module")
def budget_server(tmp_path_factory, ray_local):
    from ray import serve

    from serve.config import ServeConfig
    from serve.launch import run_local

    settings = ServeConfig(**{**FAST, "num_cpus": 1}, port=free_port(), max_items=20, max_batch_size=16,
                           batch_wait_timeout_s=0.005, request_timeout_s=60, latency_budget_ms=BUDGET_MS)
    url = run_local(minilm_student(tmp_path_factory.mktemp("minilm")), settings, block=False)
    yield url
    serve.shutdown()


def test_accepted_requests_stay_within_the_budget_under_overload_and_the_rest_are_refused_at_once(budget_server):
    load(budget_server, seconds=2, threads=2, items=20)  # warm-up: the cost model measures this machine's forward
    answers = load(budget_server, seconds=8, threads=16, items=10)
    statuses = [a[2] for a in answers]
    assert set(statuses) <= {200, 503}, sorted(set(statuses))
    accepted = sorted(end - start for start, end, status, *_ in answers if status == 200)
    refused = [a for a in answers if a[2] == 503]
    # an overload: some requests refused, and the service still answers the rest
    assert refused and len(accepted) >= 10, (len(accepted), len(refused))
    assert all(a[4] is not None and int(a[4]) >= 1 for a in refused)  # Retry-After on every refusal
    p99 = accepted[min(len(accepted) - 1, int(0.99 * len(accepted)))]
    assert p99 <= BUDGET_MS / 1000 * TOLERANCE, (
        f"accepted p99 {1000 * p99:.0f} ms over {BUDGET_MS} ms x {TOLERANCE} (median {1000 * statistics.median(accepted):.0f} ms, "
        f"{len(accepted)} accepted, {len(refused)} refused)")
    # a refusal is quicker than an answer that waited: it is decided on arrival, not after the queue
    assert statistics.median(b - a for a, b, *_ in refused) < statistics.median(accepted)
