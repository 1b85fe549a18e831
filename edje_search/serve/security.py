"""Bearer-token check and request-body limits, as plain ASGI middleware (every route, static
files and the OpenAPI docs included).

With a token set, a request needs ``Authorization: Bearer TOKEN`` or the session cookie. A
browser gets the cookie by opening ``/?token=TOKEN`` once: the server answers with the cookie
(HttpOnly, SameSite=Strict; it holds an HMAC of the token, not the token) and a redirect to
``/``, so thumbnails in ``<img>`` tags authenticate without the token in their URLs.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from http.cookies import SimpleCookie
from typing import Callable
from urllib.parse import parse_qs

from starlette.exceptions import HTTPException

COOKIE = "edje_session"


def _json_response(status: int, message: str, headers: list[tuple[bytes, bytes]] = ()) -> tuple[dict, dict]:
    body = json.dumps({"error": message, "status": status}).encode()
    start = {"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         *headers]}
    return start, {"type": "http.response.body", "body": body}


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


class TokenAuth:
    """Refuses (401, JSON) every HTTP request without the right bearer token or session cookie."""

    def __init__(self, app, token: str):
        if not token:
            raise ValueError("an empty token would let everyone in; pass None to disable the check")
        self.app = app
        self._token = token.encode()
        self._session = hmac.new(self._token, b"edje-search session", hashlib.sha256).hexdigest().encode()

    def _bearer_ok(self, scope: dict) -> bool:
        auth = _header(scope, b"authorization")
        if not auth or not auth.lower().startswith("bearer "):
            return False
        return hmac.compare_digest(auth[7:].strip().encode(), self._token)

    def _cookie_ok(self, scope: dict) -> bool:
        raw = _header(scope, b"cookie")
        if not raw:
            return False
        try:
            morsel = SimpleCookie(raw).get(COOKIE)
        except Exception:  # noqa: BLE001 - a malformed cookie header is just not a session
            return False
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), self._session)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._bearer_ok(scope) or self._cookie_ok(scope):
            return await self.app(scope, receive, send)
        if scope["path"] == "/" and scope["method"] == "GET":
            given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
            if given and hmac.compare_digest(given.encode(), self._token):
                cookie = f"{COOKIE}={self._session.decode()}; HttpOnly; SameSite=Strict; Path=/"
                await send({"type": "http.response.start", "status": 303,
                            "headers": [(b"location", b"/"), (b"set-cookie", cookie.encode()),
                                        (b"content-length", b"0")]})
                await send({"type": "http.response.body", "body": b""})
                return
        start, body = _json_response(
            401, "missing or wrong token: send 'Authorization: Bearer TOKEN' (browsers: open /?token=TOKEN)",
            [(b"www-authenticate", b'Bearer realm="edje-search"')])
        await send(start)
        await send(body)


class BodyLimit:
    """Refuses request bodies over ``limit_for(path)`` bytes with 413, whether or not they declare a length."""

    def __init__(self, app, limit_for: Callable[[str], int]):
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        declared = _header(scope, b"content-length")
        too_large = f"request body too large (this endpoint accepts at most {limit:,} bytes)"
        if declared is not None:
            try:
                declared_n = int(declared)
            except ValueError:
                declared_n = -1
            if declared_n < 0 or declared_n > limit:
                start, body = _json_response(413 if declared_n > limit else 400,
                                             too_large if declared_n > limit else "bad Content-Length header")
                await send(start)
                await send(body)
                return
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, too_large)
            return message

        await self.app(scope, counted_receive, send)


class RequestCounter:
    """Requests in progress in the app (the server's micro-batcher reads it too)."""

    def __init__(self):
        self.value = 0


class InFlightLimit:
    """Answers 503 with Retry-After at once when ``limit`` requests are already being served.

    The micro-batcher bounds the queries waiting for the engine; this bounds everything else a
    flood of requests costs (parsing, thumbnails, responses), so an overloaded server refuses
    quickly instead of letting every request's latency grow. ``exempt`` paths (health checks)
    are always served and not counted.
    """

    def __init__(self, app, limit: int, counter: RequestCounter | None = None,
                 exempt: frozenset[str] = frozenset({"/health"})):
        self.app = app
        self.limit = limit
        self.counter = counter or RequestCounter()
        self.exempt = exempt

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        if self.counter.value >= self.limit:
            start, body = _json_response(
                503, f"server busy: {self.counter.value} requests in progress; retry shortly",
                [(b"retry-after", b"1")])
            await send(start)
            await send(body)
            return
        self.counter.value += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.counter.value -= 1
