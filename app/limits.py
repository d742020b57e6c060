"""Request body size limits, enforced before a handler parses the body.

`BodySizeLimit` buffers bodies of at most `max_bytes` and rejects larger ones with 413. It suits
JSON bodies, which are parsed whole anyway. `CountingReceive` counts the bytes of a streamed body
(a multipart upload, which is spooled to disk) and raises 413 as soon as they pass the limit.
"""

from __future__ import annotations

from typing import Callable, Collection

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import PayloadTooLarge, error_response

BODY_METHODS = ("POST", "PUT", "PATCH")


def body_too_large(size: int, max_bytes: int, setting: str, exact: bool = True) -> PayloadTooLarge:
    amount = f"{size} bytes" if exact else f"at least {size} bytes"
    return PayloadTooLarge(
        f"request body has {amount}, over the limit of {max_bytes} bytes ({setting})",
        code="body_too_large",
        field="body",
        value=size,
        fix=f"Send at most {max_bytes} bytes per request ({setting}), or split the request.",
    )


class BodySizeLimit:
    """ASGI middleware that rejects request bodies over `max_bytes` with 413, before any parsing.

    The body is read here (at most `max_bytes` of it) and handed on whole, because an error raised
    while FastAPI reads the body would reach the client as a 400. Requests to `streamed_paths`
    pass untouched; their routes count the body themselves with `CountingReceive`.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, setting: str, streamed_paths: Collection[str] = ()):
        self.app = app
        self.max_bytes = max_bytes
        self.setting = setting
        self.streamed_paths = frozenset(streamed_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS or scope["path"] in self.streamed_paths:
            await self.app(scope, receive, send)
            return

        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send, int(declared), exact=True)
            return

        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                await self._reject(scope, receive, send, len(body), exact=not more)
                return

        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, size: int, exact: bool) -> None:
        error = body_too_large(size, self.max_bytes, self.setting, exact)
        await error_response(error)(scope, receive, send)


class CountingReceive:
    """Wraps an ASGI `receive` and raises the error of `too_large(bytes so far)` once the body passes `max_bytes`.

    The error is an `APIError`, so it reaches the client as the API's error body when the route
    reads the body inside its handler (for example with `Request.form()`).
    """

    def __init__(self, receive: Receive, max_bytes: int, too_large: Callable[[int], Exception]):
        self.receive = receive
        self.max_bytes = max_bytes
        self.too_large = too_large
        self.received = 0

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.max_bytes:
                raise self.too_large(self.received)
        return message
