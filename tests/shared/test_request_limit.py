"""The request body limit every service's app has (`RequestBodyLimit`, wired by `base_app`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import Message

from shared.errors import install_error_handlers
from shared.request_limit import RequestBodyLimit

LIMIT = 1000


def small_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(RequestBodyLimit, max_bytes=LIMIT)

    @app.post("/echo")
    async def echo(body: dict[str, Any]) -> dict[str, int]:
        return {"keys": len(body)}

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=small_app()), base_url="http://test") as c:
        yield c


def assert_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == 413
    assert problem["title"] == "Content Too Large"
    assert f"larger than {LIMIT} bytes" in problem["detail"]


class TestRequestBodyLimit:
    async def test_a_body_within_the_limit_passes(self, client: httpx.AsyncClient) -> None:
        response = await client.post("/echo", json={"a": "x" * (LIMIT - 20)})
        assert response.status_code == 200
        assert response.json() == {"keys": 1}

    async def test_a_declared_length_over_the_limit_is_refused(self, client: httpx.AsyncClient) -> None:
        assert_too_large(await client.post("/echo", json={"a": "x" * LIMIT}))

    async def test_a_streamed_body_without_a_length_is_refused_once_it_passes_the_limit(
        self, client: httpx.AsyncClient
    ) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"a": "'
            for _ in range(100):
                yield b"x" * 100
            yield b'"}'

        assert_too_large(await client.post("/echo", content=chunks(), headers={"content-type": "application/json"}))

    async def test_a_length_of_thousands_of_digits_is_refused_without_parsing_it(self) -> None:
        # Called as the ASGI server would: the body is never read, so `receive` must not be called.
        messages: list[Message] = []

        async def receive() -> Message:
            raise AssertionError("the body was read")

        async def send(message: Message) -> None:
            messages.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/echo",
            "headers": [(b"content-length", b"9" * 5000), (b"content-type", b"application/json")],
        }
        await RequestBodyLimit(small_app(), max_bytes=LIMIT)(scope, receive, send)
        assert messages[0]["status"] == 413

    async def test_a_body_longer_than_its_declared_length_is_counted_as_read(self) -> None:
        messages: list[Message] = []
        chunks = [b'{"a": "' + b"x" * 600, b"x" * 600 + b'"}']

        async def receive() -> Message:
            body = chunks.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(chunks)}

        async def send(message: Message) -> None:
            messages.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/echo",
            "headers": [(b"content-length", b"10"), (b"content-type", b"application/json")],
            "query_string": b"",
        }
        await RequestBodyLimit(small_app(), max_bytes=LIMIT)(scope, receive, send)
        assert messages[0]["status"] == 413
