"""The browser login: a form that posts the token in the request body, never in a URL.

``GET /login`` shows the form; ``POST /login`` checks the token (constant-time) and answers
303 to ``/`` with the session cookie, or 401 with the form again. Both routes are let through
by :class:`~edje_search.serve.security.TokenAuth`; everything else still needs the cookie or
the bearer header. A URL can end up in access logs, browser history and Referer headers; a
form body ends up in none of them.
"""
from __future__ import annotations

import html
from pathlib import Path

from fastapi import FastAPI, Form
from fastapi.responses import HTMLResponse, RedirectResponse

from .security import COOKIE, LOGIN_PATH, session_value, token_matches

PAGE = (Path(__file__).parent / "static" / "login.html").read_text(encoding="utf-8")
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src data:; form-action 'self'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def _page(message: str, status: int) -> HTMLResponse:
    return HTMLResponse(PAGE.replace("{message}", html.escape(message)), status_code=status, headers=PAGE_HEADERS)


def add_login_routes(app: FastAPI, token: str) -> None:
    """Register the login form and its check on ``app`` (only when the server has a token)."""
    session = session_value(token)

    @app.get(LOGIN_PATH, response_class=HTMLResponse, include_in_schema=False)
    async def login_form():
        return _page("", 200)

    @app.post(LOGIN_PATH, include_in_schema=False)
    async def login(token_given: str = Form("", alias="token")):
        if not token_given or not token_matches(token_given, token):
            return _page("Wrong token.", 401)
        response = RedirectResponse("./", status_code=303, headers={"Cache-Control": "no-store"})
        response.set_cookie(COOKIE, session, httponly=True, samesite="strict", path="/")
        return response
