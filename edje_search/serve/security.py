"""Bearer-token check and request-body limits, as plain ASGI middleware (every route, static
files and the OpenAPI docs included).

With a token set, a request needs ``Authorization: Bearer TOKEN`` or the session cookie. A
browser gets the cookie from the login form (``GET /login``, which posts the token in the
request body to ``POST /login``): the answer sets the cookie (HttpOnly, SameSite=Strict; it holds
an HMAC of the token, not the token) and redirects to ``/``, so thumbnails in ``<img>`` tags
authenticate without the token in any URL, and the token never appears in an access log line.
"""
from __future__ import annotations

import hashlib
import hmac
import json
from http.cookies import SimpleCookie
from typing import Callable

from starlette.exceptions import HTTPException

COOKIE = "edje_session"
LOGIN_PATH = "/login"


def session_value(token: str) -> str:
    """What the session cookie holds for ``token``: an HMAC of it, so the cookie never reveals it."""
    return hmac.new(token.encode(), b"edje-search session", hashlib.sha256).hexdigest()


def token_matches(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token.encode("utf-8", "surrogateescape"))


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
        self._session = session_value(token).encode()

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
        if scope["path"] == LOGIN_PATH and scope["method"] in ("GET", "POST"):
            return await self.app(scope, receive, send)  # the login form and its check (a route of the app)
        accept = _header(scope, b"accept") or ""
        if scope["path"] == "/" and scope["method"] == "GET" and "text/html" in accept:
            await send({"type": "http.response.start", "status": 303,
                        "headers": [(b"location", LOGIN_PATH.encode()), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        start, body = _json_response(
            401, "missing or wrong token: send 'Authorization: Bearer TOKEN' (browsers: log in at /login)",
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
            start, body = _json_response(  # closed: an unread body must not keep the connection
                503, f"server busy: {self.counter.value} requests in progress; retry shortly",
                [(b"retry-after", b"1"), (b"connection", b"close")])
            await send(start)
            await send(body)
            return
        self.counter.value += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.counter.value -= 1
