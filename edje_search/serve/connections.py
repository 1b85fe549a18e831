"""Connection-level limits uvicorn does not have: connections per client address and a
timeout for the request head.

uvicorn bounds connections in total (``limit_concurrency``) and idle time between requests
(``timeout_keep_alive``), but not how many connections one address holds, nor how long a
request line and headers may take to arrive (its keep-alive timer is cancelled by the first
byte of a new request, so a client sending a header byte a second holds a connection forever).
The same timeout closes a connection whose client keeps sending a body the app answered
without reading. This subclass of uvicorn's h11 protocol adds both; it is hand-written because neither uvicorn
nor Starlette offers them, and it overrides only the connection callbacks.
"""
from __future__ import annotations

import collections

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class _GuardedH11(H11Protocol):
    per_client: int = 128
    header_timeout_s: float = 10.0
    open_by_client: collections.Counter  # shared by the connections of one server (see guarded_h11)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._client_key = self.client[0] if self.client else None
        self._head_timer = None
        if self._client_key is not None:
            if self.open_by_client[self._client_key] >= self.per_client:
                self._client_key = None  # not counted: refused
                self.logger.warning("refused a connection from %s: it already holds %d", self.client[0],
                                    self.per_client)
                transport.close()
                return
            self.open_by_client[self._client_key] += 1
        self._arm_head_timer()

    def _waiting_for_head(self) -> bool:
        """True while the client owes bytes no request is reading: the next request head (h11's
        IDLE), or the rest of a body the app answered without reading (a 401, 404 or 503)."""
        state = self.conn.their_state
        return state is h11.IDLE or (state is h11.SEND_BODY and self.cycle is not None
                                     and self.cycle.response_complete)

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.logger.info("closed a connection from %s: no complete request within %g s",
                             self.client[0] if self.client else "?", self.header_timeout_s)
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_timer is not None and not self._waiting_for_head():
            self._cancel_head_timer()  # a request head arrived; its body has the app's own timeout

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self._waiting_for_head():
            self._arm_head_timer()  # the next request's head (or an unread body's rest) must come in time

    def connection_lost(self, exc) -> None:
        self._cancel_head_timer()
        key = getattr(self, "_client_key", None)
        if key is not None:
            self.open_by_client[key] -= 1
            if self.open_by_client[key] <= 0:
                del self.open_by_client[key]
            self._client_key = None
        super().connection_lost(exc)


def guarded_h11(per_client: int, header_timeout_s: float) -> type[H11Protocol]:
    """An h11 protocol class for ``uvicorn.Config(http=...)`` with these limits and its own
    count of connections per client address."""
    if per_client < 1 or header_timeout_s <= 0:
        raise ValueError("per_client and header_timeout_s must be positive")
    return type("GuardedH11", (_GuardedH11,), {"per_client": per_client, "header_timeout_s": header_timeout_s,
                                                "open_by_client": collections.Counter()})
