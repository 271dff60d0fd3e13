"""What the Serve tests share (tests/test_serve.py, tests/test_serve_cli.py): the API key the main app asks for, a
tiny random student, and clients that post to an app, load it from many threads, time their requests, read
/v1/model and find the replicas."""
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import requests

KEY_ENV, KEY = "THINKBROAD_TEST_API_KEY", "test-key-0123456789"
os.environ[KEY_ENV] = KEY  # before the module's Ray starts: the replicas inherit this environment
AUTH = {"Authorization": f"Bearer {KEY}"}
FAST = {"num_cpus": 0.25, "backend": "torch", "precision": "fp32"}  # no export; four apps' replicas fit in 2 CPUs


def tiny_student(folder, seed: int = 0):
    import torch
    from transformers import AutoTokenizer

    from student.model import LRKDStudent, StudentConfig
    from workflows.models import TINY_BERT, resolve_model

    enc = resolve_model(TINY_BERT)
    torch.manual_seed(seed)
    model = LRKDStudent.from_encoder(enc, StudentConfig(labels=["E", "S", "C", "I"], extractor="poly", mode="unified",
                                                        perspectives=["user_intent", "structured_analysis", "business_rules"],
                                                        target_dim=8, poly_codes=6, max_length=32))
    model.centroids.copy_(torch.randn(3, 8))
    model.save_pretrained(folder, tokenizer=AutoTokenizer.from_pretrained(enc))
    return folder


def deploy(base_url: str, name: str, student, **settings) -> str:
    """Another app on the same Serve instance, under /<name>; returns its URL."""
    from serve.config import ServeConfig
    from serve.launch import deploy as deploy_app

    deploy_app(student, ServeConfig(**FAST, **settings), name=name, route_prefix=f"/{name}")
    return f"{base_url}/{name}"


def post(url, body, raw=False, headers=AUTH):
    data = body if raw else json.dumps(body)
    return requests.post(f"{url}/v1/relevance", data=data, headers={"content-type": "application/json", **headers},
                         timeout=60)


def model_info(url) -> dict:
    return requests.get(f"{url}/v1/model", headers=AUTH, timeout=30).json()


def model_info_noauth(url) -> dict:
    return requests.get(f"{url}/v1/model", timeout=30).json()


ITEMS = [{"id": "a", "title": "Panasonic WhisperCeiling fan 110 CFM", "brand": "Panasonic"},
         {"id": "b", "title": "Garden hose 20 m", "color": "green"},
         {"id": "c", "title": "Replacement grille for bathroom fan", "material": "plastic"}]


def load(url: str, seconds: float, threads: int, items: int, stop_at=None) -> list[tuple]:
    """`threads` clients post back to back for `seconds` (or until stop_at() is true): (start, end, status, body)."""
    body = {"query": "bathroom fan", "items": [{"id": str(i), "title": f"{ITEMS[i % 3]['title']} {i}"} for i in range(items)]}
    out, end = [], time.perf_counter() + seconds

    def client():
        s = requests.Session()
        while time.perf_counter() < end and not (stop_at and stop_at()):
            t = time.perf_counter()
            r = s.post(f"{url}/v1/relevance", json=body, timeout=60)
            out.append((t, time.perf_counter(), r.status_code, r.json(), r.headers.get("Retry-After")))

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(client) for _ in range(threads)]:
            f.result()
    return out


def timed_posts(url: str, seconds: float, body: dict) -> list[tuple[float, int]]:
    """One client posting `body` back to back: (seconds, status) per request."""
    s, out, end = requests.Session(), [], time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        r = s.post(f"{url}/v1/relevance", json=body, headers=AUTH, timeout=60)
        out.append((time.perf_counter() - t, r.status_code))
    return out


def model_pids(app: str, deployment: str = "StudentModel") -> dict[str, int]:
    import ray
    from ray.util.state import list_actors

    alive = list_actors(address=ray.get_runtime_context().gcs_address, filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.name: a.pid for a in alive
            if a.class_name == f"ServeReplica:{app}:{deployment}"}
