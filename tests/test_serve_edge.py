"""The HTTP edge (serve/http.py: key, body cap, JSON errors) on a bare FastAPI app, and the request limits
(serve/schema.py): no Ray cluster, no model."""
import pytest


def edge_app(api_key: bytes | None = None, max_body_bytes: int = 2048):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from serve.http import install
    from serve.schema import Limits, RelevanceRequest, _limits

    _limits[0] = Limits(max_items=3, max_field_chars=50, max_attributes=2, max_key_chars=8)
    app = FastAPI()
    install(app)
    app.state.api_key, app.state.max_body_bytes = api_key, max_body_bytes

    @app.post("/v1/relevance")
    async def relevance(req: RelevanceRequest) -> dict:
        return {"n": len(req.items), "attrs": [it.attributes() for it in req.items]}

    @app.get("/v1/boom")
    async def boom():
        raise KeyError("/secret/path/on/the/server")

    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def limits_reset():
    from serve.schema import Limits, _limits

    yield
    _limits[0] = Limits()


@pytest.mark.parametrize("body,status,message", [
    ({"query": "q", "items": [{"id": "a", "title": "t", "color": "red", "size": "m"}]}, 200, None),
    ({"query": "q", "items": [{"id": str(i), "title": "t"} for i in range(4)]}, 413, "limit is 3 (serve.max_items)"),
    ({"query": "q", "items": [{"id": "a", "title": "t", "a": "1", "b": "2", "c": "3"}]}, 422, "serve.max_attributes"),
    ({"query": "q", "items": [{"id": "a", "title": "t", "k" * 9: "1"}]}, 422, "serve.max_key_chars"),
    ({"query": "q" * 51, "items": [{"id": "a", "title": "t"}]}, 422, "serve.max_field_chars"),
    ({"query": "q", "items": [{"id": "a", "title": "t" * 51}]}, 422, "serve.max_field_chars"),
    ({"query": "q", "items": [{"id": "a", "title": "t", "size": 3}]}, 422, "must be strings"),
])
def test_request_limits_are_checked_in_the_request_model(limits_reset, body, status, message):
    r = edge_app().post("/v1/relevance", json=body)
    assert r.status_code == status, r.text
    if message:
        assert message in " ".join(r.json()["problems"]), r.json()


def test_a_body_over_the_limit_is_refused_before_parsing_whether_declared_or_streamed(limits_reset):
    client = edge_app(max_body_bytes=2048)
    big = b'{"query": "q", "items": [' + b" " * 4096 + b"]}"
    r = client.post("/v1/relevance", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "serve.max_body_bytes" in r.json()["error"]
    r = client.post("/v1/relevance", content=iter([big[:1000], big[1000:3000], big[3000:]]),  # chunked: no length
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "serve.max_body_bytes" in r.json()["error"]
    ok = client.post("/v1/relevance", content=iter([b'{"query": "q", ', b'"items": [{"id": "a", "title": "t"}]}']),
                     headers={"content-type": "application/json"})
    assert ok.status_code == 200 and ok.json()["n"] == 1


def test_bearer_is_case_insensitive_and_every_error_is_json_without_internals(limits_reset):
    client = edge_app(api_key=b"k3y")
    body = {"query": "q", "items": [{"id": "a", "title": "t"}]}
    for scheme in ("Bearer", "bearer", "BEARER"):
        assert client.post("/v1/relevance", json=body, headers={"Authorization": f"{scheme} k3y"}).status_code == 200
    for header in ("Bearer k3", "Basic k3y", "k3y", "Bearerk3y"):
        r = client.post("/v1/relevance", json=body, headers={"Authorization": header})
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
    r = client.get("/v1/boom", headers={"Authorization": "Bearer k3y"})
    assert r.status_code == 500 and "error id" in r.json()["error"] and "secret" not in r.text
    r = client.get("/nowhere")
    assert r.status_code == 404 and r.json() == {"error": "Not Found"}
