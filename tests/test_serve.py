"""The Serve application on 127.0.0.1 with a tiny student (on the default path: onnxruntime, exported at start):
valid, malformed, concurrent and batched requests."""
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

pytestmark = pytest.mark.ray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_local):
    import torch
    from ray import serve
    from transformers import AutoTokenizer

    from serve.config import ServeConfig
    from serve.launch import run_local
    from student.model import LRKDStudent, StudentConfig
    from workflows.models import TINY_BERT, resolve_model

    enc = resolve_model(TINY_BERT)
    torch.manual_seed(0)
    model = LRKDStudent.from_encoder(enc, StudentConfig(labels=["E", "S", "C", "I"], extractor="poly", mode="unified",
                                                        perspectives=["user_intent", "structured_analysis", "business_rules"],
                                                        target_dim=8, poly_codes=6, max_length=32))
    model.centroids.copy_(torch.randn(3, 8))
    folder = tmp_path_factory.mktemp("student")
    model.save_pretrained(folder, tokenizer=AutoTokenizer.from_pretrained(enc))
    settings = ServeConfig(port=_free_port(), max_items=20, max_field_chars=500, max_batch_size=16, batch_wait_timeout_s=0.05)
    url = run_local(folder, settings, block=False)
    yield url
    serve.shutdown()


def post(url, body, raw=False):
    data = body if raw else json.dumps(body)
    return requests.post(f"{url}/v1/relevance", data=data, headers={"content-type": "application/json"}, timeout=60)


ITEMS = [{"id": "a", "title": "Panasonic WhisperCeiling fan 110 CFM", "brand": "Panasonic"},
         {"id": "b", "title": "Garden hose 20 m", "color": "green"},
         {"id": "c", "title": "Replacement grille for bathroom fan", "material": "plastic"}]


def test_valid_request_returns_a_label_per_item(server):
    r = post(server, {"query": "110cfm bathroom exhaust fan", "items": ITEMS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["id"] for x in body["results"]] == ["a", "b", "c"]
    for x in body["results"]:
        assert x["label"] in {"E", "S", "C", "I"}
        assert sum(x["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert x["label"] == max(x["probabilities"], key=x["probabilities"].get)
        assert 0.0 <= x["score"] <= 1.0
        assert x["dominant_perspective"] in {"user_intent", "structured_analysis", "business_rules"}
        assert x["truncated"] is False


def test_health_model_info_and_openapi(server):
    assert requests.get(f"{server}/healthz", timeout=10).json() == {"status": "ok"}
    info = requests.get(f"{server}/v1/model", timeout=10).json()
    assert info["labels"] == ["E", "S", "C", "I"] and info["extractor"] == "poly"
    # auto on CPU: exported at start; without a run's labelled pairs neither int8 nor bf16 is judged -> onnxruntime fp32
    assert (info["backend"], info["precision"], info["file"]) == ("onnxruntime", "fp32", "model.onnx")
    assert "/v1/relevance" in requests.get(f"{server}/openapi.json", timeout=10).json()["paths"]


@pytest.mark.parametrize(
    "body,status,message",
    [
        ("{not json", 422, "JSON"),
        ({"items": ITEMS}, 422, "query"),
        ({"query": "fan", "items": []}, 422, "items"),
        ({"query": "fan", "items": [{"id": "a"}]}, 422, "items.0.title"),
        ({"query": "fan", "items": [{"id": "a", "title": 5}]}, 422, "items.0.title"),
        ({"query": "fan", "items": "all"}, 422, "items"),
        ({"query": "fan", "items": [{"id": "a", "title": "   "}]}, 422, "blank"),
        ({"query": "fan", "items": [{"id": "a", "title": "t", "size": 3}]}, 422, "must be strings"),
        ({"query": "fan", "items": [{"id": str(i), "title": "t"} for i in range(21)]}, 413, "limit is 20"),
        ({"query": "fan", "items": [{"id": "a", "title": "x" * 501}]}, 422, "limit is 500"),
        ({"query": "fan", "items": ITEMS, "extra": 1}, 422, "extra"),
    ],
)
def test_malformed_requests_get_4xx_with_a_message(server, body, status, message):
    r = post(server, body, raw=isinstance(body, str))
    assert r.status_code == status, r.text
    assert message in r.text


def test_long_texts_are_truncated_and_flagged(server):
    r = post(server, {"query": "fan", "items": [{"id": "long", "title": "fan " * 100}]})
    assert r.status_code == 200 and r.json()["results"][0]["truncated"] is True


def test_fifty_concurrent_requests_all_succeed_and_batching_matches_single_items(server):
    query = "110cfm bathroom exhaust fan"
    together = {x["id"]: x["label"] for x in post(server, {"query": query, "items": ITEMS}).json()["results"]}
    with ThreadPoolExecutor(max_workers=25) as pool:
        single = list(pool.map(lambda i: post(server, {"query": query, "items": [ITEMS[i % 3]]}), range(50)))
    assert all(r.status_code == 200 for r in single), [r.text for r in single if r.status_code != 200][:2]
    for i, r in enumerate(single):
        assert r.json()["results"][0]["label"] == together[ITEMS[i % 3]["id"]]


def test_a_replica_holds_enough_requests_to_fill_a_batch(server):
    """Ray Serve's default of 5 requests per replica would cap a batch of 1-item requests at 5 items (the router
    holds the rest back with backoff); serve.max_ongoing_requests defaults to 2 x max_batch_size = 32 here."""
    before = requests.get(f"{server}/v1/model", timeout=10).json()
    assert before["max_ongoing_requests"] == 32
    with ThreadPoolExecutor(max_workers=24) as pool:
        replies = list(pool.map(lambda i: post(server, {"query": "fan", "items": [ITEMS[i % 3]]}), range(48)))
    assert all(r.status_code == 200 for r in replies)
    after = requests.get(f"{server}/v1/model", timeout=10).json()["batches"]
    assert after["items"] - before["batches"]["items"] == 48
    assert after["largest"] > 5, after
    assert after["forwards"] - before["batches"]["forwards"] < 24, after
