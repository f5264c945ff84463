"""RFC 9457 problem+json, rendered in one place for every service.

Services raise `ServiceError` subclasses (a base per context, leaf errors per case); endpoints never
build error responses themselves. An endpoint or a dependency names the errors it raises with `@raises`;
a `DocumentedRoute` (each service's router's route class) documents them as the route's OpenAPI
responses, one per status, each error by its class name and docstring.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_flat_params
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"


class ServiceError(Exception):
    status_code: int = 500
    title: str | None = None

    def __init__(self, message: str, status_code: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.extra = extra
        self.headers: dict[str, str] = {}  # response headers the error sets (e.g. Retry-After)


class ResourceNotFound(ServiceError):
    status_code = 404


class Unauthorized(ServiceError):
    """No API key, or one that is unknown or revoked."""

    status_code = 401


class Forbidden(ServiceError):
    """The API key lacks the scope the route requires."""

    status_code = 403


class Conflict(ServiceError):
    status_code = 409


class UnprocessableEntity(ServiceError):
    """A value in the request cannot be used."""

    status_code = 422


# What a 422 says besides the errors a route raises, when the route validates parameters or a body.
REQUEST_INVALID = "`ValidationError`: The request does not match its schema (`errors` lists each problem)."

_RAISES = "__raises__"
F = TypeVar("F", bound=Callable[..., Any])


def raises(*errors: type[ServiceError]) -> Callable[[F], F]:
    """Marks an endpoint or a dependency with the errors it raises, for its route's documented responses."""

    def mark(fn: F) -> F:
        setattr(fn, _RAISES, errors)
        return fn

    return mark


def responses(*errors: type[ServiceError], validates: bool = False) -> dict[str, dict[str, str]]:
    """OpenAPI responses of a route that raises `errors`: one per status, a list naming each error (its
    class name, the problem's `error` member) with the first line of its docstring, or else its title.
    `validates`: the route validates its request too, so its 422 (if it has one) says so first."""
    lines: dict[int, list[str]] = {}
    for error in dict.fromkeys(errors):
        doc = (error.__dict__.get("__doc__") or "").strip()
        lines.setdefault(error.status_code, []).append(
            f"`{error.__name__}`: {doc.splitlines()[0] if doc else _title(error)}"
        )
    if validates and 422 in lines:
        lines[422].insert(0, REQUEST_INVALID)
    return {str(status): {"description": "\n".join(f"- {line}" for line in lines[status])} for status in sorted(lines)}


def declared_errors(dependant: Dependant) -> tuple[type[ServiceError], ...]:
    """The errors an endpoint and its dependencies (all the way down) declare with `raises`, in order."""
    found: dict[type[ServiceError], None] = {}
    for dependency in dependant.dependencies:
        found.update(dict.fromkeys(declared_errors(dependency)))
    found.update(dict.fromkeys(getattr(dependant.call, _RAISES, ())))
    return tuple(found)


class DocumentedRoute(APIRoute):
    """A route whose OpenAPI responses document the errors its endpoint and dependencies raise (`raises`).

    They go in through `openapi_extra`, merged last: FastAPI's own 422 of a route that validates its
    request keeps its schema, and its description lists the route's 422 errors as well."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        self.errors = declared_errors(self.dependant)
        validates = bool(self.body_field or get_flat_params(self.dependant))
        documented = responses(*self.errors, validates=validates)
        if documented:
            extra = dict(self.openapi_extra or {})
            extra["responses"] = {**documented, **extra.get("responses", {})}
            self.openapi_extra = extra


def _slug(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def problem(
    status: int, title: str, detail: str, *, instance: str | None = None, error: str | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": f"urn:loyalty:problem:{_slug(error or title.replace(' ', ''))}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    if error:
        body["error"] = error
    if instance:
        body["instance"] = instance
    body.update(extra)
    headers = {"WWW-Authenticate": 'ApiKey realm="loyalty"'} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def _title(cls: type[ServiceError]) -> str:
    return cls.title or re.sub(r"(?<!^)(?=[A-Z])", " ", cls.__name__)


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    response = problem(
        exc.status_code,
        _title(type(exc)),
        exc.message,
        instance=request.url.path,
        error=type(exc).__name__,
        **exc.extra,
    )
    response.headers.update(exc.headers)
    return response


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
    detail = f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}" if first["loc"] else str(first["msg"])
    return problem(422, "Validation Error", detail, instance=request.url.path, error="ValidationError", errors=errors)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, ValueError):
        # FastAPI's 400 for a body it cannot decode (not UTF-8): the same 422 as a body that is not JSON.
        msg = f"the body cannot be decoded as JSON ({type(exc.__cause__).__name__})"
        errors = [{"loc": ["body"], "msg": msg, "type": "json_invalid"}]
        return problem(
            422, "Validation Error", f"body: {msg}", instance=request.url.path, error="ValidationError", errors=errors
        )
    title = {404: "Not Found", 405: "Method Not Allowed", 413: "Content Too Large"}.get(exc.status_code, "HTTP Error")
    return problem(exc.status_code, title, str(exc.detail), instance=request.url.path)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", extra={"path": request.url.path})
    return problem(
        500, "Internal Server Error", "an unexpected error occurred; it has been logged", instance=request.url.path
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    # SQLSTATE class 22 (data exception): a value the column cannot hold, a NUL in text. Parameters are
    # bounded where they are declared; this is the backstop, so a value missed there is still a 422.
    if str(getattr(exc.orig, "sqlstate", "")).startswith("22"):
        log.warning("value refused by the database", extra={"path": request.url.path, "error": str(exc.orig)})
        return problem(
            422,
            "Unprocessable Entity",
            "a value in the request cannot be stored (out of range, or a NUL character)",
            instance=request.url.path,
            error="UnprocessableEntity",
        )
    return await _unhandled(request, exc)


# Every error response of every route, as the handlers above render it: the OpenAPI document says so.
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "RFC 9457 problem details; some problems add members (`errors`, `required_scope`, `checks`)",
    "type": "object",
    "required": ["type", "title", "status", "detail"],
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "instance": {"type": "string"},
        "error": {"type": "string", "description": "The error's class name, as the route's responses list it"},
        "errors": {
            "type": "array",
            "description": "Each problem of a request that does not match its schema",
            "items": {
                "type": "object",
                "properties": {
                    "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                    "msg": {"type": "string"},
                    "type": {"type": "string"},
                },
            },
        },
    },
}


def document_problems(app: FastAPI) -> None:
    """Documents every 4xx and 5xx response of `app`'s OpenAPI document as problem+json (FastAPI's own 422
    says application/json with its validation error model, which the handlers never send)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["Problem"] = PROBLEM_SCHEMA
        schemas.pop("HTTPValidationError", None)
        if "loc" in schemas.get("ValidationError", {}).get("properties", {}):
            del schemas["ValidationError"]
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                for status, response in operation.get("responses", {}).items():
                    if status[:1] in ("4", "5"):
                        response["content"] = {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    document_problems(app)
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(DBAPIError, _database_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unhandled)
