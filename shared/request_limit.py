"""A size limit on every request body, so one request cannot make a service read unbounded data.

A body declared larger than the limit (Content-Length) is refused before any of it is read; a body
without a declared length, or longer than declared, is refused as soon as the bytes read pass the limit.
Either way the answer is 413 problem+json.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.errors import problem


class BodyTooLarge(HTTPException):
    """Raised from `receive` while the endpoint reads the body; FastAPI passes HTTP exceptions through to
    the problem+json handler (any other exception there would become a 400)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"the request body is larger than {max_bytes} bytes")


class RequestBodyLimit:
    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        # Past 18 digits it is larger than any limit (and int() refuses 4,300+ digits): not parsed further.
        if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > self.max_bytes):
            detail = f"the request body is larger than {self.max_bytes} bytes"
            await problem(413, "Content Too Large", detail, instance=scope.get("path"))(scope, receive, send)
            return
        read = 0

        async def limited() -> Message:
            nonlocal read
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)
