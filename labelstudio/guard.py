"""The front door of the review loop's HTTP apps (the webhook receiver, the ML backend): who may send, how much.

FastAPI reads and parses a route's JSON body before the route's dependencies run, so a login checked in the route
or as a dependency came after the body: whoever reached the port was told, with a 422, what was wrong with a body
it had no right to send, and could make the process read and hold a body of any size. `Guard`, an ASGI middleware,
answers 401 before a byte of the body is read, and 413 once a body declares or streams more than `max_body` bytes;
what it lets through reaches the app whole, as sent.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY_BYTES = 32 * 1024 * 1024  # a webhook event carries its whole project; a predict call, task data only


class Guard:
    """`allowed(headers)` decides who may send (`open_paths` need no login: a health check); a refusal is a 401
    with `challenge` as its headers. Bodies over `max_body` bytes are refused with a 413."""

    def __init__(
        self,
        app: ASGIApp,
        allowed: Callable[[Headers], bool],
        refusal: str,
        challenge: dict[str, str] | None = None,
        open_paths: frozenset[str] = frozenset(),
        max_body: int = MAX_BODY_BYTES,
    ):
        self.app, self.allowed, self.refusal = app, allowed, refusal
        self.challenge, self.open_paths, self.max_body = challenge or {}, open_paths, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if scope["path"] not in self.open_paths and not self.allowed(headers):
            await JSONResponse({"detail": self.refusal}, 401, headers=self.challenge)(scope, receive, send)
            return
        too_long = JSONResponse({"detail": f"request body over the limit of {self.max_body} bytes"}, 413)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            await too_long(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                await too_long(scope, receive, send)
                return
            more = message.get("more_body", False)
        body, given = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal given
            if not given:
                given = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the client's disconnect, when it comes

        await self.app(scope, replay, send)
