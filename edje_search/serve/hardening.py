"""What keeps a slow or hostile client from holding the server, and secrets out of its logs.

* :class:`BodyTimeout`: a request body must arrive whole within ``seconds`` of the request's
  start, or the request is answered 408 and its connection closed. uvicorn has no body (or
  header) read timeout of its own (its ``timeout_keep_alive`` only covers idle connections
  between requests), so this is hand-written ASGI middleware on anyio's timeout.
* :class:`RedactSecrets`: a logging filter for uvicorn's access and error logs that blanks
  ``token``-like query parameters, ``Authorization`` values and the server's token itself.
* :func:`default_allowed_hosts`: the ``Host`` names a loopback server answers (DNS rebinding
  protection, enforced by Starlette's TrustedHostMiddleware).
"""
from __future__ import annotations

import ipaddress
import logging
import re
import time

import anyio
from starlette.exceptions import HTTPException


REDACTED = "[redacted]"
# a query parameter whose name says it carries a secret: token=, access_token=, api-key=, ...
_SECRET_PARAM = re.compile(r"(?i)([?&;](?:[\w.-]*token|[\w.-]*key|password|secret)=)[^&;#\s\"]*")
_AUTH_VALUE = re.compile(r"(?i)(authorization\s*[:=]\s*\"?(?:bearer|basic|token)?\s*)[^\s\",]+")


class RedactSecrets(logging.Filter):
    """Rewrites each record's message and arguments with secrets blanked (never drops a record)."""

    def __init__(self, secrets: tuple[str, ...] = ()):
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def redact(self, text: str) -> str:
        text = _AUTH_VALUE.sub(lambda m: m.group(1) + REDACTED, _SECRET_PARAM.sub(r"\1" + REDACTED, text))
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self.redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: self.redact(v) if isinstance(v, str) else v for k, v in record.args.items()}
        return True


def install_log_redaction(token: str | None,
                          loggers: tuple[str, ...] = ("uvicorn.access", "uvicorn.error", "edje_search")) -> None:
    """Put one :class:`RedactSecrets` on each of ``loggers`` (replacing an earlier one). Call it
    after uvicorn configured its logging (``uvicorn.Config(...)`` does that)."""
    for name in loggers:
        logger = logging.getLogger(name)
        for f in [f for f in logger.filters if isinstance(f, RedactSecrets)]:
            logger.removeFilter(f)
        logger.addFilter(RedactSecrets((token,) if token else ()))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(host: str) -> list[str] | None:
    """Host names a server bound to ``host`` answers by default: the loopback names when it is
    bound to loopback (a page whose DNS name was rebound to 127.0.0.1 gets 400), else None (any;
    pass --allowed-hosts with the server's public names)."""
    if not is_loopback(host):
        return None
    names = ["localhost", "127.0.0.1", "[::1]"]
    shown = f"[{host}]" if ":" in host else host
    return names if shown in names else [*names, shown]


class BodyTimeout:
    """Answers 408 (and closes the connection) when a request's body has not fully arrived
    ``seconds`` after the request started, however steadily it trickles in."""

    def __init__(self, app, seconds: float):
        if seconds <= 0:
            raise ValueError("the body timeout must be positive")
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        deadline = time.monotonic() + self.seconds
        done = False

        async def timed_receive():
            nonlocal done
            if done:  # the body is complete: later receives wait for the disconnect, unbounded
                return await receive()
            try:
                with anyio.fail_after(max(deadline - time.monotonic(), 0.0)):
                    message = await receive()
            except TimeoutError:
                raise HTTPException(408, f"request body not received within {self.seconds:g} s",
                                    headers={"Connection": "close"}) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        await self.app(scope, timed_receive, send)
