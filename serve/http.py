"""The ingress's HTTP edge: what runs before a route (the key, the body's size) and how every error is answered.

Every answer that is not a result is JSON `{"error": ..., ...}`: validation problems (422), too many items or too
large a body (413), overload (503/429 with `Retry-After`), unknown paths (404), and anything unexpected (500 with an
id to find the logged traceback by; the message names no internals). No Ray import.
"""
from __future__ import annotations

import hmac
import logging
import math
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.schema import TOO_MANY_ITEMS

logger = logging.getLogger("ray.serve")
BODY_METHODS = {"POST", "PUT", "PATCH"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str, **extra):
        self.status, self.message, self.extra = status, message, extra


def bearer_ok(header: bytes, key: bytes) -> bool:
    """`Authorization: Bearer <key>`, the scheme in any case (RFC 9110), the key compared in constant time."""
    scheme, _, token = header.strip().partition(b" ")
    return hmac.compare_digest(scheme.lower(), b"bearer") & hmac.compare_digest(token.strip(), key)


async def _send_json(scope, send, status: int, content: dict, headers: dict | None = None) -> None:
    await JSONResponse(status_code=status, content=content, headers=headers)(scope, None, send)


class Gate:
    """ASGI middleware: stamps when a request reached the ingress (the deadline and the per-phase timing count from
    there); with an API key set, answers 401 to /v1/* without the key before the body is read; and answers 413 to a
    body over `app.state.max_body_bytes`, on its Content-Length or once the streamed body passes the limit, before
    anything parses it. A body within the limit is read here and handed on whole."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        scope.setdefault("state", {})["t0"] = time.perf_counter()
        state = scope["app"].state
        headers = dict(scope["headers"])
        key = getattr(state, "api_key", None)
        path = scope["path"].removeprefix(scope.get("root_path", ""))  # under a route prefix, too
        if key is not None and path.startswith("/v1/") and not bearer_ok(headers.get(b"authorization", b""), key):
            return await _send_json(scope, send, 401, {"error": "missing or wrong API key: send the header "
                                                "`Authorization: Bearer <key>`"}, {"WWW-Authenticate": "Bearer"})
        limit = getattr(state, "max_body_bytes", None)
        if limit and scope["method"] in BODY_METHODS:
            too_large = {"error": f"request body over {limit} bytes (serve.max_body_bytes)"}
            declared = headers.get(b"content-length")
            try:
                if declared is not None and int(declared) > limit:
                    return await _send_json(scope, send, 413, too_large, {"Connection": "close"})
            except ValueError:
                return await _send_json(scope, send, 400, {"error": "Content-Length is not a number"})
            body, more = bytearray(), True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # the client went away: nothing to answer
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > limit:
                    return await _send_json(scope, send, 413, too_large, {"Connection": "close"})
            receive = _replay(bytes(body), receive)
        await self.inner(scope, receive, send)


def _replay(body: bytes, receive):
    sent = []

    async def again():
        if not sent:
            sent.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return again


async def _validation_error(request: Request, exc: RequestValidationError):
    problems, status = [], 422
    for err in exc.errors():
        if err.get("type") == TOO_MANY_ITEMS:
            status = 413
        where = ".".join(str(p) for p in err["loc"] if p != "body") or "body"
        problems.append(f"{where}: {err['msg']}"[:500])
    message = "too many items" if status == 413 else "invalid request"
    return JSONResponse(status_code=status, content={"error": message, "problems": problems[:20]})


async def _http_error(request: Request, exc: HTTPError):
    retry = exc.extra.get("retry_after_s")
    headers = {"Retry-After": str(max(1, math.ceil(retry)))} if retry is not None else None
    return JSONResponse(status_code=exc.status, content={"error": exc.message, **exc.extra}, headers=headers)


async def _starlette_error(request: Request, exc: StarletteHTTPException):
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail)}, headers=exc.headers)


def internal_error(exc: BaseException, what: str = "internal error") -> HTTPError:
    """A 500 whose message names no internals: the traceback is logged under an id the caller gets."""
    ref = uuid.uuid4().hex[:12]
    logger.error("%s (error id %s)", what, ref, exc_info=exc)
    return HTTPError(500, f"{what}; the server logged it as error id {ref}", reason="internal", error_id=ref)


async def _any_error(request: Request, exc: Exception):
    err = internal_error(exc)
    return await _http_error(request, err)


def install(app: FastAPI) -> None:
    app.add_middleware(Gate)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPError, _http_error)
    app.add_exception_handler(StarletteHTTPException, _starlette_error)
    app.add_exception_handler(Exception, _any_error)
