"""The student on Ray Serve: encoder -> latent reasoning extractor -> classifier, no text generation.

  POST /v1/relevance  {query, items: [{id, title, brand?, color?, description?, bullet_points?, <other>?}]}
                      -> per item: label, probabilities per label, expected-relevance score, dominant perspective
  GET  /healthz       GET /v1/model       (OpenAPI docs at /docs)

Items from concurrent requests are scored together through `@serve.batch` by a `StudentScorer` (serve/scorer.py) on
the path that `serve.backend` / `serve.precision` pick. Bad requests get a 4xx with a message.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

from serve.config import ServeConfig
from serve.scorer import StudentScorer


class Item(BaseModel):
    """One product. Known attributes are named; any other string field is passed on as an attribute."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(min_length=1)
    title: str = Field(min_length=1)
    brand: str | None = None
    color: str | None = None
    description: str | None = None
    bullet_points: str | None = None

    @field_validator("title")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("title must not be blank")
        return v

    def attributes(self) -> dict[str, str]:
        known = {k: getattr(self, k) for k in ("brand", "color", "description", "bullet_points")}
        extra = dict(self.model_extra or {})
        bad = [k for k, v in extra.items() if not isinstance(v, str)]
        if bad:
            raise ValueError(f"item {self.id!r}: attribute(s) {bad} must be strings")
        return {k: v for k, v in {**known, **extra}.items() if v}


class RelevanceRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(min_length=1)
    items: list[Item] = Field(min_length=1)


class ItemResult(BaseModel):
    id: str
    label: str
    probabilities: dict[str, float]
    score: float = Field(description="expected relevance in [0, 1]: labels weighted from the best (1) to the worst (0)")
    dominant_perspective: str | None
    truncated: bool = Field(description="query + product text was longer than the model's max length and was cut")


class RelevanceResponse(BaseModel):
    model: str
    results: list[ItemResult]


app = FastAPI(title="thinkbroad relevance", description=__doc__)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        problems.append(f"{where}: {err['msg']}")
    return JSONResponse(status_code=422, content={"error": "invalid request", "problems": problems})


class HTTPError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


@app.exception_handler(HTTPError)
async def _http_error(request: Request, exc: HTTPError):
    return JSONResponse(status_code=exc.status, content={"error": exc.message})


@serve.deployment
@serve.ingress(app)
class RelevanceService:
    def __init__(self, student_dir: str, settings: dict):
        self.settings = ServeConfig(**settings)
        s = self.settings
        self.scorer = StudentScorer(student_dir, s.device, s.backend, s.precision)
        self._score_batch.set_max_batch_size(self.settings.max_batch_size)
        self._score_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self.batches = {"forwards": 0, "items": 0, "largest": 0}  # GET /v1/model shows how well batching fills

    @serve.batch
    async def _score_batch(self, pairs: list[tuple[str, str]]) -> list[dict]:
        b = self.batches
        b["forwards"], b["items"], b["largest"] = b["forwards"] + 1, b["items"] + len(pairs), max(b["largest"], len(pairs))
        return self.scorer.score(pairs)

    @app.post("/v1/relevance", response_model=RelevanceResponse)
    async def relevance(self, req: RelevanceRequest) -> RelevanceResponse:
        from student.data import product_text

        s = self.settings
        if len(req.items) > s.max_items:
            raise HTTPError(413, f"{len(req.items)} items in one request; the limit is {s.max_items} (serve.max_items)")
        texts = []
        for item in req.items:
            try:
                attrs = item.attributes()
            except ValueError as exc:
                raise HTTPError(422, str(exc)) from None
            for field, value in {"query": req.query, "title": item.title, **attrs}.items():
                if len(value) > s.max_field_chars:
                    raise HTTPError(422, f"item {item.id!r}: field {field!r} has {len(value)} characters; the limit is "
                                         f"{s.max_field_chars} (serve.max_field_chars)")
            texts.append(product_text(item.title, json.dumps(attrs)))
        scored = await asyncio.gather(*(self._score_batch((req.query, t)) for t in texts))
        return RelevanceResponse(model=self.scorer.name, results=[ItemResult(id=i.id, **r) for i, r in zip(req.items, scored)])

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @app.get("/v1/model")
    async def model_info(self) -> dict:
        s = self.settings
        return self.scorer.info() | {"max_items": s.max_items, "max_batch_size": s.max_batch_size,
                                     "max_ongoing_requests": s.ongoing_requests(), "batches": self.batches}


def build_app(args: dict) -> serve.Application:
    """Application builder for `serve run` / `serve deploy`: args = {student_dir, settings?: {...}}."""
    settings = ServeConfig(**args.get("settings", {}))
    # torch's OpenMP threads sleep instead of spinning while idle: on a shared machine spinning threads starve the
    # proxy and tokenisation (measured 4x slower forwards under load; onnxruntime sessions are set up alike)
    env = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}
    options = {"num_replicas": settings.replicas, "max_ongoing_requests": settings.ongoing_requests(),
               "logging_config": {"enable_access_log": settings.access_log},
               "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus, "runtime_env": env}}
    return RelevanceService.options(**options).bind(str(Path(args["student_dir"]).resolve()), settings.model_dump())
