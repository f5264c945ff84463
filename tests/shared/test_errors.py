import httpx
from fastapi import FastAPI
from pydantic import BaseModel

from shared.errors import Conflict, install_error_handlers


class Body(BaseModel):
    points: int


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/conflict")
    async def conflict(body: Body) -> None:
        raise Conflict("not enough points", available=3)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    return app


async def call(method: str, path: str, **kwargs: object) -> httpx.Response:
    transport = httpx.ASGITransport(app=make_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return await client.request(method, path, **kwargs)  # type: ignore[arg-type]


class TestProblemJson:
    async def test_service_error(self) -> None:
        response = await call("POST", "/conflict", json={"points": 1})
        assert response.status_code == 409
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["status"] == 409
        assert body["title"] == "Conflict"
        assert body["detail"] == "not enough points"
        assert body["available"] == 3
        assert body["instance"] == "/conflict"

    async def test_validation_error_names_the_field(self) -> None:
        response = await call("POST", "/conflict", json={"points": "many"})
        assert response.status_code == 422
        body = response.json()
        assert body["detail"].startswith("body.points")
        assert body["errors"][0]["loc"] == ["body", "points"]

    async def test_unhandled_error_hides_internals(self) -> None:
        response = await call("GET", "/boom")
        assert response.status_code == 500
        assert "secret" not in response.text
        assert response.headers["content-type"] == "application/problem+json"

    async def test_unknown_route_is_problem_json(self) -> None:
        response = await call("GET", "/nowhere")
        assert response.status_code == 404
        assert response.json()["title"] == "Not Found"

    async def test_a_body_that_is_not_utf8_is_a_422_like_one_that_is_not_json(self) -> None:
        for content in (b"\xff\xfe{", b"{not json"):
            response = await call("POST", "/conflict", content=content, headers={"content-type": "application/json"})
            assert response.status_code == 422, content
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["errors"][0]["type"] == "json_invalid"


class TestDocumentedProblems:
    def test_every_error_response_is_documented_as_problem_json(self) -> None:
        document = make_app().openapi()
        responses = document["paths"]["/conflict"]["post"]["responses"]
        assert responses["422"]["content"] == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        }
        assert responses["200"]["content"] == {"application/json": {"schema": {}}}
        schemas = document["components"]["schemas"]
        assert schemas["Problem"]["required"] == ["type", "title", "status", "detail"]
        # FastAPI's validation error models are what the handlers never send.
        assert "HTTPValidationError" not in schemas
        assert "ValidationError" not in schemas
